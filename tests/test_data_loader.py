"""The loader: round trip, resume == uninterrupted, 1 rank == 2 ranks, deterministic eval, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2.config import DataConfig
from gpt2.data import TokenLoader, eval_batches, open_dataset
from gpt2.data.prepare import prepare
from gpt2.data.shards import HEADER_BYTES, HEADER_INTS, MAGIC, VERSION
from gpt2.errors import UserError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def write_shard(path, tokens: np.ndarray) -> None:
    """A shard in the llm.c format (README, "Preparing data"), written by hand: a header of 256 int32, then uint16
    tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens).astype("<u2").tobytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """data_root holding `chars` (char tokenizer, one document split 90/10) in 4 train shards."""
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(TEXT)
    prepare(DataConfig(name="chars", tokenizer="char", source=str(root / "corpus.txt"), shard_tokens=5000), root)
    return root


@pytest.fixture
def ds(root):
    return open_dataset("chars", data_root=root)


def copy_dataset(root, tmp_path):
    import shutil

    return shutil.copytree(root / "chars", tmp_path / "chars")


def test_round_trip_text_to_shards_to_batches(ds):
    assert len(ds.shards("train")) == 4
    stream = np.concatenate([np.asarray(ds.tokens(s)) for s in ds.shards("train")]).astype(np.int64)
    assert ds.tokenizer.decode(stream.tolist()) == TEXT[: int(len(TEXT) * 0.9)]
    loader = TokenLoader(ds, "train", batch_size=8, block_size=16, seed=3)
    starts = np.concatenate(([0], np.cumsum([s.tokens for s in ds.shards("train")])))
    ends = np.cumsum([s.tokens - 16 for s in ds.shards("train")])
    for k in range(5):
        windows = loader.global_batch(k)
        x, y, _ = loader.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        for row, w in enumerate(windows):
            shard = int(np.searchsorted(ends, w, side="right"))
            offset = starts[shard] + w - (ends[shard - 1] if shard else 0)  # windows never cross shards
            assert x[row].tolist() == stream[offset : offset + 16].tolist()
            assert y[row].tolist() == stream[offset + 1 : offset + 17].tolist()


def batches(loader, n):
    return [torch.stack(loader.next_batch()[:2]) for _ in range(n)]


def test_resumed_loader_equals_uninterrupted(ds):
    full = batches(TokenLoader(ds, batch_size=4, block_size=32, seed=7), 10)
    first = TokenLoader(ds, batch_size=4, block_size=32, seed=7)
    head = batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # plain types, survives a checkpoint
    resumed = TokenLoader(ds, batch_size=4, block_size=32, seed=999)
    resumed.load_state_dict(state)
    tail = batches(resumed, 6)
    for a, b in zip(full, head + tail):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], batches(TokenLoader(ds, batch_size=4, block_size=32, seed=8), 1)[0])


def test_two_ranks_cover_the_global_batches_of_one_rank(ds):
    one = batches(TokenLoader(ds, batch_size=4, block_size=32, seed=1), 8)  # global micro-batches 0..7
    ranks = [TokenLoader(ds, batch_size=4, block_size=32, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        for r, loader in enumerate(ranks):
            assert torch.equal(torch.stack(loader.next_batch()[:2]), one[2 * step + r])
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"position": 8, "seed": 1}
    # A 2-rank state resumes on 1 rank (and vice versa) at the next global micro-batch.
    single = TokenLoader(ds, batch_size=4, block_size=32, seed=1)
    single.load_state_dict(ranks[1].state_dict())
    assert torch.equal(
        torch.stack(single.next_batch()[:2]), batches(TokenLoader(ds, batch_size=4, block_size=32, seed=1), 9)[8]
    )


def test_eval_batches_are_fixed_and_split_across_ranks(ds):
    def run(rank=0, world=1):
        return [
            torch.stack(b[:2])
            for b in eval_batches(ds, "val", num_batches=5, batch_size=3, block_size=20, rank=rank, world_size=world)
        ]

    all_ = run()
    assert len(all_) == 5 and all(torch.equal(a, b) for a, b in zip(all_, run()))
    r0, r1 = run(0, 2), run(1, 2)
    assert [len(r0), len(r1)] == [3, 2]
    assert all(torch.equal(a, b) for a, b in zip(r0 + r1, all_[0::2] + all_[1::2]))
    x, y = all_[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(UserError, match="not prepared.*run: python data/prepare.py data=shakespeare_char"):
        open_dataset("shakespeare_char", data_root=tmp_path)
    with pytest.raises(UserError, match="data=text data.name=mine data.source=<your files> data_root="):
        open_dataset("mine", data_root=tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f.write_bytes(np.int32(123).tobytes() + f.read_bytes()[4:]), "has magic number 123"),
        (lambda f: f.write_bytes(f.read_bytes()[:4] + np.int32(7).tobytes() + f.read_bytes()[8:]), "version 7"),
        (lambda f: f.write_bytes(f.read_bytes()[:-2]), "header says 5000 tokens .* but the file is"),
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "shorter than the 1024-byte header"),
        (lambda f: f.unlink(), "is missing"),
        (lambda f: write_shard(f, np.zeros(10, dtype=np.uint16)), "holds 10 tokens but .*meta.json says 5000"),
    ],
)
def test_corrupt_shards_are_rejected_naming_the_file(root, tmp_path, corrupt, message):
    corrupt(copy_dataset(root, tmp_path) / "train_000001.bin")
    with pytest.raises(UserError, match=f"train_000001.bin.*{message}|{message}.*train_000001.bin"):
        open_dataset(str(tmp_path / "chars"))


def test_corrupt_meta_is_rejected(root, tmp_path):
    (copy_dataset(root, tmp_path) / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is unreadable.*overwrite=true"):
        open_dataset(str(tmp_path / "chars"))


def test_token_outside_the_vocab_is_rejected(root, tmp_path, ds):
    small = ds.vocab_size - 1  # the largest id appears in the first shard
    with pytest.raises(
        UserError,
        match=rf"train_000000.bin holds token id {small} but the model's vocabulary has "
        rf"{small} tokens",
    ):
        ds.check_vocab(small)
    ds.check_vocab(ds.vocab_size)
    # A shard whose bytes were changed after preparation: caught when a batch reads it.
    path = copy_dataset(root, tmp_path) / "val_000000.bin"
    tokens = np.fromfile(path, dtype=np.uint16, offset=HEADER_BYTES)
    tokens[:] = 60000
    write_shard(path, tokens)
    bad = open_dataset(str(tmp_path / "chars"))
    with pytest.raises(UserError, match="val_000000.bin holds token id 60000, outside the dataset's vocabulary"):
        next(eval_batches(bad, "val", num_batches=1, batch_size=2, block_size=8))


def test_tokenizer_mismatch(ds):
    ds.check_tokenizer(ds.meta["tokenizer"])
    with pytest.raises(
        UserError,
        match="prepared with tokenizer char but the checkpoint uses gpt2; re-prepare it with data.tokenizer=gpt2",
    ):
        ds.check_tokenizer({"name": "gpt2"})
    with pytest.raises(UserError, match="different one"):
        ds.check_tokenizer({"name": "char", "chars": ["a", "b"]})


def test_block_size_too_large_and_other_bad_arguments(ds):
    val = ds.num_tokens("val")
    with pytest.raises(UserError, match=f"block_size={val} is too large for the val split.*holds {val} tokens"):
        TokenLoader(ds, "val", batch_size=1, block_size=val)
    TokenLoader(ds, "val", batch_size=1, block_size=val - 1).next_batch()  # exactly fits
    with pytest.raises(UserError, match="block_size=5000 is too large for the train split"):
        eval_batches(ds, "train", num_batches=1, batch_size=1, block_size=5000)  # no shard holds 5001 tokens
    with pytest.raises(UserError, match="unknown split 'test'"):
        TokenLoader(ds, "test", batch_size=1, block_size=8)
    with pytest.raises(UserError, match="seed must be >= 0"):
        TokenLoader(ds, batch_size=1, block_size=8, seed=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_on_device(ds):
    x, y, _ = TokenLoader(ds, batch_size=2, block_size=8, device=torch.device("cuda")).next_batch()
    assert x.is_cuda and y.is_cuda and torch.equal(x[:, 1:].cpu(), y[:, :-1].cpu())


def test_epoch_order_sees_every_window_once_per_epoch_for_1_and_2_ranks_and_resumes(ds):
    """data.order=epoch: the non-overlapping windows, each once per epoch in a seeded permutation (epochs
    differ); 2 ranks get the global micro-batches of 1 rank; a loader resumed mid-epoch goes on identically."""
    B, T = 4, 16
    one = TokenLoader(ds, "train", batch_size=B, block_size=T, seed=5, order="epoch")
    E = len(one.epoch)
    starts = [
        w - one.sequences.ends[s - 1] if s else w
        for w in one.epoch
        for s in [int(np.searchsorted(one.sequences.ends, w, side="right"))]
    ]
    assert all(start % T == 0 for start in starts)  # non-overlapping: starts at multiples of block_size
    assert E == sum((s.tokens - T + T - 1) // T for s in ds.shards("train"))
    per_epoch = -(-2 * E // B)  # micro-batches covering two epochs
    seen = np.concatenate([one.global_batch(k) for k in range(per_epoch)])[: 2 * E]
    first, second = seen[:E], seen[E:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(one.epoch.tolist())
    assert not np.array_equal(first, second)  # another permutation each epoch

    ranks = [
        TokenLoader(ds, "train", batch_size=B, block_size=T, seed=5, order="epoch", rank=r, world_size=2)
        for r in (0, 1)
    ]
    singles = [one.next_batch()[0] for _ in range(6)]
    for i in range(3):
        for r in (0, 1):
            assert torch.equal(ranks[r].next_batch()[0], singles[2 * i + r])

    state = one.state_dict()
    resumed = TokenLoader(ds, "train", batch_size=B, block_size=T, seed=5, order="epoch")
    resumed.load_state_dict(state)
    for _ in range(per_epoch):  # across the epoch boundary
        assert torch.equal(resumed.next_batch()[0], one.next_batch()[0])
    other_seed = TokenLoader(ds, "train", batch_size=B, block_size=T, seed=6, order="epoch")
    assert not np.array_equal(
        other_seed.global_batch(0),
        TokenLoader(ds, "train", batch_size=B, block_size=T, seed=5, order="epoch").global_batch(0),
    )
