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

Packed (`packing=True`, data.packing): a sequence is a *row* of whole examples placed end to end, at most
block_size positions, instead of one padded example. The rows are made once per split by best-fit decreasing
(the longest example first, each into the fullest row it fits), which fills them to ~99% on typical chat data
where a padded example leaves most of its row empty. Batches then carry `positions` (B, T), restarting at 0 at
each example, from which the model masks attention to each example's own tokens (`gpt2.model.document_mask`):
every example is computed exactly as alone. Examples with no target within block_size + 1 tokens train nothing
and are left out of the rows. Orders, epochs (of rows: every example once), resuming and world sizes are as
above with rows for sequences.

Evaluation uses `num_batches * batch_size` sequences evenly spaced over the split (no randomness), so the same
weights always get the same loss; global eval batch j goes to rank j % W.
"""

from __future__ import annotations

import bisect
from typing import Iterator, NamedTuple

import numpy as np
import torch

from gpt2.data.dataset import TokenDataset
from gpt2.data.instructions import START, TARGET
from gpt2.errors import UserError


class Batch(NamedTuple):
    """A micro-batch: inputs x and targets y, (B, T) int64 (y is -1 where there is no loss), and for packed rows
    each token's position within its example (None otherwise: positions 0 .. T - 1)."""

    x: torch.Tensor
    y: torch.Tensor
    positions: torch.Tensor | None = None


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

    def gather(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        """Global window ids (N,) -> x, y (N, block_size) int64, y shifted by one, checked against the vocab."""
        shard_ids = np.searchsorted(self.ends, windows, side="right")
        starts = windows - np.concatenate(([0], self.ends))[shard_ids]
        out = np.empty((len(windows), self.block_size + 1), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard_ids.tolist(), starts.tolist())):
            out[row] = self.ds.tokens(self.shards[s])[start : start + self.block_size + 1]
        _check_tokens(self.ds, out, [self.shards[s] for s in shard_ids.tolist()])
        return out[:, :-1], out[:, 1:], None


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

    def sizes(self) -> np.ndarray:
        """Positions each example takes in a sequence: its tokens but the last, cut to block_size."""
        return np.minimum(self.ends - self.starts, self.block_size + 1) - 1

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        """Example ids (N,) -> x, y (N, block_size) int64: each example from position 0, padded; y is -1 except
        at the targets the loss is on."""
        x, y = self.empty(len(ids))
        for row, i in enumerate(ids.tolist()):
            self.place(i, x[row], y[row])
        _check_tokens(self.ds, x, [self.shards[s] for s in self.shard_ids[ids].tolist()])
        return x, y, None

    def empty(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """x (padding) and y (-1) of `rows` sequences, to `place` examples in."""
        T = self.block_size
        return np.full((rows, T), self.pad_id, dtype=np.int64), np.full((rows, T), -1, dtype=np.int64)

    def place(self, i: int, x: np.ndarray, y: np.ndarray) -> int:
        """Write example i's inputs and targets at the start of x and y (1-D views); returns its size."""
        shard, start = self.shards[self.shard_ids[i]], int(self.starts[i])
        n = int(min(self.ends[i] - start, self.block_size + 1)) - 1  # positions with a next token
        tokens = self.ds.tokens(shard)[start : start + n + 1].astype(np.int64)
        x[:n] = tokens[:-1]
        y[:n] = np.where(self.ds.mask(shard)[start + 1 : start + n + 1] & TARGET, tokens[1:], -1)
        return n


class _Packs:
    """The examples of one split of instruction data packed into rows of at most block_size positions, numbered
    0 .. count - 1 (see the module docstring). `examples` is the split's `_Examples`."""

    def __init__(self, ds: TokenDataset, split: str, block_size: int) -> None:
        self.ds = ds
        self.examples = examples = _Examples(ds, split, block_size)
        trained = np.flatnonzero(examples.target_counts > 0)
        sizes = examples.sizes()[trained]
        rows = best_fit(sizes, block_size)
        self.members = np.concatenate([trained[r] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
        self.row_starts = np.cumsum([0] + [len(r) for r in rows])  # row k holds members[row_starts[k]:...[k+1]]
        self.count = len(rows)
        self.target_counts = np.add.reduceat(examples.target_counts[self.members], self.row_starts[:-1])
        self.fill = float(sizes.sum() / max(1, self.count * block_size))
        self.unit = f"packed rows of {examples.count - examples.untrained:,} examples"

    def epoch(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def targets(self, ids: np.ndarray) -> int:
        return int(self.target_counts[ids].sum())

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ids (N,) -> x, y, positions (N, block_size) int64: each row's examples end to end, positions from
        0 in each; the padding after the last example is padding tokens at position 0 with no target."""
        x, y = self.examples.empty(len(ids))
        positions = np.zeros_like(x)
        for row, k in enumerate(ids.tolist()):
            offset = 0
            for i in self.members[self.row_starts[k] : self.row_starts[k + 1]].tolist():
                n = self.examples.place(i, x[row, offset:], y[row, offset:])
                positions[row, offset : offset + n] = np.arange(n)
                offset += n
        first_shards = self.examples.shard_ids[self.members[self.row_starts[ids]]]
        _check_tokens(self.ds, x, [self.examples.shards[s] for s in first_shards.tolist()])
        return x, y, positions


class _Pairs:
    """The preference pairs of one split (`data=preferences`), numbered 0 .. count - 1: pair i is examples 2i
    (chosen) and 2i + 1 (rejected), which preparation writes one after the other. A batch of N pairs is 2N padded
    sequences, the N chosen ones first; the DPO loss is a mean over pairs, so a pair counts as one target."""

    def __init__(self, ds: TokenDataset, split: str, block_size: int) -> None:
        self.examples = _Examples(ds, split, block_size)
        self.count = self.examples.count // 2
        self.unit = "preference pairs"

    def epoch(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def targets(self, ids: np.ndarray) -> int:
        return len(ids)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        return self.examples.gather(np.concatenate([2 * ids, 2 * ids + 1]))


def best_fit(sizes: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing bin packing: item indices grouped into bins whose sizes sum to <= capacity. Items go
    longest first (ties by index), each into the open bin with the least room that holds it, else a new bin.
    Deterministic; O(n log capacity)."""
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free room of the open bins
    with_room: dict[int, list[int]] = {}  # free room -> bins with that room
    for i in np.lexsort((np.arange(len(sizes)), -sizes)).tolist():
        size = int(sizes[i])
        j = bisect.bisect_left(rooms, size)
        if j < len(rooms):
            room = rooms[j]
            b = with_room[room].pop()
            if not with_room[room]:
                del with_room[room], rooms[j]
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        if room - size:
            if room - size not in with_room:
                bisect.insort(rooms, room - size)
                with_room[room - size] = []
            with_room[room - size].append(b)
    return [np.array(b, dtype=np.int64) for b in bins]


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


def sequences(ds: TokenDataset, split: str, block_size: int, packing: bool = False) -> _Windows | _Examples | _Packs:
    """A split's training sequences: windows of a token stream, or the examples of instruction data, one per
    sequence or packed into rows."""
    if not ds.has_examples:
        return _Windows(ds, split, block_size)
    if ds.has_pairs:
        return _Pairs(ds, split, block_size)
    return (_Packs if packing else _Examples)(ds, split, block_size)


def _to_device(x: np.ndarray, y: np.ndarray, positions: np.ndarray | None, device: torch.device) -> Batch:
    """(B, T) int64 arrays -> a Batch of tensors on `device`; one pinned, non-blocking copy on CUDA."""
    t = torch.from_numpy(np.stack((x, y) if positions is None else (x, y, positions)))  # (2 or 3, B, T)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return Batch(*t.unbind(0))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TokenLoader:
    """Training batches for one rank (see the module docstring for the sampling scheme).

    `next_batch()` returns a `Batch`: x, y int64 (batch_size, block_size) on `device`, y being x shifted by one
    token, and for packed rows the positions.
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
        packing: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0 for the data loader, got {seed}")
        self.sequences = sequences(ds, split, block_size, packing)
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

    def next_batch(self) -> Batch:
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


def resolve_packing(ds: TokenDataset, requested: bool | None, resumed: bool | None) -> bool:
    """data.packing for a run: as requested, else on for instruction data; `resumed` is the choice of the run
    being resumed (None when starting), which a resume keeps (the loader's position counts its sequences)."""
    if requested and not ds.has_examples:
        raise UserError(
            f"data.packing=true needs instruction data (prepared with data=instructions); {ds.dir} is a token "
            "stream, whose windows are full already: drop data.packing"
        )
    if requested and ds.has_pairs:
        raise UserError(f"data.packing=true does not apply to the preference pairs of {ds.dir}: drop data.packing")
    if resumed is not None and requested is not None and requested != resumed:
        raise UserError(
            f"data.packing={str(requested).lower()} disagrees with the run being resumed, which trains with "
            f"data.packing={str(resumed).lower()}; drop the override or use a new out_dir"
        )
    if requested is not None:
        return requested
    return resumed if resumed is not None else ds.has_examples and not ds.has_pairs


def check_block_size(ds: TokenDataset, block_size: int) -> None:
    """UserError unless both splits hold a whole `block_size + 1`-token window, or for instruction data a loss
    target within the first `block_size + 1` tokens of some example (before any model is built): without one,
    training learns nothing and the val loss is 0 / 0."""
    for split in ("train", "val"):
        items = sequences(ds, split, block_size)
        items = getattr(items, "examples", items)  # (pairs: their examples)
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
    packing: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """The deterministic evaluation batches of `split` for this rank, as `Batch`es like `TokenLoader.next_batch`.

    The global set is `num_batches` batches of windows evenly spaced over the split (the same on every call);
    rank r gets global batches r, r + W, r + 2W, ... < num_batches, so ranks get disjoint parts and, when
    num_batches % W != 0, the first num_batches % W ranks get one more batch (average with the counts).
    Errors (block_size too large, unknown split) are raised here, before the first batch.
    """
    _check_rank(rank, world_size)
    if num_batches < 1 or batch_size < 1:
        raise UserError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
    items = sequences(ds, split, block_size, packing)
    total = num_batches * batch_size
    dev = torch.device(device)

    def batches() -> Iterator[Batch]:
        for j in range(rank, num_batches, world_size):
            m = np.arange(j * batch_size, (j + 1) * batch_size, dtype=np.int64)
            yield _to_device(*items.gather(m * items.count // total), dev)

    return batches()
