"""Trainer tests on CPU: end to end through the CLI, exact resume after SIGTERM and kill -9, fine-tuning,
optimizers and schedules, wandb offline, divergence, and every bad input failing with one line.

Tiny models (2 layers, 32-64 wide) in fp32, so equalities are exact. Distributed runs: test_train_distributed.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    assert_same_weights,
    compose,
    env,
    hf_model_dir,
    interrupt,
    records,
    train,
    trainer,
    weights,
)

from gpt2.errors import UserError

# A 2-layer character model, fp32, no compile: a step takes a few ms, and resume must be exact.


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_cli_trains_checkpoints_and_logs(char_data, tmp_path):
    out = tmp_path / "run"
    p = train(
        [f"data.name={char_data}", f"out_dir={out}", "train.max_iters=40", "train.eval_interval=20", *TINY], tmp_path
    )
    assert "step 40 | loss" in p.stdout and "val loss" in p.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # safe to load: plain types and tensors only
    assert ckpt["step"] == 40 and ckpt["tokens_seen"] == 40 * 4 * 32
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["tokenizer"]["name"] == "char"
    assert (
        ckpt["config"]["train"]["max_iters"] == 40
        and len(ckpt["rng"]) == 1
        and ckpt["loader"].keys() == {"position", "seed"}
    )
    assert (out / "best.pt").exists() and (out / "config.yaml").exists()
    train_lines, eval_lines = records(out, "train"), records(out, "eval")
    assert [r["step"] for r in train_lines] == list(range(1, 41))
    assert {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_sec", "mfu"} <= train_lines[0].keys()
    assert [r["step"] for r in eval_lines] == [0, 20, 40]
    assert {"train_loss", "val_loss"} <= eval_lines[0].keys()
    assert eval_lines[-1]["val_loss"] < eval_lines[0]["val_loss"] - 0.5  # it learns
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in eval_lines)

    sample = ROOT / "sample.py"
    if sample.exists():
        cmd = [sys.executable, str(sample), f"checkpoint={out}", "max_new_tokens=20", "seed=1", "device=cpu"]
        s = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=120)
        assert s.returncode == 0, s.stderr
        assert s.stdout.strip()


# ------------------------------------------------------------------------------------------------ resume


RESUME = ["train.max_iters=150", "train.eval_interval=40", "model.dropout=0.1", "optim.lr_decay_iters=150"]
"""Long enough (a second or more) to interrupt; dropout on, so the RNG state has to be restored too."""


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "full"
    train([f"data.name={char_data}", f"out_dir={out}", *TINY, *RESUME], out.parent)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_resume_after_interrupt_is_exact(char_data, tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    args = [f"data.name={char_data}", f"out_dir={out}", *TINY, *RESUME]
    code = interrupt(args, tmp_path, out, at_step=50, sig=sig)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    if sig != signal.SIGKILL:  # SIGINT and SIGHUP take the same path (test_run_safety, bench/faults.py)
        assert code == 128 + sig
        assert 50 <= stopped_at < 150  # saved where the signal arrived, not at the last eval
    else:
        assert code == -signal.SIGKILL
        assert stopped_at % 40 == 0 and 40 <= stopped_at < 150  # the last periodic checkpoint
    p = train(args, tmp_path)
    assert f"resuming {out / 'ckpt.pt'} at step {stopped_at}" in p.stdout
    assert_same_weights(weights(out), weights(uninterrupted))
    assert records(out) == [] or [r["loss"] for r in records(out)] == [r["loss"] for r in records(uninterrupted)]
    assert [r["step"] for r in records(out, "eval")] == [r["step"] for r in records(uninterrupted, "eval")]


@pytest.mark.e2e
def test_finetune_from_our_checkpoint_starts_at_step_zero(char_data, tmp_path, uninterrupted):
    out = tmp_path / "ft"
    p = train(
        [
            f"data.name={char_data}",
            f"out_dir={out}",
            f"init_from={uninterrupted}",
            *TINY,
            "train.max_iters=5",
            "train.eval_interval=5",
            "model.dropout=0.0",
            "model.block_size=16",
        ],
        tmp_path,
    )
    assert f"fine-tuning from {uninterrupted}" in p.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["model_config"]["n_embd"] == 32  # architecture from the init
    assert ckpt["model_config"]["block_size"] == 16 and ckpt["model"]["transformer.wpe.weight"].shape[0] == 16
    assert records(out, "eval")[0]["val_loss"] < 3.0  # starts from trained weights, not from scratch (~4.2)


# ------------------------------------------------------------------------------------------------ fine-tune from HF


@pytest.mark.e2e
@pytest.mark.slow
def test_finetune_from_hf_directory(bpe_data, tmp_path):
    hf_dir = hf_model_dir(tmp_path / "hf")
    out = tmp_path / "ft"
    args = [
        f"data.name={bpe_data}",
        f"out_dir={out}",
        f"init_from={hf_dir}",
        "train.batch_size=2",
        "train.max_iters=12",
        "train.eval_interval=12",
        "train.eval_iters=2",
        "train.log_interval=1",
        "optim.lr=1e-3",
        "optim.warmup_iters=2",
        "device=cpu",
        "dtype=float32",
        "compile=false",
    ]
    train([*args, "model.block_size=32"], tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"] | {"dropout": 0.0} == dict(
        n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257, dropout=0.0, bias=True
    )
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    # The architecture comes from the init: a disagreeing override, or more positions than it has, is an error.
    for bad, message in [
        ("model.n_layer=3", "model.n_layer=3 disagrees with init_from"),
        ("model.block_size=128", "model.block_size=128 is larger than"),
    ]:
        p = train([*args, f"out_dir={tmp_path / 'bad'}", bad], tmp_path, check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    # A model whose vocabulary is smaller than the dataset's token ids.
    small = hf_model_dir(tmp_path / "hf100", vocab_size=100)
    p = train([*args, f"out_dir={tmp_path / 'bad'}", f"init_from={small}"], tmp_path, check=False)
    assert p.returncode == 2 and "the model's vocabulary has 100 tokens" in p.stderr, p.stderr


def test_hellaswag_during_training_is_logged_like_val_loss(bpe_data, char_data, tmp_path):
    """eval.hellaswag_interval scores a local HellaSwag file every N steps into metrics.jsonl; a char-vocabulary
    dataset is refused before training."""
    hs = tmp_path / "hellaswag_val.jsonl"
    rows = [("A man slices bread. He", ["eats it.", "flies away.", "sings.", "swims."], i % 4) for i in range(6)]
    hs.write_text(
        "".join(
            json.dumps(
                {
                    "ind": i,
                    "ctx": c,
                    "endings": e,
                    "label": y,
                    "activity_label": "t",
                    "ctx_a": c,
                    "ctx_b": "",
                    "split": "val",
                    "split_type": "indomain",
                    "source_id": str(i),
                }
            )
            + "\n"
            for i, (c, e, y) in enumerate(rows)
        )
    )
    out = tmp_path / "run"
    args = [
        *TINY,
        "train.max_iters=6",
        "train.eval_interval=0",
        "eval.hellaswag_interval=3",
        f"eval.hellaswag_path={hs}",
        "eval.hellaswag_limit=4",
    ]
    trainer(f"data.name={bpe_data}", f"out_dir={out}", *args).fit()
    scored = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [0, 3]
    assert all(r["hellaswag_acc_norm"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in scored)  # 4 examples scored

    with pytest.raises(UserError, match="HellaSwag needs a model with the gpt2 tokenizer"):
        trainer(f"data.name={char_data}", f"out_dir={tmp_path / 'char'}", *args)


# ------------------------------------------------------------------------------------------------ optimizers


@pytest.mark.e2e
@pytest.mark.parametrize(
    "optim", [["optim=muon"], ["optim.schedule=wsd", "optim.decay_fraction=0.5"]], ids=["muon", "adamw-wsd"]
)
def test_optimizer_and_schedule_runs_learn(char_data, tmp_path, optim):
    out = tmp_path / "run"
    train(
        [f"data.name={char_data}", f"out_dir={out}", *TINY, "train.max_iters=40", "train.eval_interval=40", *optim],
        tmp_path,
    )
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    lrs = [r["lr"] for r in records(out)]
    if "optim.schedule=wsd" in optim:
        assert lrs[5] == lrs[15] == pytest.approx(3e-3)  # stable phase, then a linear decay
        assert lrs[-1] < lrs[25] < 3e-3


# ------------------------------------------------------------------------------------------------ wandb


@pytest.mark.e2e
@pytest.mark.slow
def test_wandb_offline_run_writes_files_and_resumes_same_run(char_data, tmp_path):
    pytest.importorskip("wandb")
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    args = [
        f"data.name={char_data}",
        f"out_dir={out}",
        *TINY,
        "train.max_iters=4",
        "train.eval_interval=2",
        "wandb.enabled=true",
        "wandb.mode=offline",
        "wandb.project=test",
    ]
    train(args, tmp_path, WANDB_DIR=str(wandb_dir))
    run_id = torch.load(out / "ckpt.pt", weights_only=True)["wandb_run_id"]
    assert run_id
    runs = list((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb")), list(wandb_dir.rglob("*"))
    train([*args, "train.max_iters=6"], tmp_path, WANDB_DIR=str(wandb_dir))  # resume: same wandb run id
    assert torch.load(out / "ckpt.pt", weights_only=True)["wandb_run_id"] == run_id


@pytest.mark.parametrize("case", ["no api key", "no network"])
def test_wandb_online_problems_are_one_line_quickly(tmp_path, monkeypatch, case):
    """wandb's own failures were a UsageError traceback (no key) or a CommError after ~100 s (no network)."""
    import socket
    import time

    from gpt2.config import WandbConfig
    from gpt2.metrics import start_wandb

    server = socket.create_server(("127.0.0.1", 0))  # a reachable host that is no wandb server
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    if case == "no api key":
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    else:
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        start_wandb(WandbConfig(enabled=True, mode="online"), tmp_path, "abcdefgh", {})
    server.close()
    assert time.perf_counter() - t0 < 30
    line = str(e.value)
    assert "\n" not in line and "wandb.mode=offline" in line
    assert ("No API key" in line) if case == "no api key" else ("cannot be reached" in line)


# ------------------------------------------------------------------------------------------------ failures


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(char_data, tmp_path):
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.divergence import TrainingDiverged
    from gpt2.training import Trainer

    out = tmp_path / "run"
    cfg = to_object(
        compose(f"data.name={char_data}", f"out_dir={out}", *TINY, "train.max_iters=20", "train.eval_interval=5"),
        TrainRunConfig,
    )
    trainer = Trainer(cfg, DistInfo())
    calls = {"n": 0}

    def poison(module, args):  # the 8th training forward (step 7) sees a NaN weight
        if module.training:
            calls["n"] += 1
            if calls["n"] == 8:
                module.transformer.ln_f.weight.data.fill_(float("nan"))

    trainer.model.register_forward_pre_hook(poison)
    with pytest.raises(TrainingDiverged, match="training diverged at step 7: loss nan.*last good checkpoint"):
        trainer.fit()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compile_mode_is_the_mode_torch_compile_gets(char_data, tmp_path, monkeypatch, mode):
    """compile_mode reaches torch.compile (default: torch's own default, no mode passed); the modes that capture
    CUDA graphs mark each forward as a new graph step, and FSDP, whose all-gathers no graph can hold, refuses them."""
    from gpt2.training import _compile

    compiled, steps_marked = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compiled.append((self, options)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps_marked.append(1))
    run = trainer(f"data.name={char_data}", f"out_dir={tmp_path}", *TINY, "compile=true", f"compile_mode={mode}")
    expected = {} if mode == "default" else {"mode": mode}
    assert compiled == [(run.model, expected)]
    run.train_step()
    assert len(steps_marked) == (run.accum if mode == "reduce-overhead" else 0)

    compiled.clear()
    if mode == "reduce-overhead":
        with pytest.raises(UserError, match="compile_mode=reduce-overhead captures CUDA graphs, which cannot hold"):
            _compile(run.model, "fsdp", mode)
    else:
        _compile(run.model, "fsdp", mode)
        assert compiled == [(block, expected) for block in run.model.transformer.h]


def test_a_compile_mode_without_compile_is_said_to_do_nothing(char_data, tmp_path, capsys):
    run = trainer(
        f"data.name={char_data}", f"out_dir={tmp_path}", *TINY, "train.max_iters=1", "compile_mode=max-autotune"
    )
    run.fit()
    assert "warning: compile_mode=max-autotune does nothing while compile is off; set compile=true" in (
        capsys.readouterr().out
    )


def test_a_training_step_never_waits_for_the_device(char_data, tmp_path, monkeypatch):
    """No host sync in train_step: the loss and gradient norm stay device tensors until a log step reads them
    (on a GPU the CPU then runs ahead and prepares the next batch while the current one computes)."""
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    cfg = to_object(compose(f"data.name={char_data}", f"out_dir={tmp_path / 'run'}", *TINY), TrainRunConfig)
    trainer = Trainer(cfg, DistInfo())
    trainer.train_step()

    def watched(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a host sync (Tensor.{name}) inside train_step")

        return read

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, watched(name))
    last = trainer.train_step()
    monkeypatch.undo()
    assert isinstance(last["loss"], torch.Tensor) and trainer.state.step == 2
    assert trainer._read_metrics(last)["loss"] == pytest.approx(last["loss"].item())


def test_a_checkpoint_is_written_in_the_background_from_a_snapshot(tmp_path, monkeypatch):
    """Checkpointer.save returns before the write finishes; the file holds the state as it was at save time
    (training goes on changing the live tensors); a failed write is raised by the next wait(). Without
    `background` (CPU training) it writes the live state, with no copy, before returning."""
    import time

    from gpt2 import checkpoint

    weights = torch.zeros(3)

    class Owner:
        def state_dict(self):
            return {"w": weights}

        def load_state_dict(self, state):
            weights.copy_(state["w"])

    real_save = checkpoint.save

    def slow_save(path, state):
        time.sleep(1.0)
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    writer = checkpoint.Checkpointer(tmp_path, {"model": Owner()}, (), lambda: {"model_config": {}}, is_main=True)
    t0 = time.perf_counter()
    writer.save(best=True)
    assert time.perf_counter() - t0 < 0.5 and not (tmp_path / "ckpt.pt").exists()
    weights += 1  # the next training steps
    writer.wait()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["w"].sum() == 0
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "ckpt.pt").stat().st_ino

    def full_disk(path, state):
        raise UserError("checkpoint not written (No space left on device)")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    writer.save()
    with pytest.raises(UserError, match="No space left"):
        writer.wait()

    # Training on the CPU: no snapshot (it would double the run's memory); written before save returns.
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setattr(checkpoint, "_cpu_copy", lambda obj: pytest.fail("a snapshot of CPU state"))
    writer = checkpoint.Checkpointer(
        tmp_path, {"model": Owner()}, (), lambda: {"model_config": {}}, is_main=True, background=False
    )
    writer.save()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["w"].sum() == 3
    monkeypatch.setattr(checkpoint, "save", full_disk)
    with pytest.raises(UserError, match="No space left"):
        writer.save()


@pytest.mark.e2e
def test_bad_inputs_fail_with_one_line(char_data, tmp_path):
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    base = [f"data.name={char_data}", f"out_dir={tmp_path / 'run'}", *TINY]

    def error(*overrides: str, world_size: int = 1) -> str:
        with pytest.raises(UserError) as e:
            Trainer(to_object(compose(*base, *overrides), TrainRunConfig), DistInfo(world_size=world_size))
        return str(e.value)

    assert "optim.lr must be > 0" in error("optim.lr=0")
    assert "train.grad_accum_steps=3 is not divisible by the 2 processes" in error(
        "train.grad_accum_steps=3", world_size=2
    )
    missing = error(f"data.name={tmp_path / 'nope'}")
    assert "nope" in missing and "prepare" in missing
    assert "init_from='gpt5'" in error("init_from=gpt5")
    assert "train.tokens_per_step=200 is not a multiple of batch_size x block_size x processes = 4 x 32 x 1" in error(
        "train.tokens_per_step=200"
    )

    # A tokens-per-step target sets grad accumulation: 512 tokens = 4 micro-steps of 4 x 32 (2 per rank on 2).
    trainer = Trainer(to_object(compose(*base, "train.tokens_per_step=512"), TrainRunConfig), DistInfo())
    assert (trainer.accum, trainer.tokens_per_step, trainer.cfg.train.grad_accum_steps) == (4, 512, 4)

    # The CLI prints one line and exits 2; unknown keys fail in Hydra before anything runs.
    p = train([*base, "optim.lr=-1"], tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: optim.lr must be > 0, got -1.0"]
    p = train([*base, "train.bach_size=4"], tmp_path, check=False)
    assert p.returncode != 0 and "bach_size" in p.stderr
    # A preparation key (which train.py would ignore) is refused as a typo is; a preset's are dropped.
    p = train([*base, "data.source=corpus.txt"], tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: data.source is a data/prepare.py key")
    assert len(p.stderr.strip().splitlines()) == 1


def test_resume_with_other_architecture_or_data_fails(char_data, tmp_path):
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare

    out = tmp_path / "run"
    base = [f"data.name={char_data}", f"out_dir={out}", *TINY, "train.max_iters=2", "train.eval_interval=2"]
    trainer(*base).fit()
    with pytest.raises(UserError, match="model.n_layer=3 disagrees with the run being resumed"):
        trainer(*base, "model.n_layer=3", typed_model_keys=frozenset({"n_layer"}))

    (tmp_path / "digits.txt").write_text("0123456789 " * 2000)  # another character vocabulary
    prepare(DataConfig(name="digits", source=str(tmp_path / "digits.txt"), tokenizer="char"), data_root=tmp_path)
    with pytest.raises(UserError, match="tokenizer"):
        trainer(*base, f"data.name={tmp_path / 'digits'}")


@pytest.mark.e2e
def test_multirun_jobs_get_their_own_out_dirs(char_data, tmp_path):
    out = tmp_path / "sweep"
    train(
        [
            "-m",
            f"data.name={char_data}",
            f"out_dir={out}",
            *TINY,
            "train.max_iters=2",
            "train.eval_interval=0",
            "optim.lr=1e-3,2e-3",
        ],
        tmp_path,
    )
    ckpts = sorted(out.rglob("ckpt.pt"))
    assert len(ckpts) == 2 and ckpts[0].parent != ckpts[1].parent
    assert {torch.load(c, weights_only=True)["config"]["optim"]["lr"] for c in ckpts} == {1e-3, 2e-3}


def test_early_stopping_stops_at_the_right_eval_and_a_resume_keeps_count(char_data, tmp_path, monkeypatch, capsys):
    """Scripted val losses 3.0, 2.5, 2.6, 2.4, 2.7, 2.8 at steps 0, 5, ... with patience 2: the best is at step 15,
    steps 20 and 25 bring none, so training stops at step 25 with best.pt from step 15. A run stopped at step 20
    and resumed stops at step 25 too (the count is resumable state)."""
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    losses = {0: 3.0, 5: 2.5, 10: 2.6, 15: 2.4, 20: 2.7, 25: 2.8, 30: 2.0}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"train_loss": 1.0, "val_loss": losses[self.state.step]})

    def fit(out: Path, max_iters: int) -> Trainer:
        cfg = to_object(
            compose(
                f"data.name={char_data}",
                f"out_dir={out}",
                *TINY,
                f"train.max_iters={max_iters}",
                "train.eval_interval=5",
                "train.early_stopping_patience=2",
            ),
            TrainRunConfig,
        )
        trainer = Trainer(cfg, DistInfo())
        trainer.fit()
        return trainer

    for out, runs in ((tmp_path / "straight", [40]), (tmp_path / "resumed", [20, 40])):
        for max_iters in runs:
            trainer = fit(out, max_iters)
        assert trainer.state.step == 25 and trainer.state.best_val_loss == 2.4
        assert torch.load(out / "best.pt", weights_only=True)["step"] == 15
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 25
        evals = [r["step"] for r in records(out, "eval")]
        assert evals == [0, 5, 10, 15, 20, 25]
        assert (
            "early stopping at step 25: no new best val loss in 2 evaluations (best 2.4000" in capsys.readouterr().out
        )


def test_epochs_derive_the_steps_and_a_split_smaller_than_a_batch_is_an_error(char_data, tmp_path, capsys):
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    def trainer(*overrides: str) -> Trainer:
        cfg = to_object(
            compose(f"data.name={char_data}", f"out_dir={tmp_path / 'run'}", *TINY, "data.order=epoch", *overrides),
            TrainRunConfig,
        )
        return Trainer(cfg, DistInfo())

    t = trainer("train.epochs=2", "train.grad_accum_steps=2")
    E = len(t.loader.epoch)
    assert t.cfg.train.max_iters == -(-2 * E // (4 * 2)) and t.loader.order == "epoch"
    assert f"max_iters: {t.cfg.train.max_iters}" in (tmp_path / "run" / "config.yaml").read_text()
    t.fit()
    assert t.loader.state_dict()["position"] * 4 >= 2 * E  # two passes of windows
    assert f"an epoch ({E:,} windows of 32 tokens)" in capsys.readouterr().out
    with pytest.raises(UserError, match="train.epochs needs a training split of at least one global batch"):
        trainer("train.epochs=1", "train.batch_size=4096", f"out_dir={tmp_path / 'big'}")
