"""Sharded checkpoints (gpt2.sharded_checkpoint) in one process (`train.sharded_checkpoint=true`): the layout,
exact resume, consolidation into the single-file format, and damaged or half-written checkpoints. Their
distributed uses (each rank writing and reading its part, resharding across parallelism and world size) are in
tests/test_train_distributed.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, assert_same_weights, bash_blocks, commands, env, trainer, weights

from gpt2 import checkpoint, sharded_checkpoint
from gpt2.errors import UserError

FOUR = ["train.max_iters=4", "train.eval_interval=2", "optim.warmup_iters=0", "optim.lr_decay_iters=8"]


def base(char_data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.name={char_data}", f"out_dir={out}", *TINY, *FOUR, *extra]


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> tuple[Path, Path]:
    """(a sharded run stopped at step 2 and resumed to 4, the same run uninterrupted in one ckpt.pt)."""
    root = tmp_path_factory.mktemp("sharded")
    sharded, single = root / "sharded", root / "single"
    trainer(*base(char_data, sharded, "train.sharded_checkpoint=true", "train.max_iters=2")).fit()
    trainer(*base(char_data, sharded, "train.sharded_checkpoint=true")).fit()
    trainer(*base(char_data, single)).fit()
    return sharded, single


def test_a_sharded_run_resumes_exactly_and_keeps_its_latest_and_best(runs):
    sharded, single = runs
    assert sorted(p.name for p in sharded.iterdir()) == ["ckpt", "config.yaml", "metrics.jsonl"]
    root = sharded / "ckpt"
    assert (root / "latest").read_text() == "step_00000004\n"
    best = (root / "best").read_text().strip()
    assert sorted(p.name for p in root.iterdir()) == sorted({"latest", "best", "step_00000004", best})
    assert sorted(p.name for p in (root / "step_00000004").iterdir()) == [".metadata", "__0_0.distcp", "state.pt"]
    assert_same_weights(weights(sharded), weights(single))  # bit for bit, through a stop and a resume


def test_a_consolidated_sharded_checkpoint_is_the_single_file_of_the_same_run(runs, tmp_path):
    """The README's command, as written, on a copy of the sharded run at its out/run."""
    import shutil

    sharded, single = runs
    shutil.copytree(sharded, tmp_path / "out" / "run")
    readme = (ROOT / "README.md").read_text()
    (argv,) = [c for b in bash_blocks(readme) for c in commands(b) if c[:3] == ["python", "-m", "gpt2.checkpoint"]]
    p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, env=env())
    out = tmp_path / argv[-1]
    assert argv[3:] == ["consolidate", "out/run", "out/run.pt"]
    assert p.returncode == 0 and p.stdout.startswith(f"wrote {argv[-1]} ("), p.stderr
    ours, theirs = torch.load(out, weights_only=True), torch.load(single / "ckpt.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and ours["format_version"] == checkpoint.CHECKPOINT_FORMAT
    assert_same_weights(ours["model"], theirs["model"])
    assert ours["model"]["lm_head.weight"].data_ptr() == ours["model"]["transformer.wte.weight"].data_ptr()  # tied
    for name, moments in theirs["optimizer"]["state"].items():
        assert_same_weights(ours["optimizer"]["state"][name], moments)
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    for key in ("step", "loader", "scaler", "tokenizer", "model_config", "best_val_loss"):
        assert ours[key] == theirs[key], key
    assert all(torch.equal(a["cpu"], b["cpu"]) for a, b in zip(ours["rng"], theirs["rng"]))


def test_a_checkpoint_argument_names_a_run_its_sharded_folder_or_a_pointer(runs):
    sharded, _ = runs
    latest, best = (sharded_checkpoint.named(sharded, pointer) for pointer in ("latest", "best"))
    assert checkpoint.resolve(sharded) == latest == checkpoint.resolve(sharded / "ckpt")
    assert checkpoint.resolve(sharded / "ckpt" / "latest") == latest and checkpoint.resolve(latest) == latest
    assert checkpoint.resolve(sharded / "ckpt" / "best") == best
    assert "optimizer" not in checkpoint.load(sharded, optimizer=False)  # (sampling and export need the model only)


def test_sampling_serving_and_export_load_a_sharded_run_as_its_weights(runs):
    from gpt2 import loading

    sharded, single = runs
    loaded = loading.load(sharded)
    assert loaded.description == f"checkpoint {sharded}" and loaded.tokenizer.name == "char"
    assert_same_weights(loaded.model.state_dict(), weights(single))


def test_a_damaged_sharded_checkpoint_is_named_not_loaded(runs, tmp_path):
    import shutil

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    step = run / "ckpt" / "step_00000004"
    data = step / "__0_0.distcp"
    original = data.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x40
    data.write_bytes(flipped)
    with pytest.raises(UserError, match=r"__0_0.distcp is corrupt: its CRC-32 does not match the one written with it"):
        checkpoint.load(run)
    data.write_bytes(original[:-10])
    with pytest.raises(UserError, match=r"__0_0.distcp is missing or truncated \(expected [\d,]+ bytes\)"):
        checkpoint.load(run)
    data.write_bytes(original)
    (step / "state.pt").unlink()  # (a copy cut short)
    with pytest.raises(UserError, match=r"step_00000004 is not a complete sharded checkpoint"):
        checkpoint.load(run)
    (run / "ckpt" / "latest").write_text("../../etc\n")
    with pytest.raises(UserError, match=r"ckpt/latest does not name a checkpoint"):
        checkpoint.load(run)
    p = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "sample.py"), f"checkpoint={run}", "prompt=a"],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr


def test_a_save_cut_short_leaves_a_folder_that_the_next_run_removes(runs, tmp_path):
    import shutil

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    partial = run / "ckpt" / "step_00000006"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"part of a rank's tensors")  # killed before .metadata and the pointer
    assert checkpoint.resolve(run) == run / "ckpt" / "step_00000004"  # never named: never loaded
    assert checkpoint.remove_stale_temporaries(run) == [partial]
    assert not partial.exists() and checkpoint.load(run)["step"] == 4


def test_a_failed_sharded_save_is_one_line_and_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import filesystem

    run = tmp_path / "run"
    stopped = trainer(*base(char_data, run, "train.sharded_checkpoint=true", "train.max_iters=2"))
    stopped.fit()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    with pytest.raises(UserError) as e:
        stopped.checkpointer.save()
    message = str(e.value)
    assert message.startswith(f"sharded checkpoint {run / 'ckpt' / 'step_00000002-2'} not written (")
    assert "No space left on device" in message and "the previous checkpoint is kept" in message
    assert "MiB free" in message and "\n" not in message
    assert sharded_checkpoint.named(run) == run / "ckpt" / "step_00000002"
    assert checkpoint.load(run)["step"] == 2
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["best", "latest", "step_00000002"]

    monkeypatch.undo()  # the tensors are written; then rank 0's state.pt is not
    monkeypatch.setattr(sharded_checkpoint, "atomic_write", lambda *args: full_disk())
    with pytest.raises(UserError, match=r"step_00000002-2 not written \(OSError: No space left on device\); the prev"):
        stopped.checkpointer.save()
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["best", "latest", "step_00000002"]


def test_a_run_that_goes_on_in_one_file_replaces_its_sharded_checkpoints(char_data, runs, tmp_path):
    """(and the other way: train.sharded_checkpoint decides what the next save writes, whatever was resumed)"""
    import shutil

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    trainer(*base(char_data, run, "train.max_iters=6", "train.eval_interval=1")).fit()
    assert (run / "ckpt.pt").exists() and (run / "best.pt").exists() and not (run / "ckpt").exists()
    assert checkpoint.resolve(run) == run / "ckpt.pt"
    trainer(*base(char_data, run, "train.max_iters=7", "train.sharded_checkpoint=true")).fit()
    assert not (run / "ckpt.pt").exists() and (run / "best.pt").exists() != (run / "ckpt" / "best").exists()
    assert checkpoint.resolve(run) == run / "ckpt" / "step_00000007"
