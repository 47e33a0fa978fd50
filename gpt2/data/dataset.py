"""A prepared dataset on disk: `data/<name>/meta.json` plus its validated `{train,val}_NNNNNN.bin` shards.

`open_dataset` checks everything that can be checked cheaply before any training starts: meta.json is there
(it is written last, so its absence means "never prepared" or "interrupted"), every shard it lists exists and
has a valid header whose token count matches both the file size and meta.json. Token values are checked
against a model's vocabulary with `check_vocab` (from the per-shard maxima recorded at preparation) and, for
every batch, against the dataset's own vocabulary by the loader.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.config import to_dict
from gpt2.data.shards import open_tokens, read_header
from gpt2.errors import UserError
from gpt2.files import atomic_write_text
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
    """The command that prepares this dataset (for error messages): `gpt2-prepare ...` when the user runs the
    console scripts (which work from any directory), else `python data/prepare.py ...`."""
    script = "gpt2-prepare" if Path(sys.argv[0]).name.startswith("gpt2-") else "python data/prepare.py"
    root = "" if str(data_root) == "data" or "/" in name_or_path else f" data_root={data_root}"
    if name_or_path in BUILTIN:
        return f"{script} data={name_or_path}{root}"
    return f"{script} data=text data.name={name_or_path} data.source=<your files>{root}"


def new_meta(
    data: Any,
    tokenizer: Any,
    shards: dict[str, list[dict]],
    documents: dict[str, int] | None,
    *,
    source: str,
    val_source: str | None,
    split_rule: str,
) -> dict:
    """A dataset's meta.json: tokenizer, vocabulary, shards per split ({file, tokens, max_token}) and provenance."""
    return {
        "name": data.name,
        "format": {"magic": 20240520, "version": 1, "header_bytes": 1024, "dtype": "uint16"},
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "splits": {
            split: {
                "tokens": sum(r["tokens"] for r in recs),
                "documents": (documents or {}).get(split),
                "num_shards": len(recs),
                "shards": recs,
            }
            for split, recs in shards.items()
        },
        "source": source,
        "val_source": val_source,
        "split_rule": split_rule,
        "seed": data.seed,
        "data": to_dict(data),
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_meta(dir: Path, meta: dict) -> None:
    """Write `dir/meta.json` atomically: a folder with it is a complete dataset."""
    atomic_write_text(dir / META_FILE, json.dumps(meta, indent=1) + "\n")


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    max_token: int
    mask_path: Path | None = None
    """Instruction data: the shard's per-token loss/start mask (see gpt2.data.instructions)."""


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
    def has_examples(self) -> bool:
        """Instruction data: examples with loss masks (gpt2.data.instructions), not a plain token stream."""
        return bool(self.meta.get("examples"))

    @property
    def has_pairs(self) -> bool:
        """Preference data: examples in (chosen, rejected) pairs, for DPO (gpt2.data.instructions)."""
        return bool(self.meta.get("pairs"))

    @property
    def chat_template(self) -> str | None:
        """The chat template its chat rows were rendered with (gpt2.chat), or None: no chats."""
        return self.meta.get("chat_template")

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (every token is below it)."""
        return int(self.meta["vocab_size"])

    @cached_property
    def fingerprint(self) -> str:
        """Identifies this preparation (its shards and when it was made): a checkpoint records it, so a resume
        on a re-prepared dataset can say that the data changed under the run."""
        what = {
            "prepared_at": self.meta.get("prepared_at"),
            "splits": {s: self.meta["splits"][s]["shards"] for s in SPLITS},
        }
        return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

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

    def mask(self, shard: Shard) -> np.ndarray:
        """An instruction shard's uint8 mask (one per token; bits in gpt2.data.instructions), memory-mapped."""
        mm = self._memmaps.get(shard.mask_path)
        if mm is None:
            mm = self._memmaps[shard.mask_path] = np.load(shard.mask_path, mmap_mode="r")
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


def _read_meta(path: Path, fix: str) -> dict:
    """meta.json, checked field by field: a missing or mistyped field is one UserError naming it and `fix`."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); {fix}") from None

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise UserError(f"{path}: field {field} is missing or not {what}; {fix}")

    need(isinstance(meta, dict), "(top level)", "an object")
    tok = meta.get("tokenizer")
    need(isinstance(tok, dict) and tok.get("name") in ("gpt2", "char"), "tokenizer.name", "'gpt2' or 'char'")
    if tok["name"] == "char":
        need(isinstance(tok.get("chars"), list), "tokenizer.chars", "a list of characters")
    need(isinstance(meta.get("vocab_size"), int) and meta["vocab_size"] > 0, "vocab_size", "a positive integer")
    need(isinstance(meta.get("splits"), dict), "splits", "an object")
    for split in SPLITS:
        entry = meta["splits"].get(split)
        records = entry.get("shards") if isinstance(entry, dict) else None
        need(isinstance(records, list), f"splits.{split}.shards", "a list")
        for i, rec in enumerate(records):
            for key, kind in (("file", str), ("tokens", int), ("max_token", int)):
                need(
                    isinstance(rec, dict) and isinstance(rec.get(key), kind),
                    f"splits.{split}.shards[{i}].{key}",
                    "a string" if kind is str else "an integer",
                )
    return meta


def open_dataset(name_or_path: str, data_root: str | Path = "data") -> TokenDataset:
    """Open and validate a prepared dataset (`data.name`: a folder under `data_root`, or a path).

    Raises UserError naming the file, with the fix, when meta.json is missing or unreadable, or a shard is
    missing, has a bad magic number or version, or a token count that disagrees with its size or meta.json.
    """
    dir = dataset_dir(name_or_path, data_root)
    meta_path = dir / META_FILE
    if not meta_path.exists():
        if dir.is_dir() and any(dir.glob("*.bin")):
            raise UserError(
                f"{dir} holds .bin shards but no meta.json (shards from llm.c's tools?); adopt them with: "
                f"{prepare_command(name_or_path, data_root).split(' data=')[0]} data=llmc data.name={name_or_path} "
                f"data.source={dir}, or prepare the corpus again: {prepare_command(name_or_path, data_root)}"
            )
        state = "is not prepared" if not dir.exists() else "is not prepared, or its preparation was interrupted"
        raise UserError(
            f"dataset {name_or_path!r} {state} ({meta_path} is missing); run: "
            f"{prepare_command(name_or_path, data_root)}"
        )
    meta = _read_meta(
        meta_path, f"prepare the dataset again: {prepare_command(name_or_path, data_root)} overwrite=true"
    )
    shards: dict[str, list[Shard]] = {}
    for split in SPLITS:
        shards[split] = []
        for rec in meta["splits"][split]["shards"]:
            path = dir / rec["file"]
            count = read_header(path)
            if count != rec["tokens"]:
                raise UserError(
                    f"shard {path} holds {count} tokens but {meta_path} says {rec['tokens']}; prepare the "
                    f"dataset again with overwrite=true"
                )
            mask = _check_mask(dir, rec, count, meta_path) if meta.get("examples") else None
            shards[split].append(Shard(path, count, int(rec["max_token"]), mask))
    return TokenDataset(dir, meta, shards)


def _check_mask(dir: Path, rec: dict, tokens: int, meta_path: Path) -> Path:
    """The path of a shard's loss mask, checked to hold one uint8 per token (a UserError names it otherwise)."""
    fix = "prepare the dataset again with overwrite=true"
    if not isinstance(rec.get("mask"), str):
        raise UserError(
            f'{meta_path}: shard {rec["file"]} has no "mask" file although the dataset holds examples; {fix}'
        )
    path = dir / rec["mask"]
    try:
        mask = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"loss mask {path} is missing or unreadable ({type(e).__name__}: {e}); {fix}") from None
    if mask.dtype != np.uint8 or mask.shape != (tokens,):
        raise UserError(
            f"loss mask {path} holds {mask.shape} {mask.dtype} values for a shard of {tokens} tokens; {fix}"
        )
    return path
