"""Preference pairs (`data=preferences`) and DPO (`objective=dpo`): the loss and its gradients against the formula
computed by brute force with two whole models, LoRA's adapters-off reference, bad rows, and runs that resume
exactly and log their rewards."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_same_weights, records, tiny_gpt, trainer, weights

from gpt2.config import DataConfig
from gpt2.data import TokenLoader, open_dataset
from gpt2.data.instructions import START, TARGET
from gpt2.data.prepare import prepare as prepare_data
from gpt2.dpo import DPO, reward_metrics
from gpt2.errors import UserError
from gpt2.lora import apply_lora
from gpt2.tokenizer import GPT2Tokenizer

EOT = 50256
HERE = ["device=cpu", "dtype=float32", "compile=false"]


def pairs(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(1, 9, 2))
        good, bad = f" {a + b}.", f" {a + b + int(rng.choice([-2, -1, 1, 2]))}. Or so, I think, maybe."
        if i % 3 == 0:
            chat = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            out.append({"messages": chat, "chosen": good, "rejected": bad})
        else:
            out.append({"prompt": f"Q: {a}+{b}=?\nA:", "chosen": good, "rejected": bad})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(root: Path, rows: list, name: str = "prefs") -> Path:
    source = write_jsonl(root / f"{name}.jsonl", rows)
    data = DataConfig(name=name, builder="preferences", source=str(source))
    return prepare_data(data, data_root=root, overwrite=True)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("prefs"), pairs())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A tiny model trained a few steps on the chosen replies: the starting point DPO tunes."""
    root = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": r.get("prompt", "User: x\nAssistant:"), "completion": r["chosen"]} for r in pairs()]
    source = write_jsonl(root / "sft.jsonl", rows)
    data = prepare_data(DataConfig(name="sft", builder="instructions", source=str(source)), data_root=root)
    trainer(f"data.name={data}", f"out_dir={root / 'run'}", *TINY, "train.max_iters=4", "train.eval_interval=4").fit()
    return root / "run"


def test_pairs_are_two_examples_with_the_loss_on_each_reply_only(prefs):
    tok = GPT2Tokenizer()
    ds = open_dataset(str(prefs))
    assert ds.has_pairs and ds.has_examples
    (shard,) = ds.shards("train")
    tokens, mask = np.asarray(ds.tokens(shard)), np.asarray(ds.mask(shard))
    starts = np.flatnonzero(mask & START).tolist() + [len(tokens)]
    examples = [(tokens[a:b], mask[a:b] & TARGET > 0) for a, b in zip(starts, starts[1:])]
    texts = [(tok.decode(t.tolist()), tok.decode(t[m].tolist())) for t, m in examples]
    assert len(texts) == 2 * 36  # 36 train pairs, the chosen example first
    chat = next(i for i, (text, _) in enumerate(texts) if text.startswith("User: What is"))
    assert chat % 2 == 0 and texts[chat][0].endswith("\nAssistant:" + texts[chat][1])  # the chat's next reply
    for (chosen, chosen_target), (rejected, rejected_target) in zip(texts[::2], texts[1::2]):
        assert chosen_target.endswith("<|endoftext|>") and chosen.endswith(chosen_target)
        assert "Or so" in rejected_target and "Or so" not in chosen_target
        assert chosen.removesuffix(chosen_target) == rejected.removesuffix(rejected_target)  # the same prompt


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "chosen": " a"}, r"pairs.jsonl:2: the 'rejected' reply is missing"),
        ({"prompt": "Q", "chosen": "", "rejected": " b"}, r"pairs.jsonl:2: the 'chosen' reply is empty"),
        ({"prompt": "Q", "chosen": " a", "rejected": " a"}, r"pairs.jsonl:2: the 'chosen' and 'rejected' replies are"),
        ({"chosen": " a", "rejected": " b"}, r"pairs.jsonl:2: a preference pair needs a 'prompt' text"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}], "chosen": " a", "rejected": " b"},
            r"pairs.jsonl:2: 'messages' must be a list of messages ending with a user message",
        ),
    ],
)
def test_bad_pairs_are_one_error_naming_the_row(tmp_path, row, message):
    with pytest.raises(UserError, match=message):
        prepare(tmp_path, [pairs(1)[0], row, *pairs(4)], name="pairs")
    assert not (tmp_path / "pairs" / "meta.json").exists()


def brute_force_dpo(policy, reference, examples: list[tuple[np.ndarray, np.ndarray]], beta: float) -> torch.Tensor:
    """The DPO loss from its formula: each example run alone through both models, unpadded; its reply's
    log-probability summed over the reply's tokens."""

    def logp(model, tokens, target):
        tokens = torch.from_numpy(tokens.astype(np.int64))
        logits, _ = model(tokens[None, :-1])
        per_token = -F.cross_entropy(logits[0], tokens[1:], reduction="none")
        return per_token[torch.from_numpy(target[1:])].sum()

    losses = []
    for (chosen, c_mask), (rejected, r_mask) in zip(examples[::2], examples[1::2]):
        with torch.no_grad():
            ref_c, ref_r = logp(reference, chosen, c_mask), logp(reference, rejected, r_mask)
        margin = beta * ((logp(policy, chosen, c_mask) - ref_c) - (logp(policy, rejected, r_mask) - ref_r))
        losses.append(-F.logsigmoid(margin))
    return torch.stack(losses).mean()


def examples_of(ds, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    (shard,) = ds.shards("train")
    tokens, mask = np.asarray(ds.tokens(shard)), np.asarray(ds.mask(shard))
    starts = np.flatnonzero(mask & START).tolist() + [len(tokens)]
    every = [(tokens[a:b], mask[a:b] & TARGET > 0) for a, b in zip(starts, starts[1:])]
    return [every[j] for i in ids.tolist() for j in (2 * i, 2 * i + 1)]


@pytest.mark.parametrize("lora", [False, True], ids=["two-models", "lora-adapters-off"])
def test_dpo_loss_and_gradients_equal_the_formula_by_brute_force(prefs, lora):
    ds = open_dataset(str(prefs))
    loader = TokenLoader(ds, "train", batch_size=5, block_size=48, seed=2)
    ids = loader.global_batch(0)
    x, y, _ = loader.next_batch()
    assert x.shape == (10, 48)
    reference = tiny_gpt(vocab_size=50257, block_size=48, seed=1).eval()
    policy = copy.deepcopy(reference).train()
    if lora:
        apply_lora(policy, rank=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_fc"])
        for name, p in policy.named_parameters():  # adapters away from zero, so policy != reference
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.05)
        dpo = DPO(beta=0.5, reference=None)
    else:
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        dpo = DPO(beta=0.5, reference=reference)
    brute = copy.deepcopy(policy)
    loss, stats = dpo.loss(policy, policy, x, y)
    loss.backward()
    expected = brute_force_dpo(brute, reference, examples_of(ds, ids), beta=0.5)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert loss.item() != pytest.approx(np.log(2), abs=1e-4)  # the models differ: not the trivial 0.693
    ours = dict(policy.named_parameters())
    for name, p in brute.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert stats[3].item() == 5 and 0 <= stats[2].item() <= 5
    assert policy.training  # the reference pass (adapters off, eval mode) gave the model back as it was


def test_a_dpo_run_logs_rewards_learns_and_resumes_exactly(prefs, sft_run, tmp_path):
    base = [
        f"data.name={prefs}",
        "objective=dpo",
        f"init_from={sft_run}",
        "train.batch_size=4",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "train.log_interval=2",
        "optim.lr=3e-3",
        "optim.warmup_iters=0",
        "optim.lr_decay_iters=6",  # (the schedule of the 6-step run, for the 3-step one too)
        "data.order=epoch",
        *HERE,
    ]
    trainer(*base, f"out_dir={tmp_path / 'full'}", "train.max_iters=6").fit()
    trainer(*base, f"out_dir={tmp_path / 'cut'}", "train.max_iters=3").fit()
    trainer(*base, f"out_dir={tmp_path / 'cut'}", "train.max_iters=6").fit()
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))
    logged = records(tmp_path / "full")
    assert {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"} <= logged[-1].keys()
    evals = records(tmp_path / "full", "eval")
    assert evals[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at the start
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["train_reward_accuracy"] > 0.5


def test_dpo_with_lora_keeps_the_base_as_its_reference(prefs, sft_run, tmp_path):
    args = [f"data.name={prefs}", "objective=dpo", f"init_from={sft_run}", f"out_dir={tmp_path / 'lora'}", *HERE]
    run = trainer(*args, "lora.rank=4", "train.max_iters=2", "train.eval_interval=2", "train.eval_iters=1")
    assert run.dpo.reference is None  # no second model in memory
    run.fit()
    assert records(tmp_path / "lora", "eval")[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-5)


def test_objective_and_data_must_agree(prefs, sft_run, char_data, tmp_path):
    with pytest.raises(UserError, match="objective=dpo trains on preference pairs, and .* holds none"):
        trainer(f"data.name={char_data}", "objective=dpo", "init_from=gpt2", f"out_dir={tmp_path / 'a'}", *TINY)
    with pytest.raises(UserError, match="holds preference pairs, which next-token training would learn"):
        trainer(f"data.name={prefs}", f"out_dir={tmp_path / 'b'}", *TINY)
    with pytest.raises(UserError, match="objective=dpo tunes a trained model against its own starting weights"):
        trainer(f"data.name={prefs}", "objective=dpo", f"out_dir={tmp_path / 'c'}", *TINY)
    with pytest.raises(UserError, match="dpo.beta must be > 0"):
        trainer(f"data.name={prefs}", "objective=dpo", f"init_from={sft_run}", "dpo.beta=0", f"out_dir={tmp_path}")


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_sft_then_dpo_recipe_runs_as_written_and_teaches_the_preferred_style(tmp_path):
    """The README's recipe, verbatim: a supervised model that answers in either style about half the time, then
    DPO on pairs preferring the plain one: held-out reward accuracy above 0.9, and samples follow the rule."""
    import subprocess
    import sys

    from conftest import ROOT, bash_blocks, commands, env

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in bash_blocks(readme.split("**Preference tuning (DPO)**")[1]) if "objective=dpo" in b)
    (tmp_path / "gpt2").symlink_to(ROOT / "gpt2")  # the recipe's data.source paths, from the repository root

    def run(argv: list[str]) -> str:
        assert argv[0] == "python"
        p = subprocess.run(
            [sys.executable, str(ROOT / argv[1]), *argv[2:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env(OMP_NUM_THREADS="2"),
        )
        assert p.returncode == 0, f"{' '.join(argv)}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p.stdout

    for argv in commands(block):
        run(argv)
    evals = records(tmp_path / "out" / "style_dpo", "eval")
    assert evals[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-4) and evals[-1]["val_reward_accuracy"] > 0.9

    def plain_share(run_dir: str) -> float:
        out = tmp_path / f"{run_dir}.jsonl"
        prompt = "prompt=User: Name one fruit.\\nAssistant:"
        run(["python", "sample.py", f"checkpoint=out/{run_dir}", prompt, "num_samples=40", f"output={out}"])
        samples = [json.loads(line)["sample"] for line in out.read_text().splitlines()]
        return sum("!!!" not in s for s in samples) / len(samples)

    assert 0.2 < plain_share("style_sft") < 0.8  # the supervised model: either style (0.5 here, bf16 and fp32)
    assert plain_share("style_dpo") >= 0.9


@pytest.mark.e2e
@pytest.mark.slow
def test_two_processes_match_one_under_dpo(prefs, sft_run, tmp_path):
    """DDP over 2 gloo ranks with gradient accumulation: the DPO loss curve is the single process's."""
    from conftest import curve, torchrun, train

    args = [
        f"data.name={prefs}",
        "objective=dpo",
        f"init_from={sft_run}",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.max_iters=4",
        "train.eval_interval=2",
        "train.eval_iters=2",
        "train.log_interval=1",
        "optim.lr=3e-3",
        "optim.warmup_iters=0",
        *HERE,
    ]
    train([*args, f"out_dir={tmp_path / 'one'}"], tmp_path)
    torchrun([*args, f"out_dir={tmp_path / 'two'}"], tmp_path)
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), abs=1e-5, rel=0)
    assert "reward_accuracy" in records(tmp_path / "two")[-1]


def test_the_dpo_loss_equals_trls_dpotrainer_at_its_first_step(tmp_path):
    """The reference implementation: TRL's DPOTrainer (default sigmoid loss) on the HF exports of the same policy
    and a separate reference model, fed the same pairs as text, gives the loss of our first step on them."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2.export import write_gpt2_tokenizer
    from gpt2.hf import save_pretrained

    plain = [row for row in pairs(12) if "prompt" in row]
    ds = open_dataset(str(prepare(tmp_path, plain)))
    loader = TokenLoader(ds, "train", batch_size=6, block_size=48, seed=2)
    ids = loader.global_batch(0)
    x, y, _ = loader.next_batch()
    reference = tiny_gpt(vocab_size=50257, block_size=48, seed=1).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    loss, stats = DPO(beta=0.5, reference=reference).loss(policy, policy, x, y)

    tok = GPT2Tokenizer()
    rows = []  # the same pairs as text: prompt and replies decoded from the prepared tokens (end-of-text left out)
    examples = examples_of(ds, ids)
    for (chosen, c_target), (rejected, r_target) in zip(examples[::2], examples[1::2]):
        prompt = tok.decode(chosen[~c_target].tolist())
        replies = [tok.decode(t[m][:-1].tolist()) for t, m in ((chosen, c_target), (rejected, r_target))]
        rows.append({"prompt": prompt, "chosen": replies[0], "rejected": replies[1]})
    models = {}
    for name, model in (("policy", policy), ("reference", reference)):
        save_pretrained(model, tmp_path / name)
        write_gpt2_tokenizer(tmp_path / name, 48)
        models[name] = GPT2LMHeadModel.from_pretrained(tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    tokenizer.pad_token = tokenizer.eos_token
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        per_device_train_batch_size=6,
        bf16=False,  # (TRL's default is bf16 mixed precision; ours here fp32)
        use_cpu=True,
        report_to=[],
    )
    trainer = trl.DPOTrainer(
        model=models["policy"],
        ref_model=models["reference"],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # all 6 pairs (in its order: the mean does not mind)
    trl_loss = trainer.compute_loss(trainer.model.train(), batch)
    torch.testing.assert_close(trl_loss.detach().float(), loss.detach(), atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - np.log(2)) > 0.05  # policy != reference: not the trivial log 2
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}  # (TRL's logs, unaggregated)
    ours = reward_metrics(stats)
    for key, theirs in (
        ("chosen", "chosen"),
        ("rejected", "rejected"),
        ("accuracy", "accuracies"),
        ("margin", "margins"),
    ):
        assert ours[f"reward_{key}"] == pytest.approx(logged[f"rewards/{theirs}"], abs=1e-4), key
