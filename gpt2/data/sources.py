"""Where documents come from: local files, folders and globs, http(s) URLs, and Hugging Face datasets.

A source yields *pieces* `(text, ends_document)`: most documents are one piece (a .jsonl row, a parquet row, a
dataset row); a large .txt/.md file is read in pieces of a few MB so that no file is ever held whole in memory.
Pieces are cut only at a newline between two non-space characters, where GPT-2's pre-tokenizer always splits, so
tokenizing the pieces gives exactly the tokens of tokenizing the whole file.

Spec syntax (`data.source`, `data.val_source`):
- a file, a folder (searched recursively; hidden files and folders are skipped), or a glob (`**` ok).
  .jsonl/.json/.parquet files hold one document per row; any other file is one document of UTF-8 text
  (.txt, .md, .py, .rst, .html, .csv, no extension, ...). `data.extensions` limits a folder or glob to some
  extensions. Binary, non-UTF-8 and empty files are skipped, and the skips are reported with the reason;
- `http(s)://...`: downloaded once to `data/<name>/input.txt` (`input.jsonl` etc. when the URL names such a
  file; kept, and an existing file there is used instead of downloading);
- `hf:<dataset>`: `datasets.load_dataset(<dataset>, data.subset, split=data.split)`, a hub name or a local dir;
- `builtin:<name>`: a corpus shipped inside the package (`builtin:tinyshakespeare`, the demo's), never downloaded.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from gpt2.errors import UserError
from gpt2.files import download
from gpt2.resources import BUILTIN_SOURCES

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")  # one document per row; any other file is one text document
URL_SUFFIXES = (".txt", ".md", *ROW_SUFFIXES)  # a downloaded URL keeps these suffixes (else it is saved as .txt)
SNIFF_BYTES = 1 << 16  # a file whose first 64 KB hold a NUL byte is binary
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
            if suffix not in ROW_SUFFIXES:
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
            if suffix not in ROW_SUFFIXES:
                yield from _text_file_pieces(path)
            elif suffix == ".jsonl":
                yield from _jsonl_pieces(path, self.text_field)
            elif suffix == ".json":
                for i, row in enumerate(_load_json_rows(path)):
                    yield _row_text(row, self.text_field, f"{path} item {i}"), True
            else:
                yield from _parquet_pieces(path, self.text_field)

    def rows(self) -> Iterator[tuple[Any, str]]:
        """(row, where) for every row of the .jsonl/.json/.parquet files, `where` naming it in errors (file:line).
        Plain text files have no rows: a UserError says so, before any row is read."""
        for path in self.files:
            if path.suffix.lower() not in ROW_SUFFIXES:
                raise UserError(
                    f"{path} is a text file, not rows: instruction data comes from .jsonl, .json or "
                    ".parquet files (one example per row) or hf:<dataset>"
                )
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _jsonl_rows(path)
            elif suffix == ".json":
                for i, row in enumerate(_load_json_rows(path)):
                    yield row, f"{path} item {i}"
            else:
                import pyarrow.parquet as pq

                for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                    for i, row in enumerate(batch.to_pylist()):
                        yield row, f"{path} row {i}"


class HFSource:
    """Documents from a Hugging Face dataset (`datasets.load_dataset`), one per row of `text_field`."""

    def __init__(
        self, name: str, subset: Optional[str], split: str, text_field: Optional[str], streaming: bool
    ) -> None:
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
                offline = (
                    " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: it must be in the cache)"
                    if (os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1")
                    else ""
                )
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(
                    f"cannot load Hugging Face dataset {self!r}{offline}: {type(e).__name__}: {first}; check "
                    "data.source/data.subset/data.split, or run once with network access so it is cached"
                ) from e
            columns = self._ds.column_names
            if columns is not None and self.text_field is not None and self.text_field not in columns:
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

    def rows(self) -> Iterator[tuple[Any, str]]:
        for i, row in enumerate(self._dataset()):
            yield row, f"{self!r} row {i}"


Source = FileSource | HFSource


def open_source(
    spec: str,
    *,
    data_dir: Path,
    text_field: str,
    subset: Optional[str],
    split: str,
    streaming: bool,
    key: str,
    extensions: Optional[Sequence[str]] = None,
) -> Source:
    """Resolve a source spec (see the module docstring). `key` names the config key in error messages;
    `extensions` (e.g. [".py", ".rst"]) limits the files a folder or glob contributes."""
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
        dest = data_dir / ("input" + (suffix if suffix in URL_SUFFIXES else ".txt"))  # .jsonl stays .jsonl
        return FileSource([fetch_url(spec, dest)], text_field, spec)
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{key}={spec} does not exist; give a file, folder, glob, http(s) URL or hf:<dataset>")
    if extensions and not path.is_file():
        wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        files = [p for p in files if p.suffix.lower() in wanted]
    files, skipped = _readable(files)
    if skipped:
        print(f"{key}={spec}: skipped {_skip_report(skipped)}", flush=True)
    if not files:
        only = f" with extensions {', '.join(extensions)}" if extensions else ""
        raise UserError(f"{key}={spec} has no readable text files{only}; check the path (or data.extensions)")
    return FileSource(files, text_field, spec)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _readable(files: list[Path]) -> tuple[list[Path], dict[str, list[Path]]]:
    """(files to read, {reason: files skipped}). Text files are sniffed: empty, binary (a NUL byte in the first
    64 KB) or not UTF-8 there are skipped; row files (.jsonl/.json/.parquet) are checked when read."""
    keep, skipped = [], {}
    for path in files:
        reason = None if path.suffix.lower() in ROW_SUFFIXES else _sniff(path)
        if reason:
            skipped.setdefault(reason, []).append(path)
        else:
            keep.append(path)
    return keep, skipped


def _sniff(path: Path) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head.strip():
        return "empty"
    if b"\0" in head:
        return "binary"
    try:
        # A character split at the end of a longer file's first 64 KB is fine.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def _skip_report(skipped: dict[str, list[Path]]) -> str:
    """`3 files: 2 binary (a.png, b.bin), 1 not UTF-8 (c.txt)`."""
    parts = []
    for reason, paths in skipped.items():
        names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        parts.append(f"{len(paths)} {reason} ({names})")
    n = sum(map(len, skipped.values()))
    return f"{n} file{'s' if n != 1 else ''}: " + ", ".join(parts)


def fetch_url(url: str, dest: Path) -> Path:
    """Download `url` to `dest` (atomically) unless `dest` already exists."""
    if dest.exists():
        print(f"using {dest} (already downloaded from {url})", flush=True)
        return dest
    created = not dest.parent.exists()
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        download(url, dest)
    except (OSError, ValueError) as e:  # URLError, timeouts and HTTP errors are all OSErrors; a bad URL ValueError
        if created:
            dest.parent.rmdir()  # no empty data/<name>/ left behind
        raise UserError(
            f"cannot download {url} ({type(e).__name__}: {e}); offline, put the file at {dest} and run again"
        ) from e
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
                raise UserError(
                    f"{path} is not valid UTF-8 ({e.reason} near byte {e.start}); convert it to UTF-8"
                ) from None
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
    for row, where in _jsonl_rows(path):
        yield _row_text(row, text_field, where), True


def _jsonl_rows(path: Path) -> Iterator[tuple[Any, str]]:
    """(parsed row, "file:line") for each non-blank line; bad JSON or UTF-8 is a UserError naming the line."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            yield row, f"{path}:{lineno}"


def _decode(raw: bytes, path: Path, offset: int) -> str:
    """UTF-8 bytes read from `path` at byte `offset` -> text; anything else is a UserError naming the byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid UTF-8 at byte {offset + e.start} ({e.reason}); convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _load_json_rows(path: Path) -> list:
    """A .json file: a list of rows, or one object (one row). Loaded whole: use .jsonl for large corpora."""
    try:
        data = json.loads(_decode(path.read_bytes(), path, 0))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); for one object per line use .jsonl"
        ) from None
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
