"""Loss curves: `python -m gpt2.plot out/run [out/run2 ...] [--x step|tokens] [--out path.png]`.

Reads each run's `metrics.jsonl` (training lines: `step`, `loss`, `lr`, `tokens_seen`, ...; eval lines: `step`,
`train_loss`, `val_loss`; optional `hellaswag_acc_norm`) and draws train loss (solid) and val loss (dashed,
dots) on one panel, the learning rate on a second and HellaSwag accuracy on a third when a run logged it, with
the runs overlaid in one colour each. One run: saved as `<run>/loss.png`; several: next to them, in the first
run's parent directory (or `--out`). The path is printed. matplotlib is an optional extra (`gpt2[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gpt2.errors import UserError, exit_on_user_error

METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    """The curves of one run, each a list of (step, value) sorted by step."""

    name: str
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    tokens: list[tuple[int, float]] = field(default_factory=list)
    """tokens_seen at each training line (for --x tokens)."""
    hellaswag: list[tuple[int, float]] = field(default_factory=list)


def metrics_path(run: str | Path) -> Path:
    """A run directory -> its metrics.jsonl; a .jsonl file stays as is."""
    p = Path(run)
    return p / METRICS_FILE if p.is_dir() else p


def read_run(run: str | Path) -> Run:
    """Parse a run's metrics.jsonl. A resumed run logs some steps twice: the last line of a step wins.

    A truncated last line (a run killed mid-write) is skipped; any other unreadable line, a missing file or a
    file without any loss values is a UserError.
    """
    path = metrics_path(run)
    if not path.is_file():
        raise UserError(f"no {METRICS_FILE} at {path}: pass a run's out_dir (it is written during training)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # a partial last line from a killed run
                continue
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    curves: dict[str, dict[int, float]] = {
        k: {} for k in ("loss", "val_loss", "lr", "tokens_seen", "hellaswag_acc_norm")
    }
    for record in records:
        for key, curve in curves.items():
            if isinstance(record.get(key), (int, float)):
                curve[int(record["step"])] = float(record[key])
    if not curves["loss"] and not curves["val_loss"]:
        raise UserError(f"{path} has no loss or val_loss values yet; train for at least log_interval steps")
    name = path.parent.name if path.name == METRICS_FILE else path.stem
    as_list = {k: sorted(v.items()) for k, v in curves.items()}
    return Run(
        name, as_list["loss"], as_list["val_loss"], as_list["lr"], as_list["tokens_seen"], as_list["hellaswag_acc_norm"]
    )


def _x(run: Run, points: list[tuple[int, float]], axis: str) -> list[float]:
    """x coordinates of `points`: their steps, or tokens seen at those steps (interpolated between logs)."""
    steps = [s for s, _ in points]
    if axis == "step":
        return steps
    import numpy as np

    if not run.tokens:
        raise UserError(f"run {run.name} logged no tokens_seen; plot it with --x step")
    known = ([(0, 0.0)] if run.tokens[0][0] > 0 else []) + run.tokens  # no tokens are seen before step 0
    ks, kt = (np.array(v, dtype=float) for v in zip(*known))
    xs = np.interp(steps, ks, kt)
    if len(ks) > 1:  # past the last training line (a final eval): extend at the last tokens-per-step rate
        rate = (kt[-1] - kt[-2]) / (ks[-1] - ks[-2])
        xs = np.where(np.array(steps) > ks[-1], kt[-1] + (np.array(steps) - ks[-1]) * rate, xs)
    return list(xs)


def default_output(runs: Sequence[str | Path]) -> Path:
    """One run: `<run>/loss.png`. Several: `<parent of the first>/loss_<name1>_vs_<name2>....png`."""
    dirs = [metrics_path(r).parent for r in runs]
    if len(dirs) == 1:
        return dirs[0] / "loss.png"
    names = "_vs_".join(d.resolve().name for d in dirs)[:120]
    return dirs[0].resolve().parent / f"loss_{names}.png"


def plot(runs: Sequence[str | Path], x: str = "step", out: str | Path | None = None) -> Path:
    """Draw the runs' curves into a PNG; returns its path. See the module docstring."""
    if x not in ("step", "tokens"):
        raise UserError(f"x={x!r} is not valid; choose step or tokens")
    if not runs:
        raise UserError("no runs given: pass one or more run directories (out_dir) to plot")
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: pip install 'gpt2[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    data = [read_run(r) for r in runs]
    panels = 3 if any(d.hellaswag for d in data) else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.5 * panels), sharex=True, squeeze=True)
    loss_ax, lr_ax = axes[0], axes[1]
    for i, run in enumerate(data):
        color = f"C{i}"
        if run.train_loss:
            loss_ax.plot(
                _x(run, run.train_loss, x),
                [v for _, v in run.train_loss],
                color=color,
                lw=1.2,
                alpha=0.85,
                label=f"{run.name} train",
            )
        if run.val_loss:
            loss_ax.plot(
                _x(run, run.val_loss, x),
                [v for _, v in run.val_loss],
                color=color,
                lw=2,
                ls="--",
                marker="o",
                ms=4,
                label=f"{run.name} val",
            )
        if run.lr:
            lr_ax.plot(_x(run, run.lr, x), [v for _, v in run.lr], color=color, lw=1.5, label=run.name)
        if run.hellaswag:
            axes[2].plot(
                _x(run, run.hellaswag, x),
                [v for _, v in run.hellaswag],
                color=color,
                lw=1.5,
                marker="o",
                ms=4,
                label=run.name,
            )
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title("loss" if len(data) > 1 else f"{data[0].name}: loss")
    loss_ax.legend(loc="upper right", fontsize="small")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if panels == 3:
        axes[2].set_ylabel("HellaSwag acc_norm")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step" if x == "step" else "tokens")
    if x == "tokens":
        from matplotlib.ticker import EngFormatter

        axes[-1].xaxis.set_major_formatter(EngFormatter())  # 500k, 1M, 10G instead of raw counts
    fig.tight_layout()
    path = Path(out) if out else default_output(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m gpt2.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (out_dir) or metrics.jsonl files")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default: step)")
    parser.add_argument("--out", help="PNG path (default: <run>/loss.png, or next to the runs for several)")
    args = parser.parse_args(argv)
    path = plot(args.runs, x=args.x, out=args.out)
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
