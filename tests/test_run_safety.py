"""Nothing a user has is lost around a run: one trainer per out_dir, resumes that change settings say what
they do (or refuse), broken metrics lines, stale temporary files, signals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TRAIN, assert_same_weights, env, model_entries, records, train, trainer, weights


def base(char_data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.name={char_data}", f"out_dir={out}", *TINY, *extra]


FOUR = ["train.max_iters=4", "train.eval_interval=2", "optim.warmup_iters=0", "optim.lr_decay_iters=8"]


@pytest.fixture(scope="module")
def four_steps(char_data, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4): each test resumes its own copy."""
    out = tmp_path_factory.mktemp("four") / "run"
    train(base(char_data, out, *FOUR), out.parent)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_the_lock_holders_words_reach_the_file_server_before_the_run_goes_on(tmp_path, monkeypatch):
    """On NFS other nodes see a file's new content once the writer flushes it (fsync, or close, which comes only at
    the run's end); `check_shared` on every node reads rank 0's words from it. So: written, then fsynced, before
    the run starts (a fake fsync records what the file held when it was called)."""
    import os

    from gpt2 import runlock

    flushed = []
    monkeypatch.setattr(runlock.os, "fsync", lambda fd: flushed.append(os.pread(fd, 256, 0).decode()))
    with runlock.run_lock(tmp_path / "run"):
        assert len(flushed) == 1 and flushed[0] == (tmp_path / "run" / ".lock").read_text()
        assert flushed[0].startswith(f"pid {os.getpid()} on ")


@pytest.mark.e2e
def test_a_second_trainer_on_the_same_out_dir_fails_naming_the_first(char_data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        TRAIN + base(char_data, out, "train.max_iters=100000", "train.eval_interval=0"),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while (
            not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size) and time.time() < deadline
        ):
            time.sleep(0.05)
        second = train(base(char_data, out, "train.max_iters=4"), tmp_path, check=False)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"error: out_dir={out} is in use by another run (pid {first.pid} on "
            + second.stderr.split(" on ", 1)[1].split("\n")[0]
        ]
        assert "wait for it to finish, stop it, or use another out_dir" in second.stderr
    finally:
        first.kill()  # kill -9: the kernel drops the lock with the process
        first.wait()
    third = train(base(char_data, out, "train.max_iters=4", "train.eval_interval=2"), tmp_path)
    assert "step 4 | loss" in third.stdout


@pytest.mark.e2e
def test_resume_applies_changed_optimizer_settings_from_the_resume_step(char_data, four_steps, tmp_path):
    from gpt2.config import OptimConfig
    from gpt2.optim import lr_at

    out = copy_of(four_steps, tmp_path)
    args = base(char_data, out, *FOUR)
    p = train([*args, "train.max_iters=8", "optim.lr=1e-5", "optim.weight_decay=0.9"], tmp_path)
    assert (
        "resuming with changed optim.lr 0.003 -> 1e-05, optim.weight_decay 0.1 -> 0.9: applied from step 4" in p.stdout
    )
    new = OptimConfig(lr=1e-5, warmup_iters=0, lr_decay_iters=8)
    logged = {r["step"]: r["lr"] for r in records(out)}
    assert [logged[s] for s in range(5, 9)] == pytest.approx([lr_at(s - 1, new, 8) for s in range(5, 9)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.9, 0.0] and {g["base_lr"] for g in groups} == {1e-5}
    assert ckpt["config"]["optim"]["lr"] == 1e-5 and "lr: 1.0e-05" in (out / "config.yaml").read_text()


@pytest.mark.e2e
def test_a_rerun_that_contradicts_the_run_in_out_dir_is_refused(char_data, four_steps, tmp_path):
    out = copy_of(four_steps, tmp_path)
    config = (out / "config.yaml").read_text()
    p = train(base(char_data, out, *FOUR, f"init_from={out}"), tmp_path, check=False)
    assert (
        p.returncode == 2
        and f"init_from={out} disagrees with the run in {out}, which started from init_from=scratch" in p.stderr
    ), p.stderr
    p = train(base(char_data, out, *FOUR, "train.max_iters=2"), tmp_path, check=False)
    assert p.returncode == 2 and "train.max_iters=2 is below step 4, which the run in" in p.stderr, p.stderr
    assert (out / "config.yaml").read_text() == config  # nothing rewritten


@pytest.mark.e2e
def test_a_resume_drops_a_partial_metrics_line_and_stale_temporaries(char_data, four_steps, tmp_path):
    """A resume drops a cut-short metrics line and stale save temporaries; an unchanged dataset draws no warning."""
    out = copy_of(four_steps, tmp_path)
    args = base(char_data, out, *FOUR)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill or a full disk mid-write
    stale = [out / ".ckpt.pt.424242.tmp", out / ".best.pt.424242.tmp"]  # saves that were cut short
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (out / "notes.tmp").write_text("not ours")
    p = train([*args, "train.max_iters=6"], tmp_path)
    assert "dropped 1 incomplete record(s)" in p.stdout and "was prepared again" not in p.stdout
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert not any(path.exists() for path in stale) and (out / "notes.tmp").exists()
    assert f"removed {stale[0]}, left by a save that was interrupted" in p.stdout


def test_further_signals_do_not_interrupt_the_stop(capsys):
    """Under torchrun and SLURM one stop reaches a worker twice or more (see gpt2.stopping); the torchrun test of it
    is tests/test_train_distributed.py::test_a_second_sigterm_under_torchrun_does_not_abort_the_save."""
    from gpt2.distributed import DistInfo
    from gpt2.stopping import STOP_SIGNALS, StopSignals

    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # a dropped ssh session saves too

    stop = StopSignals(DistInfo(), Path("out/run/ckpt.pt"))
    previous = signal.getsignal(signal.SIGINT)
    try:
        with stop:
            assert signal.getsignal(signal.SIGTERM) == stop._on_signal
            signal.raise_signal(signal.SIGINT)
            assert stop.requested and stop.agreed() == signal.SIGINT
            assert "got SIGINT: finishing this step, then saving out/run/ckpt.pt" in capsys.readouterr().out
            signal.raise_signal(signal.SIGINT)  # neither a KeyboardInterrupt nor an exit
            signal.raise_signal(signal.SIGTERM)
            assert stop.agreed() == signal.SIGINT and capsys.readouterr().out == ""  # the first stands, said once
            stop.signal = None
            stop._on_signal(signal.SIGHUP, None)  # stdout is no terminal here: nothing to detach
            assert stop.signal == signal.SIGHUP and "got SIGHUP: finishing this step" in capsys.readouterr().out
        assert signal.getsignal(signal.SIGINT) == previous  # the run's handlers are gone with it
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_block_size_or_model_that_cannot_fit_fails_before_allocating(char_data, tmp_path):
    import resource

    from conftest import compose

    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.errors import UserError
    from gpt2.training import Trainer

    def error(*overrides: str) -> str:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(UserError) as e:
            Trainer(to_object(compose(*base(char_data, tmp_path / "run", *overrides)), TrainRunConfig), DistInfo())
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: nothing big allocated
        return str(e.value)

    assert "block_size=1000000 is too large for the train split" in error("model.block_size=1000000")
    assert "block_size=10000 is too large for the val split" in error("model.block_size=10000")
    assert "GiB for weights, gradients and AdamW state alone, more than the" in error(
        "model.n_layer=48", "model.n_embd=8192", "model.n_head=64"
    )
    assert not (tmp_path / "run").exists()


def small_checkpoint(path: Path) -> dict:
    from gpt2 import checkpoint
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
    checkpoint.save(path, {**model_entries(model), "tokenizer": {"name": "gpt2"}})
    return model.state_dict()


def test_flipped_or_truncated_checkpoints_are_named_not_loaded_as_nan(tmp_path):
    from gpt2 import checkpoint
    from gpt2.errors import UserError

    path = tmp_path / "ckpt.pt"
    weights = small_checkpoint(path)
    assert torch.equal(
        checkpoint.load(path)["model"]["transformer.h.0.mlp.c_fc.weight"], weights["transformer.h.0.mlp.c_fc.weight"]
    )
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.pt"
    data[len(data) // 2] ^= 0x40  # one bit, inside a tensor's bytes
    flipped.write_bytes(data)
    with pytest.raises(UserError, match=r"flipped.pt is corrupt: record .* does not match its stored checksum"):
        checkpoint.load(flipped)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated.pt is not a PyTorch checkpoint \(not a zip archive: truncated"):
        checkpoint.load(truncated)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from gpt2.errors import UserError

    path = tmp_path / "ckpt.pt"
    small_checkpoint(path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as e:
        small_checkpoint(path)
    message = str(e.value)
    assert message.startswith("checkpoint not written (No space left on device); ")
    assert f"{path} is still the previous checkpoint" in message and "MiB free" in message and "\n" not in message
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]  # no temporary left behind


@pytest.mark.e2e
def test_resuming_on_a_re_prepared_dataset_says_so(char_data, four_steps, tmp_path):
    import shutil

    data = Path(shutil.copytree(char_data, tmp_path / "chars"))
    out = copy_of(four_steps, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    meta["prepared_at"] = "2026-11-25T23:59:59+0000"  # what `overwrite=true` changes (and the shards)
    (data / "meta.json").write_text(json.dumps(meta))
    p = train(base(data, out, *FOUR, "train.max_iters=6"), tmp_path)
    assert f"warning: {data} was prepared again since this run's last checkpoint" in p.stdout


@pytest.mark.e2e
def test_a_signal_during_a_long_eval_stops_promptly_and_the_resume_redoes_it(char_data, tmp_path):
    """eval_iters=1000 makes the eval at step 6 take seconds: the stop must not wait for it to end."""
    out = tmp_path / "run"
    trainer(*base(char_data, out, "train.max_iters=3", "train.eval_interval=6")).fit()  # evals at 0 and 3, quick
    args = base(char_data, out, "train.max_iters=12", "train.eval_interval=6", "train.eval_iters=1000")
    proc = subprocess.Popen(
        TRAIN + args, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"step": 6, "loss"' in metrics.read_text()):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the eval at step 6, which takes several seconds
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert time.time() - t0 < 3, output[-2000:]
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal 15 at step 6" in output
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    assert [r["step"] for r in records(out, "eval")] == [0, 3]  # the abandoned eval was not logged
    trainer(*args, "train.max_iters=7", "train.eval_iters=2").fit()
    assert [r["step"] for r in records(out, "eval")] == [0, 3, 6, 7]  # the resume redid the eval at step 6


def test_a_stop_during_the_step_0_eval_resumes_exactly(char_data, tmp_path):
    """The checkpoint of a run stopped before its first step holds an optimizer that never stepped (torch's
    optimizer state-dict API would step it once with lr 0 to make a state, and the resume would count one Adam
    step too many)."""
    out = tmp_path / "run"
    stopped = trainer(*base(char_data, out, *FOUR))
    stopped.stop.signal = signal.SIGTERM  # as if it came during the eval at step 0
    with pytest.raises(SystemExit) as e:
        stopped.fit()
    assert e.value.code == 128 + signal.SIGTERM
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 0
    trainer(*base(char_data, out, *FOUR)).fit()
    trainer(*base(char_data, tmp_path / "whole", *FOUR)).fit()
    assert_same_weights(weights(out), weights(tmp_path / "whole"))


def test_an_out_dir_that_is_a_file_or_cannot_be_made_fails_before_any_work(tmp_path):
    from gpt2.errors import UserError
    from gpt2.runlock import run_lock

    (tmp_path / "taken").write_text("a file of the user's")
    with pytest.raises(UserError, match=rf"^out_dir={tmp_path / 'taken'} is a file, not a directory; choose another"):
        with run_lock(tmp_path / "taken"):
            pass
    assert (tmp_path / "taken").read_text() == "a file of the user's"
    with pytest.raises(UserError, match=r"cannot create out_dir=.*; choose a writable out_dir"):
        with run_lock(tmp_path / "taken" / "run"):
            pass


FORMAT_1_RUN = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
    "model.dropout=0.1",
    "train.batch_size=2",
    "train.eval_iters=1",
    "train.log_interval=1",
    "train.eval_interval=3",
    "optim.warmup_iters=2",
    "optim.lr=3e-3",
    "optim.lr_decay_iters=10",
    "device=cpu",
    "dtype=float32",
    "compile=false",
]
"""The run of tests/fixtures/format1_ckpt.pt (6 steps; tests/fixtures/make_format1_ckpt.py writes it)."""


@pytest.mark.e2e
def test_a_checkpoint_of_format_1_resumes_exactly(char_data, tmp_path):
    """Checkpoints written before the optimizer state was keyed by parameter name (format 1, tests/fixtures:
    6 steps of the run below, with dropout) upgrade on load and continue on the uninterrupted run's weights."""
    args = [f"data.name={char_data}", *FORMAT_1_RUN, "train.max_iters=10"]
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "format1_ckpt.pt", old / "ckpt.pt")
    assert torch.load(old / "ckpt.pt", weights_only=True)["format_version"] == 1
    p = train([f"out_dir={old}", *args], tmp_path)
    assert "resuming" in p.stdout and "at step 6" in p.stdout
    train([f"out_dir={tmp_path / 'full'}", *args], tmp_path)
    # Bit for bit: the fixture's 6 steps are this code's (regenerate it when the random streams change).
    resumed, full = weights(old), weights(tmp_path / "full")
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key
    assert torch.load(old / "ckpt.pt", weights_only=True)["format_version"] == 2


@pytest.mark.parametrize("grace_s, saved_at", [(0.001, 3), (1000.0, 4)], ids=["past-grace", "within-grace"])
def test_a_stop_abandons_a_step_that_would_end_past_the_grace_and_the_resume_redoes_it(
    char_data, tmp_path, grace_s, saved_at
):
    """A signal during step 4's second micro-step (of 4): with a 1 ms grace the step is abandoned before its third
    (gradients dropped; the data position and the dropout RNG rewound), so the checkpoint is step 3's and the
    resume redoes step 4 from its first micro-batch; with a long grace the step is finished and saved. Either way
    the resumed run ends bit for bit where an uninterrupted one does (dropout on: a rewind that missed the RNG
    would show)."""
    args = [*FOUR, "train.max_iters=6", "train.eval_interval=0", "train.grad_accum_steps=4", "model.dropout=0.1"]
    out = tmp_path / "run"
    stopped = trainer(*base(char_data, out, *args, f"train.stop_grace_s={grace_s}"))
    next_batch, calls = stopped.loader.next_batch, []

    def signalled_next_batch():
        calls.append(stopped.state.step)
        if calls.count(3) == 2:  # step 4's second micro-batch
            stopped.stop._on_signal(signal.SIGTERM, None)
        return next_batch()

    stopped.loader.next_batch = signalled_next_batch
    with pytest.raises(SystemExit) as e:
        stopped.fit()
    assert e.value.code == 128 + signal.SIGTERM
    assert calls.count(3) == (2 if saved_at == 3 else 4)
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == saved_at and saved["loader"]["position"] == 4 * saved_at
    trainer(*base(char_data, out, *args)).fit()
    trainer(*base(char_data, tmp_path / "whole", *args)).fit()
    assert_same_weights(weights(out), weights(tmp_path / "whole"))
