"""Plots: a PNG of the expected size whose pixels show each run's lines in its colour; one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from gpt2 import plot

pytest.importorskip("matplotlib")

BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # matplotlib's C0, C1, C2


def write_metrics(run_dir, steps=200, eval_every=50, scale=1.0, hellaswag=False, extra_lines=()) -> None:
    """Synthetic metrics.jsonl in the trainer's format: training lines and eval lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, steps + 1, 10):
            loss = scale * (4.0 * math.exp(-step / 60) + 1.5)
            lr = 1e-3 * min(1.0, (step + 1) / 50) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": 1.0,
                        "ms_per_step": 50.0,
                        "tokens_per_sec": 1000.0,
                        "tokens_seen": step * 4096,
                    }
                )
                + "\n"
            )
            if step % eval_every == 0:
                record = {"step": step, "train_loss": loss, "val_loss": loss + 0.1}
                if hellaswag:
                    record["hellaswag_acc_norm"] = 0.25 + step / steps / 20
                f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def colour_pixels(png, rgb, tol=40) -> np.ndarray:
    """Mask of pixels within `tol` of `rgb` (imread gives floats in [0, 1])."""
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3] * 255
    return np.abs(img - np.array(rgb)).max(axis=-1) < tol


def test_one_run_draws_loss_and_lr(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    path = plot.main([str(tmp_path / "run")])
    assert path == tmp_path / "run" / "loss.png" and capsys.readouterr().out.strip() == str(path)
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (700, 1000)  # 10 x 7 inches at 100 dpi
    blue = colour_pixels(path, BLUE)
    assert blue[:350].sum() > 500  # the loss curves in the top panel
    assert blue[350:].sum() > 300  # the learning rate in the bottom panel
    assert colour_pixels(path, ORANGE).sum() == 0  # one run, one colour


def test_runs_are_overlaid_in_their_own_colours(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b", scale=0.8, hellaswag=True)
    out = tmp_path / "cmp" / "both.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--x", "tokens", "--out", str(out)]) == out
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (1050, 1000)  # three panels: HellaSwag was logged
    assert colour_pixels(out, BLUE).sum() > 500 and colour_pixels(out, ORANGE).sum() > 500
    assert colour_pixels(out, ORANGE)[700:].sum() > 50  # run b's HellaSwag curve in the third panel
    assert plot.default_output([tmp_path / "a", tmp_path / "b"]) == tmp_path / "loss_a_vs_b.png"


def test_resumed_and_killed_runs_parse(tmp_path):
    write_metrics(tmp_path / "run", steps=40, extra_lines=['{"step": 30, "loss": 9.0, "lr": 0.1}', '{"step": 4'])
    run = plot.read_run(tmp_path / "run")
    assert dict(run.train_loss)[30] == 9.0  # the line logged after the resume wins
    assert [s for s, _ in run.train_loss] == [0, 10, 20, 30, 40] and len(run.val_loss) == 1


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    write_metrics(tmp_path / "bad", extra_lines=["not json", '{"step": 1}'])
    write_metrics(tmp_path / "ok")
    cases = [
        ([str(tmp_path / "nope")], "no metrics.jsonl at"),
        ([str(tmp_path / "empty")], "has no loss or val_loss values"),
        ([str(tmp_path / "bad")], "metrics.jsonl:"),
    ]
    for args, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            plot.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "ok")])
    assert "pip install 'gpt2[plot]'" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_prints_the_path(tmp_path):
    write_metrics(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2.plot", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "run" / "loss.png")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000


def test_tokens_axis_maps_eval_steps_through_tokens_seen(tmp_path):
    write_metrics(tmp_path / "run", steps=40, eval_every=20)  # training lines from step 0, 4096 tokens/step
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 50, "train_loss": 2.0, "val_loss": 2.1}) + "\n")  # after the last log
    run = plot.read_run(tmp_path / "run")
    run.tokens = run.tokens[1:]  # as the trainer logs: the first training line is at step 10
    assert plot._x(run, run.val_loss, "tokens") == [0.0, 20 * 4096, 40 * 4096, 50 * 4096]
