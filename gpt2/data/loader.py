"""Batches of (x, y) from a prepared dataset: random windows for training, fixed windows for evaluation.

Sampling (as nanoGPT): a *window* is `block_size + 1` consecutive tokens inside one shard; the windows of a
split are numbered globally across its shards. Training draws a single global stream of micro-batches
k = 0, 1, 2, ...: micro-batch k is `batch_size` windows drawn uniformly (with replacement) by a generator seeded
with (seed, k), so it is a pure function of (seed, k) and the data. Rank r of W calls `next_batch` for the
i-th time and gets global micro-batch `position + i * W + r`. Hence 1 process with 2 micro-steps and 2
processes with 1 micro-step each see the same micro-batches {0, 1} at step 0, and the state to resume is one
number (`position`, the micro-batches consumed by all ranks together), the same on every rank and valid for
any world size.

`order="epoch"` (data.order=epoch) draws without replacement instead: an epoch is the split's
non-overlapping windows (starts 0, block_size, 2 block_size, ... in each shard), visited in a permutation seeded
with (seed, epoch); global micro-batch k holds positions [k B, (k + 1) B) of the endless sequence epoch 0, epoch
1, ..., so every window is seen once per epoch, and resuming and world sizes work as above.

Instruction data (a dataset with loss masks, gpt2.data.instructions) has *examples* where token data has windows:
each example is one sequence, its first block_size + 1 tokens, padded at the end; targets are -1 wherever the
loss is not (prompts, padding), and the same orders, resuming and world sizes apply with examples for windows.
Since sequences then hold different numbers of targets, `micro_batch_weights` gives each micro-batch its share
of the step's targets, so that a step's loss is the mean over all its target tokens, whatever the accumulation.

Evaluation uses `num_batches * batch_size` sequences evenly spaced over the split (no randomness), so the same
weights always get the same loss; global eval batch j goes to rank j % W.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from gpt2.data.dataset import TokenDataset
from gpt2.data.instructions import START, TARGET
from gpt2.errors import UserError


class _Windows:
    """The `block_size + 1`-token windows of one split, numbered 0 .. count - 1 across its shards."""

    def __init__(self, ds: TokenDataset, split: str, block_size: int) -> None:
        self.ds, self.split, self.block_size = ds, split, block_size
        self.shards = _shards(ds, split, block_size)
        # A shard of n tokens has n - block_size windows (starts 0 .. n - block_size - 1).
        per_shard = np.array([max(0, s.tokens - block_size) for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(per_shard)
        self.count = int(self.ends[-1])
        if self.count == 0:
            largest = max((s.tokens for s in self.shards), default=0)
            more = " or raise data.val_fraction and re-prepare" if split == "val" else ""
            raise UserError(
                f"block_size={block_size} is too large for the {split} split of {ds.dir}: its largest shard holds "
                f"{largest} tokens and one sequence needs block_size + 1 = {block_size + 1}; lower "
                f"model.block_size{more}"
            )
        self.unit = f"windows of {block_size} tokens"

    def epoch(self) -> np.ndarray:
        """The ids of the windows that start at multiples of block_size in their shard: one epoch's windows."""
        offsets = np.concatenate(([0], self.ends[:-1]))
        per_shard = [
            offset + np.arange(0, max(0, s.tokens - self.block_size), self.block_size, dtype=np.int64)
            for offset, s in zip(offsets.tolist(), self.shards)
        ]
        return np.concatenate(per_shard)

    def targets(self, ids: np.ndarray) -> int:
        """Loss targets in these windows: all their tokens."""
        return len(ids) * self.block_size

    def gather(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global window ids (N,) -> x, y (N, block_size) int64, y shifted by one, checked against the vocab."""
        shard_ids = np.searchsorted(self.ends, windows, side="right")
        starts = windows - np.concatenate(([0], self.ends))[shard_ids]
        out = np.empty((len(windows), self.block_size + 1), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard_ids.tolist(), starts.tolist())):
            out[row] = self.ds.tokens(self.shards[s])[start : start + self.block_size + 1]
        _check_tokens(self.ds, out, [self.shards[s] for s in shard_ids.tolist()])
        return out[:, :-1], out[:, 1:]


class _Examples:
    """The examples of one split of instruction data, numbered 0 .. count - 1 across its shards: each is one
    sequence (see the module docstring)."""

    def __init__(self, ds: TokenDataset, split: str, block_size: int) -> None:
        self.ds, self.split, self.block_size = ds, split, block_size
        self.shards = _shards(ds, split, block_size)
        shard_ids, starts, ends, targets = [], [], [], []
        for i, shard in enumerate(self.shards):
            mask = np.asarray(ds.mask(shard))
            begin = np.flatnonzero(mask & START)
            end = np.append(begin[1:], shard.tokens)
            shard_ids.append(np.full(len(begin), i))
            starts.append(begin)
            ends.append(end)
            targets.append(_targets_within(mask, begin, np.minimum(end, begin + block_size + 1)))
        self.shard_ids, self.starts, self.ends = (np.concatenate(a) for a in (shard_ids, starts, ends))
        self.target_counts = np.concatenate(targets)  # per example, within its first block_size + 1 tokens
        self.count = len(self.starts)
        self.truncated = int((self.ends - self.starts > block_size + 1).sum())
        self.untrained = int((self.target_counts == 0).sum())
        self.unit = "examples"
        self.pad_id = ds.meta.get("eot_id") or 0

    def epoch(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def targets(self, ids: np.ndarray) -> int:
        return int(self.target_counts[ids].sum())

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Example ids (N,) -> x, y (N, block_size) int64: each example from position 0, padded; y is -1 except
        at the targets the loss is on."""
        T = self.block_size
        x = np.full((len(ids), T), self.pad_id, dtype=np.int64)
        y = np.full((len(ids), T), -1, dtype=np.int64)
        shards = [self.shards[s] for s in self.shard_ids[ids].tolist()]
        for row, (shard, start, end) in enumerate(zip(shards, self.starts[ids].tolist(), self.ends[ids].tolist())):
            n = min(end - start, T + 1) - 1  # positions with a next token
            tokens = self.ds.tokens(shard)[start : start + n + 1].astype(np.int64)
            x[row, :n] = tokens[:-1]
            y[row, :n] = np.where(self.ds.mask(shard)[start + 1 : start + n + 1] & TARGET, tokens[1:], -1)
        _check_tokens(self.ds, x, shards)
        return x, y


def _shards(ds: TokenDataset, split: str, block_size: int) -> list:
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    shards = ds.shards(split)
    if not shards:
        raise UserError(
            f"the {split} split of {ds.dir} is empty ({ds.meta.get('split_rule', '')}); re-prepare it with "
            "data.val_fraction > 0 or a data.val_source (and overwrite=true)"
        )
    return shards


def _targets_within(mask: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """For each example [start, stop): how many of its tokens after the first are targets (int64)."""
    bits = np.zeros(len(mask) + 1, dtype=np.uint8)
    bits[:-1] = mask & TARGET
    first = starts + 1
    sums = np.add.reduceat(bits, np.stack([first, stops], axis=1).ravel(), dtype=np.int64)[::2]
    return np.where(first < stops, sums, 0)


def _check_tokens(ds: TokenDataset, rows: np.ndarray, shards: list) -> None:
    """UserError naming the shard when a row holds a token outside the dataset's vocabulary (a corrupt shard)."""
    bad = rows.max(axis=1) >= ds.vocab_size
    if bad.any():
        shard = shards[int(np.argmax(bad))]
        raise UserError(
            f"{shard.path} holds token id {int(rows[bad].max())}, outside the dataset's vocabulary "
            f"of {ds.vocab_size} (corrupt shard); prepare the dataset again with overwrite=true"
        )


def sequences(ds: TokenDataset, split: str, block_size: int) -> _Windows | _Examples:
    """A split's training sequences: windows of a token stream, or the examples of instruction data."""
    return (_Examples if ds.has_examples else _Windows)(ds, split, block_size)


def _to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 inputs and targets -> tensors on `device`; one pinned, non-blocking copy on CUDA."""
    t = torch.from_numpy(np.stack((x, y)))  # (2, B, T), contiguous
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[0], t[1]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TokenLoader:
    """Training batches for one rank (see the module docstring for the sampling scheme).

    `next_batch()` returns x, y: int64 (batch_size, block_size) on `device`, y being x shifted by one token.
    `state_dict()`/`load_state_dict()` save and restore the position: a restored loader yields exactly the
    batches an uninterrupted one would have.
    """

    def __init__(
        self,
        ds: TokenDataset,
        split: str = "train",
        *,
        batch_size: int,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        order: str = "random",
        device: torch.device | str = "cpu",
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0 for the data loader, got {seed}")
        self.sequences = sequences(ds, split, block_size)
        self.epoch = self.sequences.epoch()  # (E,) sequence ids: what an epoch visits
        self.order = order
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> its order, for the epochs in use
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.device = torch.device(device)
        self.position = 0  # global micro-batches consumed (by all ranks) before this loader's first call
        self.calls = 0  # next_batch calls on this rank since `position`

    def global_batch(self, k: int) -> np.ndarray:
        """The sequence ids of global micro-batch k: a pure function of (seed, k) and the split."""
        if self.order == "random":
            rng = np.random.default_rng([self.seed, k])
            return rng.integers(0, self.sequences.count, size=self.batch_size)
        E = len(self.epoch)
        epoch, index = np.divmod(np.arange(k * self.batch_size, (k + 1) * self.batch_size), E)
        return np.array([self._permutation(e)[i] for e, i in zip(epoch.tolist(), index.tolist())], dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s sequence ids in its seeded order (kept for the last two epochs used)."""
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = self.epoch[rng.permutation(len(self.epoch))]
        return self._permutations[epoch]

    def next_index(self) -> int:
        """The global micro-batch the next `next_batch()` returns."""
        return self.position + self.calls * self.world_size + self.rank

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.next_index()
        self.calls += 1
        return _to_device(*self.sequences.gather(self.global_batch(k)), self.device)

    def micro_batch_weights(self, micro_steps: int) -> list[float]:
        """The loss weights of this rank's next `micro_steps` micro-batches: weight x (a micro-batch's mean loss),
        summed over micro-steps and averaged over ranks (as DDP averages gradients), is the mean loss over every
        target of the step's global batch. For token windows every weight is 1 / micro_steps. Computed on the
        host from the data alone: no device work and no communication."""
        if isinstance(self.sequences, _Windows):
            return [1 / micro_steps] * micro_steps
        first = self.position + self.calls * self.world_size  # the step's first global micro-batch
        counts = [
            self.sequences.targets(self.global_batch(k)) for k in range(first, first + micro_steps * self.world_size)
        ]
        total = sum(counts)
        mine = counts[self.rank :: self.world_size]
        return [n * self.world_size / total if total else 0.0 for n in mine]

    def state_dict(self) -> dict:
        """{"position": global micro-batches consumed by all ranks, "seed": seed}; equal on every rank."""
        return {"position": self.position + self.calls * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self.calls = 0


def check_block_size(ds: TokenDataset, block_size: int) -> None:
    """UserError unless both splits hold a whole `block_size + 1`-token window, or for instruction data a loss
    target within the first `block_size + 1` tokens of some example (before any model is built): without one,
    training learns nothing and the val loss is 0 / 0."""
    for split in ("train", "val"):
        items = sequences(ds, split, block_size)
        if isinstance(items, _Examples) and not items.target_counts.any():
            raise UserError(
                f"none of the {items.count:,} {split} examples of {ds.dir} has a completion token within its first "
                f"block_size + 1 = {block_size + 1} tokens (the prompts fill the context), so there is nothing to "
                "train or evaluate on: raise model.block_size or shorten the prompts"
            )


def eval_batches(
    ds: TokenDataset,
    split: str,
    *,
    num_batches: int,
    batch_size: int,
    block_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The deterministic evaluation batches of `split` for this rank, as (x, y) like `TokenLoader.next_batch`.

    The global set is `num_batches` batches of windows evenly spaced over the split (the same on every call);
    rank r gets global batches r, r + W, r + 2W, ... < num_batches, so ranks get disjoint parts and, when
    num_batches % W != 0, the first num_batches % W ranks get one more batch (average with the counts).
    Errors (block_size too large, unknown split) are raised here, before the first batch.
    """
    _check_rank(rank, world_size)
    if num_batches < 1 or batch_size < 1:
        raise UserError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
    items = sequences(ds, split, block_size)
    total = num_batches * batch_size
    dev = torch.device(device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for j in range(rank, num_batches, world_size):
            m = np.arange(j * batch_size, (j + 1) * batch_size, dtype=np.int64)
            yield _to_device(*items.gather(m * items.count // total), dev)

    return batches()
