"""The token shard format, compatible with llm.c: write, read and validate `{split}_NNNNNN.bin` files.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, the rest 0) followed by
the tokens as uint16. Shards are written to `<file>.tmp` and renamed into place once complete, so a file with
the final name is always whole; an interrupted preparation leaves at most a `.tmp` file, which nothing reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpt2.errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1  # token ids must fit uint16


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header.tobytes()


def read_header(path: Path) -> int:
    """Validate a shard's header against its size and return its token count.

    Raises UserError naming the file for a missing file, a bad magic number or version, or a token count
    that disagrees with the file size (a truncated or padded file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; prepare the dataset again (overwrite=true)") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header; re-prepare it")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise UserError(f"shard {path} has magic number {magic}, expected {MAGIC}: not a token shard; re-prepare it")
    if version != VERSION:
        raise UserError(f"shard {path} has format version {version}, this code reads version {VERSION}; re-prepare it")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise UserError(
            f"shard {path}: header says {count} tokens ({expected} bytes) but the file is {size} bytes "
            "(truncated or corrupt); re-prepare the dataset with overwrite=true"
        )
    return count


def open_tokens(path: Path, num_tokens: int) -> np.memmap:
    """The tokens of a validated shard as a read-only uint16 memmap (nothing is loaded until indexed)."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


class ShardWriter:
    """Streams tokens of one split into shards of `shard_tokens` tokens each, in bounded memory.

    Tokens are appended to `<split>_NNNNNN.bin.tmp` as they come; when a shard is full its header gets the
    count and the file is fsynced and renamed to its final name. `close()` finishes the last, partial shard
    and returns one record per shard: {"file", "tokens", "max_token"}.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        assert shard_tokens >= 1
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.num_tokens = 0
        self._file = None
        self._count = 0  # tokens in the open shard
        self._max = -1

    def write(self, tokens: np.ndarray) -> None:
        """Append uint16 tokens, splitting them across shards as they fill."""
        assert tokens.dtype == TOKEN_DTYPE
        while tokens.size:
            if self._file is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self._count)
            part = tokens[:take]
            self._file.write(part.astype("<u2", copy=False).tobytes())
            self._max = max(self._max, int(part.max()))
            self._count += take
            self.num_tokens += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def end_shard(self) -> None:
        """Finish the open shard now, even if it is not full (the next write starts a new one)."""
        if self._file is not None:
            self._finish()

    def close(self) -> list[dict]:
        self.end_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the open temp file (on errors), leaving only complete shards behind."""
        if self._file is not None:
            self._file.close()
            self._tmp_path().unlink(missing_ok=True)
            self._file = None

    def _path(self) -> Path:
        return self.out_dir / shard_name(self.split, len(self.shards))

    def _tmp_path(self) -> Path:
        return self._path().with_name(self._path().name + ".tmp")

    def _open(self) -> None:
        self._file = open(self._tmp_path(), "wb")
        self._file.write(_header(0))  # placeholder: an unfinished file never passes validation
        self._count, self._max = 0, -1

    def _finish(self) -> None:
        f = self._file
        f.seek(0)
        f.write(_header(self._count))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        path = self._path()
        os.replace(self._tmp_path(), path)
        self.shards.append({"file": path.name, "tokens": self._count, "max_token": self._max})


def val_choice(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of `n_docs` documents (or rows) are held out for validation: `val_fraction` of them, chosen with
    `seed`, at least one and at most all but one."""
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask
