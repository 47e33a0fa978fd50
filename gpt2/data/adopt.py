"""Adopt a folder of llm.c-format shards made by other tools (llm.c's `dev/data/*.py`, build-nanogpt's
`fineweb.py`): `python data/prepare.py data=llmc data.name=<name> data.source=<folder>`.

The format is ours already (a 256 x int32 header: magic 20240520, version 1, token count; then uint16 tokens), so
nothing is re-tokenized or copied: every `*.bin` whose name says `train` or `val` is validated (header against
size), scanned for its largest token id (which confirms the GPT-2 tokenizer), and linked into
`data/<name>/` under our names (`train_000000.bin`, ...); meta.json is written last, as by a preparation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from gpt2.config import DataConfig
from gpt2.data.dataset import SPLITS
from gpt2.data.shards import open_tokens, read_header, shard_name
from gpt2.errors import UserError
from gpt2.tokenizer import GPT2Tokenizer

OUR_NAME = re.compile(r"(train|val)_\d{6}\.bin")
SCAN_TOKENS = 1 << 24  # tokens read at a time when looking for a shard's largest id


def adopt(data: DataConfig, out_dir: Path) -> tuple[dict[str, list[dict]], GPT2Tokenizer]:
    """Link `data.source`'s shards into `out_dir`; returns their meta.json records per split and the tokenizer."""
    if data.tokenizer != "gpt2":
        raise UserError(
            "data.builder=shards adopts GPT-2-token shards; set data.tokenizer=gpt2 (a char vocabulary "
            "cannot be recovered from shards)"
        )
    source = Path(data.source or "").expanduser()
    if not data.source or not source.is_dir():
        raise UserError(f"data.source={data.source} is not a folder; point it at the folder of llm.c .bin shards")
    by_split = _shards_by_split(source)
    tokenizer = GPT2Tokenizer()
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for split, paths in by_split.items():
        for i, path in enumerate(paths):
            count = read_header(path)
            largest = _max_token(path, count)
            if largest >= tokenizer.vocab_size:
                raise UserError(
                    f"shard {path} holds token id {largest}, outside GPT-2's {tokenizer.vocab_size}: "
                    "these are not GPT-2 tokens; re-tokenize the corpus with data=text"
                )
            link = out_dir / shard_name(split, i)
            _link(path.resolve(), link)
            records[split].append({"file": link.name, "tokens": count, "max_token": largest})
            print(f"{split}: {path.name} -> {link.name} ({count:,} tokens)", flush=True)
    first = np.asarray(open_tokens(by_split["train"][0], min(32, records["train"][0]["tokens"])))
    print(f"the first train tokens read as GPT-2 text: {tokenizer.decode(first.tolist())!r}", flush=True)
    return records, tokenizer


def _shards_by_split(folder: Path) -> dict[str, list[Path]]:
    """`*.bin` files by split, sorted by name: a name holding `val` is val, one holding `train` is train. The
    links an earlier adoption of this folder made (ours, `train_000000.bin` -> ...) are not shards of their own."""
    files = sorted(p for p in folder.glob("*.bin") if not (p.is_symlink() and OUR_NAME.fullmatch(p.name)))
    by_split: dict[str, list[Path]] = {split: [] for split in SPLITS}
    unknown = []
    for path in files:
        split = "val" if "val" in path.name else "train" if "train" in path.name else None
        (by_split[split] if split else unknown).append(path)
    if unknown:
        raise UserError(
            f"{folder}: cannot tell the split of {', '.join(p.name for p in unknown[:3])} (neither "
            "'train' nor 'val' in the name); rename them or move them out"
        )
    for split, paths in by_split.items():
        if not paths:
            raise UserError(f"{folder} has no {split} shards (*{split}*.bin); both splits are needed")
    return by_split


def _max_token(path: Path, count: int) -> int:
    tokens = open_tokens(path, count)
    return max((int(tokens[i : i + SCAN_TOKENS].max()) for i in range(0, count, SCAN_TOKENS)), default=-1)


def _link(target: Path, link: Path) -> None:
    """`link` -> `target` (the shard itself when they are the same path)."""
    if link.resolve() == target:
        return
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
