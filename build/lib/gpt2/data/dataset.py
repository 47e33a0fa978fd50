"""A prepared dataset on disk: `data/<name>/meta.json` plus its validated `{train,val}_NNNNNN.bin` shards.

`open_dataset` checks everything that can be checked cheaply before any training starts: meta.json is there
(it is written last, so its absence means "never prepared" or "interrupted"), every shard it lists exists and
has a valid header whose token count matches both the file size and meta.json. Token values are checked
against a model's vocabulary with `check_vocab` (from the per-shard maxima recorded at preparation) and, for
every batch, against the dataset's own vocabulary by the loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from gpt2.data.shards import open_tokens, read_header
from gpt2.errors import UserError
from gpt2.tokenizer import from_dict

META_FILE = "meta.json"
SPLITS = ("train", "val")
BUILTIN = ("shakespeare_char", "shakespeare", "openwebtext", "fineweb_edu")
"""Datasets with their own config in configs/data/ (prepared with `data=<name>`)."""


def dataset_dir(name_or_path: str, data_root: str | Path = "data") -> Path:
    """`data.name` -> its folder: a bare name lives under `data_root`; anything with a '/' is a path."""
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or len(path.parts) > 1 or name_or_path.startswith("."):
        return path
    return Path(data_root) / name_or_path


def prepare_command(name_or_path: str, data_root: str | Path = "data") -> str:
    """The command that prepares this dataset (for error messages)."""
    root = "" if str(data_root) == "data" or "/" in name_or_path else f" data_root={data_root}"
    if name_or_path in BUILTIN:
        return f"python data/prepare.py data={name_or_path}{root}"
    return f"python data/prepare.py data=text data.name={name_or_path} data.source=<your files>{root}"


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    max_token: int


class TokenDataset:
    """A validated prepared dataset. Use `open_dataset` to get one."""

    def __init__(self, dir: Path, meta: dict, shards: dict[str, list[Shard]]) -> None:
        self.dir = dir
        self.meta = meta
        self._shards = shards
        self._memmaps: dict[Path, np.memmap] = {}

    def __repr__(self) -> str:
        return f"TokenDataset({self.dir}, train={self.num_tokens('train'):,}, val={self.num_tokens('val'):,} tokens)"

    @property
    def name(self) -> str:
        return self.meta.get("name", self.dir.name)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (every token is below it)."""
        return int(self.meta["vocab_size"])

    @cached_property
    def tokenizer(self):
        """The tokenizer the dataset was prepared with (`gpt2.tokenizer.from_dict(meta["tokenizer"])`)."""
        return from_dict(self.meta["tokenizer"])

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self._shards:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return self._shards[split]

    def tokens(self, shard: Shard) -> np.memmap:
        """A shard's tokens as a read-only uint16 memmap (opened once, paged in on demand)."""
        mm = self._memmaps.get(shard.path)
        if mm is None:
            mm = self._memmaps[shard.path] = open_tokens(shard.path, shard.tokens)
        return mm

    def check_vocab(self, model_vocab_size: int) -> None:
        """UserError naming the shard if any token is >= `model_vocab_size` (from meta.json's per-shard maxima)."""
        for split in SPLITS:
            for shard in self.shards(split):
                if shard.max_token >= model_vocab_size:
                    raise UserError(
                        f"{shard.path} holds token id {shard.max_token} but the model's vocabulary has "
                        f"{model_vocab_size} tokens (the dataset's {self.meta['tokenizer']['name']} tokenizer has "
                        f"{self.vocab_size}); train a model with vocab_size >= {self.vocab_size} or re-prepare the "
                        "dataset with the model's tokenizer"
                    )

    def check_tokenizer(self, tokenizer: dict, what: str = "the checkpoint") -> None:
        """UserError unless `tokenizer` (a `to_dict()`) is the tokenizer this dataset was prepared with."""
        ours = self.meta["tokenizer"]
        if ours == tokenizer:
            return
        a, b = ours.get("name"), tokenizer.get("name")
        if a != b:
            raise UserError(
                f"dataset {self.dir} was prepared with tokenizer {a} but {what} uses {b}; re-prepare it with "
                f"data.tokenizer={b} (and overwrite=true)"
            )
        raise UserError(
            f"dataset {self.dir} has a {len(ours.get('chars', []))}-character vocabulary but {what} has a different "
            f"one ({len(tokenizer.get('chars', []))} characters): char vocabularies are built per corpus; fine-tune "
            "on a dataset prepared with the gpt2 tokenizer, or train from scratch"
        )


def open_dataset(name_or_path: str, data_root: str | Path = "data") -> TokenDataset:
    """Open and validate a prepared dataset (`data.name`: a folder under `data_root`, or a path).

    Raises UserError naming the file, with the fix, when meta.json is missing or unreadable, or a shard is
    missing, has a bad magic number or version, or a token count that disagrees with its size or meta.json.
    """
    dir = dataset_dir(name_or_path, data_root)
    meta_path = dir / META_FILE
    if not meta_path.exists():
        state = "is not prepared" if not dir.exists() else "is not prepared, or its preparation was interrupted"
        raise UserError(f"dataset {name_or_path!r} {state} ({meta_path} is missing); run: "
                        f"{prepare_command(name_or_path, data_root)}")
    try:
        meta = json.loads(meta_path.read_text())
        splits = {split: meta["splits"][split]["shards"] for split in SPLITS}
        meta["tokenizer"]["name"], meta["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable or incomplete ({type(e).__name__}: {e}); prepare the dataset "
                        f"again: {prepare_command(name_or_path, data_root)} overwrite=true") from None
    shards: dict[str, list[Shard]] = {}
    for split, records in splits.items():
        shards[split] = []
        for rec in records:
            path = dir / rec["file"]
            count = read_header(path)
            if count != rec["tokens"]:
                raise UserError(f"shard {path} holds {count} tokens but {meta_path} says {rec['tokens']}; prepare the "
                                f"dataset again with overwrite=true")
            shards[split].append(Shard(path, count, int(rec["max_token"])))
    return TokenDataset(dir, meta, shards)
