"""A bad day for a training run: kills, signals, a full disk and double starts, then a check that nothing was lost.

    python bench/faults.py                 # 12 faults, seed 0
    python bench/faults.py --faults 30 --seed 3

One uninterrupted run of a tiny character model is the reference. The same command is then started again and again
on a second out_dir, each time hit by one fault at a random moment:
- kill -9, SIGTERM, SIGINT or SIGHUP (a dropped ssh session);
- a full disk: the process may write at most 64 KB per file (RLIMIT_FSIZE, as a quota or a full volume does),
  so every checkpoint save fails for real;
- a second command on the same out_dir while the first runs (it must be refused, and change nothing).
Each time the run is restarted with the same command until it completes. The final weights must equal the
reference's bit for bit, metrics.jsonl must hold every step once, and a file of the user's in out_dir must survive.
Prints one line per fault and exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "train.py")]
RUN = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "model.dropout=0.1",
    "train.batch_size=8",
    "train.max_iters=400",
    "train.eval_interval=50",
    "train.eval_iters=4",
    "train.log_interval=1",
    "optim.lr_decay_iters=400",
    "device=cpu",
    "dtype=float32",
    "compile=false",
]


KINDS = ["kill -9", "SIGTERM", "SIGINT", "SIGHUP", "full disk", "double start"]


def start(args: list[str], cwd: Path, file_limit: int | None = None) -> subprocess.Popen:
    """`train.py args` in the background, one thread (the same for every run, so runs compare bit for bit)."""

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        TRAIN + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit
    )


def run_to_end(args: list[str], cwd: Path) -> None:
    proc = start(args, cwd)
    output, _ = proc.communicate()
    assert proc.returncode == 0, output[-2000:]


def steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def fault(kind: str, args: list[str], cwd: Path, out: Path, rng: random.Random) -> str:
    """Run once under `kind`; return what happened, in a few words."""
    if kind == "full disk":
        proc = start(args, cwd, file_limit=64 * 1024)
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode in (0, 2), output[-2000:]
        line = next((x for x in output.splitlines() if x.startswith("error: checkpoint not written")), "")
        assert proc.returncode == 0 or line, output[-2000:]
        return f"exit {proc.returncode}: {line[:90]}"
    proc = start(args, cwd)
    target = steps_logged(out) + rng.randint(3, 30)
    while proc.poll() is None and steps_logged(out) < target:
        time.sleep(0.02)
    if proc.poll() is not None:
        return f"finished before the fault (exit {proc.returncode})"
    if kind == "double start":
        second = start(args, cwd)
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and "is in use by another run" in output, output[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        return "second command refused: " + output.strip().splitlines()[-1][:70]
    sig = {"kill -9": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGHUP": signal.SIGHUP}[kind]
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return f"exit {proc.returncode} at step {steps_logged(out)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="*", default=KINDS, choices=KINDS, help="faults to draw from")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gpt2-faults-"))
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare_char", f"data_root={work}"],
        check=True,
        capture_output=True,
    )
    common = [f"data.name={work / 'shakespeare_char'}", *RUN]
    reference, faulted = work / "reference", work / "faulted"
    run_to_end(common + [f"out_dir={reference}"], work)
    faulted.mkdir()
    (faulted / "my_notes.txt").write_text("a file of the user's")

    run_args = common + [f"out_dir={faulted}"]
    for i in range(args.faults):
        kind = args.kinds[i] if i < len(args.kinds) else rng.choice(args.kinds)
        what = fault(kind, run_args, work, faulted, rng)
        print(f"fault {i + 1:2d} {kind:12s} {what}", flush=True)
        if what.startswith("finished"):
            break
    run_to_end(run_args, work)

    ours, theirs = (torch.load(d / "ckpt.pt", weights_only=True) for d in (faulted, reference))
    same = ours["model"].keys() == theirs["model"].keys() and all(
        torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"]
    )
    steps = [json.loads(x)["step"] for x in (faulted / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    checks = {
        "final weights equal the uninterrupted run's, bit for bit": same,
        "metrics.jsonl holds every training step once": steps == list(range(1, 401)),
        "the user's file in out_dir is untouched": (faulted / "my_notes.txt").read_text() == "a file of the user's",
        "no temporary checkpoint left behind": not list(faulted.glob(".*.tmp")),
    }
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
