"""Prepare a corpus into token shards: documents -> tokens (+ end-of-text) -> `data/<name>/{train,val}_NNNNNN.bin`.

The pipeline streams: documents are read piece by piece (see `sources`), tokenized in batches by several
threads (tiktoken's `encode_ordinary_batch`, `data.num_proc`), and appended to the open shard of their split,
which is renamed into place when full (see `shards`). Memory stays bounded by one batch of text, whatever the
corpus size. Shards are staged in `data/<name>/.gpt2-staging/` and replace a previous preparation only once the
whole corpus is done, so a failed or interrupted rebuild loses nothing; `meta.json` is written last: a folder
without it is an incomplete preparation, which the loader rejects and the next run rebuilds from scratch.
Only what this tool wrote is ever deleted (its staging folder, the shards its meta.json lists, the ones it was
moving in): a folder holding anything else is refused, never cleared.

Train/validation split (deterministic):
- `data.val_source` given: the source is train, the val source is val.
- few documents (N * val_fraction < 10, e.g. tiny-shakespeare's one or a folder of a few books): every document
  is split by characters, its first (1 - val_fraction) train and the rest val (nanoGPT's rule for one document),
  so the fraction is exact and val covers every document.
- more documents: round(N * val_fraction) of the N documents (at most N - 1), chosen by a generator seeded with
  `data.seed`, are val, whole.
- `data.builder=hf_stream`: the first `data.shard_tokens` tokens of the stream are val (one shard, as
  build-nanogpt does for FineWeb-Edu), the rest train; `val_fraction` is not used.
With the GPT-2 tokenizer every document (and each side of a one-document split) ends with end-of-text (50256).
The char tokenizer has no such token: documents are concatenated as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from omegaconf import DictConfig

from gpt2.chat import CHAT_TEMPLATE
from gpt2.config import DataConfig, PrepareConfig, to_object
from gpt2.data.adopt import adopt
from gpt2.data.dataset import META_FILE, dataset_dir, new_meta, write_meta
from gpt2.data.instructions import write_examples
from gpt2.data.shards import MAX_VOCAB, TOKEN_DTYPE, ShardWriter, val_choice
from gpt2.data.sources import Source, open_source
from gpt2.errors import UserError, exit_on_user_error
from gpt2.progress import progress_bar
from gpt2.resources import CONFIG_DIR
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer

BATCH_PIECES = 1024  # documents tokenized together (spread over the threads)
BATCH_CHARS = 1 << 22  # ... or ~4M characters, whichever comes first: bounds memory (~50 MB of token lists)
STAGE_DIR = ".gpt2-staging"  # shards of a preparation in progress, inside the dataset folder
MOVING_FILE = ".gpt2-moving.json"  # names of the shards being moved in from the staging folder (crash window)
MIN_VAL_DOCS = 10  # fewer held-out documents than this: split each document by characters instead
Item = tuple[str, str, bool]  # (split, text, ends_document)


def run(cfg: DictConfig | PrepareConfig) -> Path:
    """`data/prepare.py` and `gpt2-prepare`: prepare `cfg.data` under `cfg.data_root`. Returns the dataset dir."""
    pc = cfg if isinstance(cfg, PrepareConfig) else to_object(cfg, PrepareConfig)
    return prepare(pc.data, data_root=pc.data_root, overwrite=pc.overwrite)


def prepare(data: DataConfig, data_root: str | Path = "data", overwrite: bool = False) -> Path:
    """Tokenize `data`'s source(s) into shards + meta.json under `dataset_dir(data.name, data_root)`.

    A dataset that is already prepared (has meta.json) is left alone unless `overwrite`. Raises UserError for
    missing or unreadable sources.
    """
    out_dir = dataset_dir(data.name, data_root)
    meta_path = out_dir / META_FILE
    if meta_path.exists() and not overwrite:
        print(f"{out_dir} is already prepared ({_summary(meta_path)}); pass overwrite=true to rebuild it", flush=True)
        return out_dir
    if data.builder == "shards":
        return _adopt(data, out_dir)
    _check_ours(out_dir, [s for s in (data.source, data.val_source) if s])
    source, val_source = _open_sources(data, out_dir)
    if data.builder in ("instructions", "preferences"):
        return _prepare_examples(data, out_dir, source, val_source)
    # The GPT-2 vocabulary first: fail fast when it is unavailable, before any pass over the corpus.
    tokenizer: CharTokenizer | GPT2Tokenizer | None = GPT2Tokenizer() if data.tokenizer == "gpt2" else None
    rule, cuts, val_mask, chars = _plan_split(data, source, val_source, char_vocab=tokenizer is None)
    tokenizer, encode = _encoder(data, tokenizer, chars)
    items = _split_by_chars(source, cuts) if cuts is not None else _split_by_docs(source, val_source, val_mask)
    print(
        f"preparing {out_dir} from {source!r}"
        + (f" (val: {val_source!r})" if val_source else "")
        + f"; tokenizer {tokenizer.name}; split: {rule}",
        flush=True,
    )
    # The first shard of a stream is its val split, unless a val source is given.
    head = data.shard_tokens if data.builder == "hf_stream" and val_source is None else 0
    stage, shards, docs = _write_staged(items, encode, tokenizer.eot_id, out_dir, data, head)
    if sum(s["tokens"] for s in shards["train"]) == 0:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"data.source={data.source or source!r} holds no text; check the path and data.text_field")
    meta = new_meta(
        data,
        tokenizer,
        shards,
        docs,
        source=repr(source),
        val_source=repr(val_source) if val_source else None,
        split_rule=rule,
    )
    _swap_in(stage, out_dir, meta)
    print(f"wrote {out_dir}: {_summary(meta_path)}", flush=True)
    return out_dir


def _prepare_examples(data: DataConfig, out_dir: Path, source: Source, val_source: Optional[Source]) -> Path:
    """data.builder=instructions or preferences: rows -> example shards with loss masks (gpt2.data.instructions)."""
    pairs = data.builder == "preferences"
    print(
        f"preparing {out_dir} from {source!r}"
        + (f" (val: {val_source!r})" if val_source else "")
        + (
            "; preference pairs, loss masks on the replies"
            if pairs
            else "; instruction examples, loss on the completions"
        ),
        flush=True,
    )
    stage = out_dir / STAGE_DIR
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        written = write_examples(source, val_source, data, stage, data.num_proc or _cpu_count())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    examples = written.examples
    if examples["train"] == 0:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"data.source={data.source} holds no training examples; check the path")
    meta = new_meta(
        data,
        GPT2Tokenizer(),
        written.shards,
        examples,
        source=repr(source),
        val_source=repr(val_source) if val_source else None,
        split_rule=written.split_rule,
    )
    meta["examples"] = True
    if written.chats:
        meta["chat_template"] = CHAT_TEMPLATE
    if pairs:
        meta["pairs"] = True
    _swap_in(stage, out_dir, meta)
    unit, per = ("pairs", 2) if pairs else ("examples", 1)
    print(
        f"wrote {out_dir}: {_summary(out_dir / META_FILE)}; {examples['train'] // per:,} train and "
        f"{examples['val'] // per:,} val {unit}",
        flush=True,
    )
    return out_dir


def _open_sources(data: DataConfig, out_dir: Path) -> tuple[Any, Any]:
    """The training source and, when `data.val_source` is set, the validation source."""
    text_field = None if data.builder in ("instructions", "preferences") else data.text_field  # (rows whole)
    common = dict(
        data_dir=out_dir,
        text_field=text_field,
        subset=data.subset,
        split=data.split,
        streaming=data.builder == "hf_stream",
        extensions=data.extensions,
    )
    source = open_source(_source_spec(data, out_dir), key="data.source", **common)
    val_source = open_source(data.val_source, key="data.val_source", **common) if data.val_source else None
    return source, val_source


def _encoder(data: DataConfig, tokenizer: GPT2Tokenizer | None, chars: set[str] | None) -> tuple[Any, Any]:
    """(tokenizer, texts -> list of uint16 token arrays): GPT-2 BPE on `data.num_proc` threads, or a character
    vocabulary built from the corpus's `chars`."""
    if tokenizer is not None:
        num_threads = data.num_proc or _cpu_count()
        return tokenizer, lambda texts: [
            np.array(ids, dtype=TOKEN_DTYPE) for ids in tokenizer.encode_batch(texts, num_threads)
        ]
    if len(chars) > MAX_VOCAB:
        raise UserError(
            f"the corpus has {len(chars)} distinct characters, more than uint16 shards hold; use data.tokenizer=gpt2"
        )
    chars_tokenizer = CharTokenizer(sorted(chars))
    return chars_tokenizer, _char_encoder(chars_tokenizer)


def _write_staged(
    items: Any, encode: Any, eot_id: int | None, out_dir: Path, data: DataConfig, head: int
) -> tuple[Path, dict[str, list[dict]], Any]:
    """Write the shards into a staging folder of `out_dir`: they are moved in only once the whole corpus is
    done, so a failing rebuild (overwrite=true with a bad file, Ctrl-C) leaves the previous dataset as it was.
    Returns (the staging folder, the shard records per split, the document counts)."""
    stage = out_dir / STAGE_DIR
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    writers = {split: ShardWriter(stage, split, data.shard_tokens) for split in ("train", "val")}
    try:
        docs = _write(items, encode, eot_id, writers, head, desc=data.name)
        return stage, {split: w.close() for split, w in writers.items()}, docs
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_in(stage: Path, out_dir: Path, meta: dict) -> None:
    """Replace the dataset in `out_dir` with the staged shards. meta.json goes first and comes back last, so
    the folder reads incomplete until the end; MOVING_FILE lists the shards being moved (a crash is redone)."""
    _clear(out_dir)
    (out_dir / MOVING_FILE).write_text(json.dumps(sorted(p.name for p in stage.iterdir())))
    for shard in stage.iterdir():
        os.replace(shard, out_dir / shard.name)
    stage.rmdir()
    write_meta(out_dir, meta)  # last: its presence marks the dataset complete
    (out_dir / MOVING_FILE).unlink()


def _adopt(data: DataConfig, out_dir: Path) -> Path:
    """data.builder=shards: link a folder of llm.c shards in and write its meta.json (see gpt2.data.adopt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(data.source or "").expanduser().resolve() != out_dir.resolve():
        _clear(out_dir)  # our links from an earlier adoption; shards adopted in place are the user's
    shards, tokenizer = adopt(data, out_dir)
    write_meta(
        out_dir,
        new_meta(
            data,
            tokenizer,
            shards,
            None,
            source=f"adopted llm.c shards from {data.source}",
            val_source=None,
            split_rule="file names (train / val)",
        ),
    )
    print(f"wrote {out_dir}: {_summary(out_dir / META_FILE)}", flush=True)
    return out_dir


@exit_on_user_error
def _cli(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console script `gpt2-prepare`: the same Hydra command line as `python data/prepare.py`."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="prepare")(_cli)()


def _cpu_count() -> int:
    """Cores this process may use (the affinity mask under Slurm/containers; macOS has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _source_spec(data: DataConfig, out_dir: Path) -> str:
    if data.source:
        return data.source
    if (out_dir / "input.txt").exists():
        return str(out_dir / "input.txt")
    raise UserError(
        f"data.source is not set and {out_dir / 'input.txt'} does not exist; set data.source=<file, "
        "folder, glob, http(s) URL or hf:dataset>, e.g. data=text data.name=mycorpus data.source=texts/"
    )


def _written_here(out_dir: Path) -> set[str]:
    """Names in `out_dir` that this tool wrote: the shards its meta.json lists (for adopted shards only the
    links it made), the shards it was moving in when a run died, its own bookkeeping files and staging folder."""
    names = {META_FILE, MOVING_FILE, STAGE_DIR} | {p.name for p in out_dir.glob(f".{META_FILE}.*.tmp")}
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        adopted = meta.get("data", {}).get("builder") == "shards"
        for split in meta["splits"].values():
            names |= {r["file"] for r in split["shards"] if not adopted or (out_dir / r["file"]).is_symlink()}
            names |= {r["mask"] for r in split["shards"] if isinstance(r.get("mask"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        names |= set(json.loads((out_dir / MOVING_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        pass
    return names


def _check_ours(out_dir: Path, sources: list[str]) -> None:
    """UserError if `out_dir` holds anything but an earlier preparation's files and the corpus itself (`input.*`,
    or the files of a local `data.source` that lives in the folder)."""
    if not out_dir.is_dir():
        return
    ours = _written_here(out_dir)
    roots = [
        Path(re.split(r"[*?\[]", s, maxsplit=1)[0]).expanduser().resolve()  # a glob's fixed part
        for s in sources
        if not s.startswith(("hf:", "builtin:", "http://", "https://"))
    ]

    def is_source(p: Path) -> bool:
        p = p.resolve()
        return p.name.startswith("input.") or any(p == r or r in p.parents or p in r.parents for r in roots)

    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not is_source(p))
    if foreign:
        names = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(
            f"{out_dir} holds files this preparation did not write ({names}); nothing was changed. "
            "Prepare into another data.name (or data_root), or move those files out"
        )


def _clear(out_dir: Path) -> None:
    """Remove a previous (possibly interrupted) preparation, and only what it wrote: meta.json first, so the
    folder reads incomplete until the new one is complete."""
    ours = _written_here(out_dir)
    (out_dir / META_FILE).unlink(missing_ok=True)
    for name in ours - {STAGE_DIR, MOVING_FILE}:
        (out_dir / name).unlink(missing_ok=True)


def _summary(meta_path: Path) -> str:
    try:
        splits = json.loads(meta_path.read_text())["splits"]
        return ", ".join(f"{s}: {v['tokens']:,} tokens in {v['num_shards']} shard(s)" for s, v in splits.items())
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json unreadable"


def _plan_split(
    data: DataConfig, source: Source, val_source: Optional[Source], char_vocab: bool
) -> tuple[str, Optional[list[int]], Optional[np.ndarray], set[str]]:
    """Decide the train/val split (module docstring) with a cheap pass over the corpus (counts, not tokens).

    Returns (rule for meta.json, per-document character cut points or None, val mask over documents or None,
    the corpus's characters when `char_vocab` or a character split needed them).
    """
    cuts, val_mask, chars = None, None, set()
    if data.builder == "hf_stream":
        rule = "val_source" if val_source else f"first {data.shard_tokens} tokens of the stream are val"
    elif val_source:
        rule = "val_source"
    elif data.val_fraction == 0:
        rule = "no validation split (data.val_fraction=0)"
    else:
        n_docs = source.count_documents()
        if n_docs * data.val_fraction < MIN_VAL_DOCS:
            lengths, chars = _scan_chars(source)
            cuts = [int(n * (1 - data.val_fraction)) for n in lengths]
            rule = f"{n_docs} document(s), each split by characters: the first {1 - data.val_fraction:g} train"
        else:
            val_mask = val_choice(n_docs, data.val_fraction, data.seed)
            rule = f"{int(val_mask.sum())} of {n_docs} documents val, chosen with seed {data.seed}"
    if char_vocab and cuts is None:
        for src in (source, val_source):
            chars |= _scan_chars(src)[1] if src is not None else set()
    return rule, cuts, val_mask, chars


def _scan_chars(source: Source) -> tuple[list[int], set[str]]:
    """(characters in each document, set of characters) of a source, streaming."""
    lengths, n, chars = [], 0, set()
    for text, end in source.pieces():
        n += len(text)
        chars.update(text)
        if end:
            lengths.append(n)
            n = 0
    return lengths, chars


def _split_by_docs(source: Source, val_source: Optional[Source], val_mask: Optional[np.ndarray]) -> Iterator[Item]:
    doc = 0
    for text, end in source.pieces():
        yield ("val" if val_mask is not None and val_mask[doc] else "train"), text, end
        doc += end
    if val_source is not None:
        for text, end in val_source.pieces():
            yield "val", text, end


def _split_by_chars(source: Source, cuts: list[int]) -> Iterator[Item]:
    """Characters [0, cuts[i]) of document i are train, the rest val; each side ends as a document."""
    doc, pos = 0, 0
    for text, end in source.pieces():
        cut = cuts[doc]
        if pos >= cut:
            yield "val", text, end
        else:
            head, tail = text[: cut - pos], text[cut - pos :]
            reached = pos + len(text) >= cut
            yield "train", head, end or reached
            if reached:
                yield "val", tail, end
        pos += len(text)
        if end:
            doc, pos = doc + 1, 0


def _char_encoder(tokenizer: CharTokenizer):
    # Vectorised CharTokenizer.encode: ids are ranks in the sorted vocabulary, found by binary search on code points.
    codepoints = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)

    def encode(texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(codepoints, cps)
            assert (codepoints[np.minimum(ids, len(codepoints) - 1)] == cps).all(), "char missing from the vocab"
            out.append(ids.astype(TOKEN_DTYPE))
        return out

    return encode


def _write(
    items: Iterator[Item], encode, eot_id: Optional[int], writers: dict[str, ShardWriter], head: int, desc: str
) -> dict[str, int]:
    """Tokenize items batch by batch into the writers; returns documents written per split.

    Double-buffered: batch i is tokenized in a background thread (whose tiktoken threads release the GIL) while
    this thread reads and parses batch i + 1, so at most two batches are in memory. `head` > 0 sends the first
    `head` tokens of the stream to val and the rest to train (hf_stream's split).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    bar = progress_bar(desc=f"tokenizing {desc}", unit="tok", unit_scale=True, smoothing=0.1, mininterval=1.0)
    sink = _DocumentSink(eot_id, writers, head, bar)
    pending: Optional[tuple[list[Item], Future]] = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        try:
            for batch in _batches(items):
                if pending is not None:
                    sink.store(pending[0], pending[1].result())
                pending = batch, pool.submit(encode, [text for _, text, _ in batch])
            if pending is not None:
                sink.store(pending[0], pending[1].result())
                pending = None
        finally:
            if pending is not None:
                pending[1].cancel()
            bar.close()
    return sink.docs


def _batches(items: Iterator[Item]) -> Iterator[list[Item]]:
    """Items in batches of BATCH_PIECES pieces or BATCH_CHARS characters, whichever comes first."""
    batch: list[Item] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if len(batch) >= BATCH_PIECES or size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _DocumentSink:
    """Routes tokenized pieces into the split writers: each document that has text ends with end-of-text, and
    is counted in `docs` per split (hf_stream: in val while the stream is within its first `head` tokens)."""

    def __init__(self, eot_id: Optional[int], writers: dict[str, ShardWriter], head: int, bar: Any) -> None:
        self.eot = np.array([eot_id], dtype=TOKEN_DTYPE) if eot_id is not None else None
        self.writers, self.head, self.bar = writers, head, bar
        self.docs = {"train": 0, "val": 0}
        self.stream_pos = 0  # tokens of the train stream so far
        self.has_text = {"train": False, "val": False}  # the split's current document has text

    def store(self, batch: list[Item], ids: list[np.ndarray]) -> None:
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for (split, text, end), tokens in zip(batch, ids):
            parts[split].append(tokens)
            self.has_text[split] |= bool(text)
            if split == "train":
                self.stream_pos += tokens.size
            if end and self.has_text[split]:
                if self.eot is not None:
                    parts[split].append(self.eot)
                    self.stream_pos += split == "train"
                self.docs["val" if split == "train" and self.stream_pos <= self.head else split] += 1
                self.has_text[split] = False
        for split, arrays in parts.items():
            if arrays:
                tokens = np.concatenate(arrays)
                _route(tokens, split, self.writers, self.head)
                self.bar.update(tokens.size)
        self.bar.set_postfix(docs=self.docs["train"] + self.docs["val"], refresh=False)


def _route(tokens: np.ndarray, split: str, writers: dict[str, ShardWriter], head: int) -> None:
    if head:  # hf_stream: everything arrives as train; the first `head` tokens go to val
        room = head - writers["val"].num_tokens
        if room > 0:
            writers["val"].write(tokens[:room])
            tokens = tokens[room:]
    if tokens.size:
        writers[split].write(tokens)
