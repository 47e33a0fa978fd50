"""Where documents come from: local files, folders and globs, http(s) URLs, and Hugging Face datasets.

A source yields *pieces* `(text, ends_document)`: most documents are one piece (a .jsonl row, a parquet row, a
dataset row); a large .txt/.md file is read in pieces of a few MB so that no file is ever held whole in memory.
Pieces are cut only at a newline between two non-space characters, where GPT-2's pre-tokenizer always splits, so
tokenizing the pieces gives exactly the tokens of tokenizing the whole file.

Spec syntax (`data.source`, `data.val_source`):
- a file (.txt, .md, .jsonl, .json, .parquet), a folder (searched recursively for those), or a glob (`**` ok);
- `http(s)://...`: downloaded once to `data/<name>/input.txt` (`input.jsonl` etc. when the URL names such a
  file; kept, and an existing file there is used instead of downloading);
- `hf:<dataset>`: `datasets.load_dataset(<dataset>, data.subset, split=data.split)`, a hub name or a local dir;
- `builtin:<name>`: a corpus shipped inside the package (`builtin:tinyshakespeare`, the demo's), never downloaded.
"""

from __future__ import annotations

import glob
import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from gpt2.errors import UserError
from gpt2.resources import BUILTIN_SOURCES

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
PIECE_CHARS = 1 << 18  # 256K characters per piece of a large text file (several per batch: parallelism)
Piece = tuple[str, bool]  # (text, this piece ends its document)


class FileSource:
    """Documents from local files: a .txt/.md file is one document; .jsonl/.json/.parquet hold one per row."""

    def __init__(self, files: list[Path], text_field: str, spec: str) -> None:
        self.files = files
        self.text_field = text_field
        self.spec = spec

    def __repr__(self) -> str:
        return f"{self.spec} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"

    def count_documents(self) -> int:
        """Documents in the source (reads .jsonl/.json files once; cheap for text and parquet files)."""
        n = 0
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                n += 1
            elif suffix == ".jsonl":
                with open(path, "rb") as f:
                    n += sum(1 for line in f if line.strip())
            elif suffix == ".json":
                n += len(_load_json_rows(path))
            else:
                import pyarrow.parquet as pq

                n += pq.ParquetFile(path).metadata.num_rows
        return n

    def pieces(self) -> Iterator[Piece]:
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                yield from _text_file_pieces(path)
            elif suffix == ".jsonl":
                yield from _jsonl_pieces(path, self.text_field)
            elif suffix == ".json":
                for i, row in enumerate(_load_json_rows(path)):
                    yield _row_text(row, self.text_field, f"{path} item {i}"), True
            else:
                yield from _parquet_pieces(path, self.text_field)


class HFSource:
    """Documents from a Hugging Face dataset (`datasets.load_dataset`), one per row of `text_field`."""

    def __init__(self, name: str, subset: Optional[str], split: str, text_field: str, streaming: bool) -> None:
        self.name, self.subset, self.split, self.text_field, self.streaming = name, subset, split, text_field, streaming
        self._ds = None

    def __repr__(self) -> str:
        subset = f", subset {self.subset}" if self.subset else ""
        return f"hf:{self.name} (split {self.split}{subset}{', streamed' if self.streaming else ''})"

    def _dataset(self):
        if self._ds is None:
            import datasets

            try:
                self._ds = datasets.load_dataset(self.name, self.subset, split=self.split, streaming=self.streaming)
            except Exception as e:  # hub, network, cache and config errors all surface here
                offline = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: it must be in the cache)" if (
                    os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
                ) else ""
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(
                    f"cannot load Hugging Face dataset {self!r}{offline}: {type(e).__name__}: {first}; check "
                    "data.source/data.subset/data.split, or run once with network access so it is cached"
                ) from e
            columns = self._ds.column_names
            if columns is not None and self.text_field not in columns:
                raise UserError(
                    f"Hugging Face dataset {self!r} has no column {self.text_field!r} (columns: "
                    f"{', '.join(columns)}); set data.text_field"
                )
        return self._ds

    def count_documents(self) -> int:
        assert not self.streaming, "a streamed dataset has no known length"
        return len(self._dataset())

    def pieces(self) -> Iterator[Piece]:
        ds = self._dataset()
        if self.streaming:
            for row in ds:
                yield _row_text(row, self.text_field, repr(self)), True
        else:
            for batch in ds.iter(batch_size=1024):
                for text in batch[self.text_field]:
                    yield text or "", True


Source = FileSource | HFSource


def open_source(
    spec: str, *, data_dir: Path, text_field: str, subset: Optional[str], split: str, streaming: bool, key: str
) -> Source:
    """Resolve a source spec (see the module docstring). `key` names the config key in error messages."""
    if spec.startswith("hf:"):
        return HFSource(spec[3:], subset, split, text_field, streaming)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise UserError(f"{key}={spec}: no built-in corpus {name!r}; built in: {', '.join(BUILTIN_SOURCES)}")
        return FileSource([BUILTIN_SOURCES[name]], text_field, spec)
    if streaming:
        raise UserError(f"data.builder=hf_stream streams a Hugging Face dataset; set {key}=hf:<dataset>, got {spec!r}")
    if spec.startswith(("http://", "https://")):
        suffix = Path(urllib.parse.urlparse(spec).path).suffix.lower()
        dest = data_dir / ("input" + (suffix if suffix in SUFFIXES else ".txt"))  # .jsonl stays .jsonl
        return FileSource([fetch_url(spec, dest)], text_field, spec)
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        files = [p for p in files if p.suffix.lower() in SUFFIXES]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{key}={spec}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        files = [path]
    else:
        raise UserError(f"{key}={spec} does not exist; give a file, folder, glob, http(s) URL or hf:<dataset>")
    if not files:
        raise UserError(f"{key}={spec} matches no {', '.join(SUFFIXES)} files")
    return FileSource(files, text_field, spec)


def fetch_url(url: str, dest: Path) -> Path:
    """Download `url` to `dest` (atomically: temp file + rename) unless `dest` already exists."""
    if dest.exists():
        print(f"using {dest} (already downloaded from {url})", flush=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {url} ({type(e).__name__}: {e}); offline, put the file at {dest} and run again"
        ) from e
    os.replace(tmp, dest)
    return dest


def _safe_cut(buf: str) -> int:
    """The end of the longest prefix of `buf` that can be tokenized on its own: just after a newline that sits
    between two non-space characters (GPT-2's pre-tokenizer splits there whatever follows). 0 if none."""
    end = len(buf) - 1
    lowest = max(1, len(buf) - (1 << 20))  # look back at most 1M characters
    while True:
        i = buf.rfind("\n", lowest, end)
        if i < 0:
            return 0
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        end = i


def _text_file_pieces(path: Path) -> Iterator[Piece]:
    # Text mode with universal newlines, as nanoGPT's `open(path).read()`: "\r\n" becomes "\n".
    with open(path, encoding="utf-8") as f:
        buf = ""
        while True:
            try:
                chunk = f.read(PIECE_CHARS)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 ({e.reason} near byte {e.start}); convert it to UTF-8") from None
            if not chunk:
                yield buf, True
                return
            buf += chunk
            cut = _safe_cut(buf)
            if cut == 0 and len(buf) > 16 * PIECE_CHARS:
                cut = len(buf)  # no safe point in 64M characters: cut anyway (may change a token or two)
            if cut:
                yield buf[:cut], False
                buf = buf[cut:]


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            yield _row_text(row, text_field, f"{path}:{lineno}"), True


def _load_json_rows(path: Path) -> list:
    """A .json file: a list of rows, or one object (one row). Loaded whole: use .jsonl for large corpora."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); for one object per line use .jsonl") from None
    return data if isinstance(data, list) else [data]


def _row_text(row, text_field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or text_field not in row:
        keys = f" (keys: {', '.join(map(str, row))})" if isinstance(row, dict) else ""
        raise UserError(f"{where}: no {text_field!r} field{keys}; set data.text_field to the field holding the text")
    text = row[text_field]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, not text; set data.text_field")
    return text or ""


def _parquet_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise UserError(
            f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); set data.text_field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield text or "", True
