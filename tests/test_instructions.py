"""Instruction data (`data=instructions`): prompt/completion and chat rows become examples whose loss is on the
completions only, checked against a brute-force per-example computation, through the loader, the trainer's
gradient accumulation, DDP and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, assert_same_weights, compose, env, records, tiny_gpt, train, trainer, weights

EOT = 50256


def rows() -> list[dict]:
    """40 examples of varied lengths: prompt/completion pairs, some long, and chats."""
    words = "the quick brown fox jumps over the lazy dog and then it sleeps under a tree".split()
    out = []
    for i in range(34):
        prompt = " ".join(words[: 2 + i % 7]) + f" ({i})?\nA:"
        completion = " " + " ".join(words[i % 5 : i % 5 + 1 + (i * 7) % 11]) * (1 + (i % 6 == 0) * 4)
        out.append({"prompt": prompt, "completion": completion})
    for i in range(6):
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                    {"role": "user", "content": "and then?"},
                    {"role": "assistant", "content": " ".join(words[: 3 + i])},
                ]
            }
        )
    return out


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def prepare(root: Path, source: Path, **overrides):
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare as prepare_data

    data = DataConfig(name="sft", builder="instructions", source=str(source), **overrides)
    return prepare_data(data, data_root=root, overwrite=True)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    return prepare(root, write_jsonl(root / "train.jsonl", rows()))


def examples_of(ds, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """Every example of a split as (tokens, target mask), read straight from the shards and masks."""
    from gpt2.data.instructions import START, TARGET

    out = []
    for shard in ds.shards(split):
        tokens, mask = np.asarray(ds.tokens(shard)), np.asarray(ds.mask(shard))
        starts = np.flatnonzero(mask & START).tolist() + [len(tokens)]
        out += [(tokens[a:b].astype(np.int64), (mask[a:b] & TARGET) > 0) for a, b in zip(starts, starts[1:])]
    return out


def brute_force_loss(model, examples, block_size: int) -> torch.Tensor:
    """Sum of the next-token losses on every target token of every example, each run alone and unpadded (cut
    to block_size + 1 tokens), divided by the number of targets."""
    total, count = 0.0, 0
    for tokens, target in examples:
        tokens, target = torch.from_numpy(tokens[: block_size + 1]), torch.from_numpy(target[: block_size + 1])
        logits, _ = model(tokens[None, :-1])
        losses = F.cross_entropy(logits[0, :, :50257], tokens[1:], reduction="none")
        total = total + losses[target[1:]].sum()
        count += int(target[1:].sum())
    return total / count


def test_prepare_renders_pairs_and_chats_with_masks_on_the_completions(sft_data):
    from gpt2.data import open_dataset
    from gpt2.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ds = open_dataset(str(sft_data))
    meta = json.loads((sft_data / "meta.json").read_text())
    assert meta["examples"] is True and ds.has_examples
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    found = {tok.decode(t.tolist()): tok.decode(t[m].tolist()) for t, m in examples_of(ds) + examples_of(ds, "val")}
    for row in rows()[:34]:  # prompt + completion + end-of-text; the loss on the completion and end-of-text
        text = row["prompt"] + row["completion"] + "<|endoftext|>"
        assert found[text] == row["completion"] + "<|endoftext|>"
    chat = (
        "Be brief.\n\nUser: question 0\nAssistant: answer 0<|endoftext|>User: and then?\nAssistant: the quick "
        "brown<|endoftext|>"
    )
    assert found[chat] == " answer 0<|endoftext|> the quick brown<|endoftext|>"
    # Each run of text between the places where the loss starts or stops is tokenized as one string (the system
    # message and the first user message together): the tokens of the whole rendered text (gpt2.chat).
    t, m = next((t, m) for t, m in examples_of(ds) + examples_of(ds, "val") if tok.decode(t.tolist()) == chat)
    pieces = [
        "Be brief.\n\n",
        "User: question 0\nAssistant:",
        " answer 0",
        "User: and then?\nAssistant:",
        " the quick brown",
    ]
    expected = [
        tok.encode(pieces[0] + pieces[1]),
        tok.encode(pieces[2]) + [EOT],
        tok.encode(pieces[3]),
        tok.encode(pieces[4]) + [EOT],
    ]
    assert t.tolist() == sum(expected, [])
    assert m.tolist() == sum(([i % 2 == 1] * len(e) for i, e in enumerate(expected)), [])


def test_masked_loss_equals_brute_force_per_example(sft_data):
    """Batches of examples (padded, some cut to block_size + 1 tokens) give the loss of a brute-force pass over
    each example alone, on its completion tokens only: in the chunked training loss and in the logits path."""
    from gpt2.data import TokenLoader, open_dataset

    T = 24
    ds = open_dataset(str(sft_data))
    loader = TokenLoader(ds, "train", batch_size=8, block_size=T, order="epoch", seed=3)
    assert loader.sequences.truncated > 0  # some examples are longer than T + 1 tokens
    model = tiny_gpt(vocab_size=50257, block_size=T)
    every = examples_of(ds)
    for k in range(3):
        ids = loader.global_batch(k)
        x, y, _ = loader.next_batch()
        assert x.shape == y.shape == (8, T)
        expected = brute_force_loss(model, [every[i] for i in ids.tolist()], T)
        _, chunked = model(x, y, return_logits=False)
        _, plain = model(x, y)
        torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
        assert loader.sequences.targets(ids) == int((y != -1).sum())


def example_ids(loader, ids: np.ndarray) -> list[int]:
    """The examples in these sequences of the loader: the sequences themselves, or the members of packed rows."""
    packs = loader.sequences
    if not hasattr(packs, "members"):
        return ids.tolist()
    return [int(i) for k in ids.tolist() for i in packs.members[packs.row_starts[k] : packs.row_starts[k + 1]]]


@pytest.mark.parametrize(
    "packing, checkpointing",
    [("true", "false"), ("false", "false"), ("true", "true")],
    ids=["packed", "padded", "packed-ac"],
)
def test_a_step_averages_over_every_target_of_its_global_batch(sft_data, tmp_path, packing, checkpointing):
    """With gradient accumulation the micro-batches hold different numbers of targets: the step's gradient is
    that of the mean over all the step's targets (not the mean of the micro-batch means). Packed or padded,
    it is the brute-force gradient over each example alone."""
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.model import GPT
    from gpt2.training import Trainer

    cfg = to_object(
        compose(
            f"data.name={sft_data}",
            f"out_dir={tmp_path / 'run'}",
            *TINY,
            "model.block_size=25",
            "train.grad_accum_steps=2",
            "model.dropout=0",
            f"data.packing={packing}",
            f"train.activation_checkpointing={checkpointing}",
        ),
        TrainRunConfig,
    )
    trainer = Trainer(cfg, DistInfo())
    reference = GPT.from_state_dict(trainer.model.config, trainer.model.state_dict())
    every = examples_of(trainer.ds)
    ids = np.concatenate([trainer.loader.global_batch(0), trainer.loader.global_batch(1)])
    weights = trainer.loader.micro_batch_weights(2)
    assert weights[0] != weights[1]  # the case where averaging micro-batch means would be wrong
    loss, _ = trainer._accumulate_gradients()

    expected = brute_force_loss(reference, [every[i] for i in example_ids(trainer.loader, ids)], 25)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5)
    ours = dict(trainer.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Q?"},
            r"rows.jsonl:2: an example needs 'prompt' and 'completion' fields or a 'messages' list "
            r"\(keys: prompt\)",
        ),
        ({"prompt": "Q?", "completion": ""}, r"rows.jsonl:2: the completion \('completion'\) is empty"),
        ({"prompt": "Q?", "completion": 3}, r"rows.jsonl:2: field 'completion' is int, not text"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"rows.jsonl:2: 'messages' has no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"rows.jsonl:2: messages\[0\] must be"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
            r"rows.jsonl:2: messages\[1\] is a system message; only the first",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            r"rows.jsonl:2: messages\[1\] is an empty assistant reply",
        ),
        ({"messages": "hello"}, r"rows.jsonl:2: 'messages' must be a non-empty list"),
    ],
)
def test_bad_rows_are_one_error_naming_the_row_and_nothing_is_written(tmp_path, row, message):
    from gpt2.errors import UserError

    source = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": " b"}, row, *rows()[:5]])
    with pytest.raises(UserError, match=message):
        prepare(tmp_path, source)
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())


def test_other_bad_input_is_one_error(tmp_path):
    from gpt2.config import DataConfig
    from gpt2.errors import UserError

    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    with pytest.raises(UserError, match=r"notes.txt is a text file, not rows: instruction data comes from .jsonl"):
        prepare(tmp_path, text)
    with pytest.raises(UserError, match="holds 1 example\\(s\\): a validation split needs at least 2"):
        prepare(tmp_path, write_jsonl(tmp_path / "one.jsonl", rows()[:1]))
    with pytest.raises(UserError, match="data.builder=instructions needs data.tokenizer=gpt2"):
        DataConfig(builder="instructions", tokenizer="char")
    # Field names are configurable.
    renamed = [{"q": r["prompt"], "a": r["completion"]} for r in rows()[:10]]
    out = prepare(tmp_path, write_jsonl(tmp_path / "qa.jsonl", renamed), prompt_field="q", completion_field="a")
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["documents"] == 9


@pytest.mark.e2e
def test_a_split_without_a_target_within_block_size_is_one_error_at_start(tmp_path):
    """Prompts longer than the context leave no completion token to train or evaluate on: the run used to
    train nothing and log val loss nan, exit 0. Now it stops before building a model."""
    long = [{"prompt": "the lazy dog " * 30 + f"({i})", "completion": " yes."} for i in range(20)]
    data = prepare(tmp_path, write_jsonl(tmp_path / "long.jsonl", long))
    p = train([*TINY, f"data.name={data}", "train.max_iters=2", f"out_dir={tmp_path / 'out'}"], tmp_path, check=False)
    assert p.returncode == 2 and not (tmp_path / "out" / "ckpt.pt").exists()
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: none of the 18 train examples of {data} has a completion token within its first block_size + 1 = "
        "33 tokens (the prompts fill the context), so there is nothing to train or evaluate on: raise "
        "model.block_size or shorten the prompts"
    )
    trainer(*TINY, f"data.name={data}", "model.block_size=128", "train.max_iters=2", f"out_dir={tmp_path / 'ok'}").fit()


def test_examples_never_span_two_shards(tmp_path):
    """Small shards: each example lies whole in one shard, the masks line up with their shards, and every
    example is read back."""
    from gpt2.config import MIN_SHARD_TOKENS
    from gpt2.data import open_dataset

    many = rows() * 40  # ~1600 examples, several shards of MIN_SHARD_TOKENS tokens
    out = prepare(tmp_path, write_jsonl(tmp_path / "many.jsonl", many), shard_tokens=MIN_SHARD_TOKENS)
    ds = open_dataset(str(out))
    assert len(ds.shards("train")) > 2
    from gpt2.data.instructions import START

    for shard in ds.shards("train"):
        assert ds.mask(shard)[0] & START  # each shard starts with an example
    assert len(examples_of(ds)) + len(examples_of(ds, "val")) == len(many)
    # A corrupt mask is named.
    mask_path = ds.shards("train")[0].mask_path
    np.save(mask_path, np.zeros(3, dtype=np.uint8))
    from gpt2.errors import UserError

    with pytest.raises(UserError, match=f"loss mask {mask_path} holds"):
        open_dataset(str(out))


@pytest.mark.e2e
def test_cli_prepares_trains_by_epochs_and_samples(tmp_path):
    """The README's instruction fine-tuning commands, end to end on a tiny model: prepare, train one epoch in
    the epoch order, sample from the run."""
    source = write_jsonl(tmp_path / "chat.jsonl", rows())
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "prepare.py"),
            "data=instructions",
            "data.name=chat",
            f"data.source={source}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "36 train and 4 val examples" in p.stdout
    out = tmp_path / "out"
    run = train(
        [
            "data.name=chat",
            f"out_dir={out}",
            *TINY,
            "model.block_size=24",
            "data.order=epoch",
            "train.epochs=1",
            "train.eval_interval=5",
        ],
        tmp_path,
    )
    assert "an epoch (34 packed rows of 36 examples) is 8.5 steps; rows filled to 82.7%" in run.stdout
    assert "are longer than block_size + 1 = 25 tokens and are cut to it" in run.stdout
    assert records(out)[-1]["step"] == 9
    sample = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"checkpoint={out}",
            "prompt=User: hi\nAssistant:",
            "max_new_tokens=5",
            "device=cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]

    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "prepare.py"),
            "data=instructions",
            "data.name=bad",
            f"data.source={write_jsonl(tmp_path / 'bad.jsonl', [rows()[0], {'text': 'x'}])}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "bad.jsonl:2: an example needs 'prompt'" in bad.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_two_processes_match_one_on_instruction_data(sft_data, tmp_path):
    """DDP with gradient accumulation on examples with different numbers of targets: every rank weighs its
    micro-batches by the global target count, so the loss curve is the single process's."""
    from conftest import curve, torchrun

    args = [
        f"data.name={sft_data}",
        *TINY,
        "model.block_size=24",
        "train.grad_accum_steps=2",
        "train.max_iters=6",
        "train.eval_interval=3",
        "train.eval_iters=3",
    ]
    train([*args, f"out_dir={tmp_path / 'one'}"], tmp_path)
    torchrun([*args, f"out_dir={tmp_path / 'two'}"], tmp_path)
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), abs=1e-5, rel=0)


# ------------------------------------------------------------------------------------------------ packing


def test_packed_rows_hold_every_example_once_and_each_computes_as_alone(sft_data):
    """Best-fit rows of at most block_size positions hold every trained example exactly once; positions restart
    at 0 in each example; each example's logits in a packed row equal its logits alone, unpadded."""
    from gpt2.data import TokenLoader, open_dataset
    from gpt2.data.loader import _Packs

    T = 64
    ds = open_dataset(str(sft_data))
    packs = _Packs(ds, "train", T)
    examples = packs.examples
    sizes = examples.sizes()
    assert sorted(packs.members.tolist()) == list(range(examples.count))  # every example once (all trained)
    per_row = np.add.reduceat(sizes[packs.members], packs.row_starts[:-1])
    assert per_row.max() <= T and packs.count < examples.count / 2  # packed, not one per row
    assert packs.fill == pytest.approx(sizes.sum() / (packs.count * T))

    model = tiny_gpt(vocab_size=50257, block_size=T)
    every = examples_of(ds)
    loader = TokenLoader(ds, "train", batch_size=4, block_size=T, packing=True, order="epoch", seed=5)
    x, y, positions = loader.next_batch()
    with torch.no_grad():
        packed, _ = model(x, positions=positions)
        for row, k in enumerate(loader.global_batch(0).tolist()):
            offset = 0
            for i in packs.members[packs.row_starts[k] : packs.row_starts[k + 1]].tolist():
                n = int(sizes[i])
                tokens = torch.from_numpy(every[i][0][:n])
                assert torch.equal(x[row, offset : offset + n], tokens)
                assert positions[row, offset : offset + n].tolist() == list(range(n))
                alone, _ = model(tokens[None])
                torch.testing.assert_close(packed[row, offset : offset + n], alone[0], atol=1e-5, rtol=1e-5)
                offset += n
            assert (y[row, offset:] == -1).all() and (positions[row, offset:] == 0).all()  # the row's padding


def test_best_fit_fills_rows_and_is_deterministic():
    from gpt2.data.loader import best_fit

    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.lognormal(np.log(150), 0.9, size=5000).astype(np.int64) + 5, 1024)  # chat-like lengths
    rows = best_fit(sizes, 1024)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(sizes)))
    assert max(sizes[r].sum() for r in rows) <= 1024
    assert sizes.sum() / (len(rows) * 1024) > 0.98  # padded, one per row: ~0.2
    again = best_fit(sizes, 1024)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    assert best_fit(np.array([], dtype=np.int64), 8) == []


def test_packed_loader_resumes_and_splits_across_ranks_like_one(sft_data):
    from gpt2.data import TokenLoader, open_dataset

    ds = open_dataset(str(sft_data))

    def loader(**kw):
        return TokenLoader(ds, "train", batch_size=2, block_size=48, packing=True, order="epoch", seed=3, **kw)

    one = loader()
    singles = [torch.stack(list(one.next_batch())) for _ in range(6)]
    ranks = [loader(rank=r, world_size=2) for r in range(2)]
    for i in range(3):
        for r in range(2):
            assert torch.equal(torch.stack(list(ranks[r].next_batch())), singles[2 * i + r])
    resumed = loader()
    resumed.load_state_dict({"position": 4, "seed": 3})
    assert torch.equal(torch.stack(list(resumed.next_batch())), singles[4])


def test_a_micro_batch_without_targets_adds_zero_not_nan(sft_data, tmp_path):
    """A micro-batch whose sequences hold no target (all prompt) contributes zero loss and zero gradient."""
    from gpt2.data import Batch

    run = trainer(f"data.name={sft_data}", f"out_dir={tmp_path / 'run'}", *TINY, "model.block_size=24")
    x, y, positions = run.loader.next_batch()
    run.loader.next_batch = lambda: Batch(x, torch.full_like(y, -1), positions)
    loss, _ = run._accumulate_gradients()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in run.model.parameters())


def test_packing_choices_are_checked_and_a_resume_keeps_its_own(sft_data, char_data, tmp_path):
    from gpt2.errors import UserError

    with pytest.raises(UserError, match="data.packing=true needs instruction data .* drop data.packing"):
        trainer(f"data.name={char_data}", f"out_dir={tmp_path / 'char'}", *TINY, "data.packing=true")
    base = [f"data.name={sft_data}", f"out_dir={tmp_path / 'run'}", *TINY, "model.block_size=48"]
    trainer(*base, "data.packing=false", "train.max_iters=2", "train.eval_interval=2").fit()
    resumed = trainer(*base, "train.max_iters=3")  # not typed: the run's own choice
    assert resumed.cfg.data.packing is False and not hasattr(resumed.loader.sequences, "members")
    with pytest.raises(UserError, match="data.packing=true disagrees with the run being resumed"):
        trainer(*base, "data.packing=true", "train.max_iters=3")
    fresh = trainer(f"data.name={sft_data}", f"out_dir={tmp_path / 'new'}", *TINY, "model.block_size=48")
    assert fresh.cfg.data.packing is True  # the default for instruction data


def test_a_packed_run_resumes_exactly(sft_data, tmp_path):
    base = [f"data.name={sft_data}", *TINY, "model.block_size=48", "data.order=epoch", "train.eval_interval=3"]
    trainer(*base, f"out_dir={tmp_path / 'full'}", "train.max_iters=6").fit()
    trainer(*base, f"out_dir={tmp_path / 'cut'}", "train.max_iters=3").fit()
    trainer(*base, f"out_dir={tmp_path / 'cut'}", "train.max_iters=6").fit()
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))
