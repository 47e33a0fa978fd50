"""Side by side with nanoGPT's `train.py` on this machine, alternating runs (issue 14's CPU proxies).

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt      # any checkout; nothing else downloads
    python bench/vs_nanogpt.py --nanogpt /tmp/nanogpt [--pairs 2] [--no-append]

(a) The CPU recipe (nanoGPT README "I only have a macbook"; our `experiment=shakespeare_char_cpu`, the same
    model, data and batch with Muon for 600 steps): wall time of the whole command, start-up, evals and
    checkpoints included, and the final val loss. Goal: the same val loss (<= 1.89) in at most 2/3 of nanoGPT's
    time. Each pair also runs ours with nanoGPT's own AdamW recipe (2000 steps), which isolates the trainer.
(b) The GPU recipe's shape (6 x 384, context 256, batch 64, dropout 0.2; `experiment=shakespeare_char`) on
    the CPU: ms per training step (mean over steps 3-6, fp32 and eager on both sides), tokens/s and the ratio.

Both prepare tiny-shakespeare from the copy this package ships (nanoGPT's prepare.py downloads it otherwise).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NANO_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
            "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # fmt: skip
"""nanoGPT README's CPU command, as written."""
NANO_GPU_SHAPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=1",
                  "--eval_interval=100000", "--log_interval=1", "--max_iters=6"]  # fmt: skip


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0, p.stdout + p.stderr


def last_val_loss(output: str) -> float:
    return float(re.findall(r"val loss (\d+\.\d+)", output)[-1])


def ours(args: list[str], work: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"data.name={work / 'data' / 'shakespeare_char'}", *args]


OURS_CPU = {"our demo (Muon, 600 steps)": ["experiment=shakespeare_char_cpu"],
            "ours, nanoGPT's AdamW recipe": ["experiment=shakespeare_char_cpu", "optim=adamw", "train.max_iters=2000",
                                             "train.eval_interval=250"]}  # fmt: skip


def cpu_recipe(nano: Path, work: Path, pairs: int) -> list[dict[str, tuple[float, float]]]:
    """{run: (seconds, final val loss)} per round of nanoGPT then each of OURS_CPU, alternating."""
    rounds = []
    for i in range(pairs):
        shutil.rmtree(nano / "out-shakespeare-char", ignore_errors=True)
        nano_s, nano_out = timed([sys.executable, "train.py", *NANO_CPU], nano)
        runs = {"nanoGPT": (nano_s, last_val_loss(nano_out))}
        for j, (name, args) in enumerate(OURS_CPU.items()):
            our_s, our_out = timed(ours([*args, f"out_dir={work / f'cpu{i}_{j}'}"], work), work)
            runs[name] = (our_s, last_val_loss(our_out))
        rounds.append(runs)
        print(f"round {i + 1}: " + ", ".join(f"{k} {s:.0f} s (val {v:.4f})" for k, (s, v) in runs.items()), flush=True)
    return rounds


def gpu_shape(nano: Path, work: Path) -> tuple[float, float]:
    """ms per step (steps 3-6) of nanoGPT and of ours on the GPU recipe's shape."""
    _, nano_out = timed([sys.executable, "train.py", *NANO_GPU_SHAPE], nano)
    nano_ms = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time (\d+\.\d+)ms", nano_out) if int(i) >= 3]
    _, our_out = timed(ours(["experiment=shakespeare_char", "device=cpu", "dtype=float32", "compile=false",
                             "train.max_iters=6", "train.eval_interval=0", "train.eval_iters=1", "train.log_interval=1",
                             f"out_dir={work / 'gpu_shape'}"], work), work)  # fmt: skip
    our_ms = [float(ms) for step, ms in re.findall(r"step (\d+) \| loss [^|]+\| lr [^|]+\| grad norm [^|]+\| "
                                                    r"(\d+\.\d+) ms", our_out) if int(step) >= 4]  # fmt: skip
    return sum(nano_ms) / len(nano_ms), sum(our_ms) / len(our_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout (train.py, config/, data/)")
    p.add_argument("--pairs", type=int, default=2, help="alternating runs of the CPU recipe")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    import report
    from gpt2.resources import TINY_SHAKESPEARE

    nano = args.nanogpt.resolve()
    shutil.copyfile(TINY_SHAKESPEARE, nano / "data" / "shakespeare_char" / "input.txt")
    timed([sys.executable, "data/shakespeare_char/prepare.py"], nano)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        timed([sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare_char", f"data_root={work / 'data'}"],
              work)  # fmt: skip
        runs = cpu_recipe(nano, work, args.pairs)
        nano_ms, our_ms = gpu_shape(nano, work)
    tokens = 64 * 256
    rows = ["| run | nanoGPT | ours | ratio (nanoGPT / ours) |", "|---|---|---|---|"]
    for i, round_ in enumerate(runs):
        ns, nv = round_["nanoGPT"]
        for name in OURS_CPU:
            os_, ov = round_[name]
            rows.append(f"| (a) CPU recipe, round {i + 1}, {name}: wall s (final val loss) | {ns:.0f} ({nv:.4f}) "
                        f"| {os_:.0f} ({ov:.4f}) | {ns / os_:.2f}x |")  # fmt: skip
    rows.append(f"| (b) GPU recipe shape on CPU: ms/step (tokens/s) | {nano_ms:.0f} ({tokens / nano_ms * 1e3:,.0f}) "
                f"| {our_ms:.0f} ({tokens / our_ms * 1e3:,.0f}) | {nano_ms / our_ms:.2f}x |")  # fmt: skip
    table = "\n".join(rows)
    print(table)
    section = (f"{report.heading('Against nanoGPT on the CPU')}\n\n`{report.command_line()}` on {report.machine()}, "
               f"nanoGPT at its checkout's HEAD, runs alternating. (a) is each README's CPU command (ours also with "
               f"nanoGPT's AdamW recipe), whole wall time; (b) is fp32, eager, steps 3-6.\n\n{table}\n")  # fmt: skip
    if not args.no_append:
        report.append(section)


if __name__ == "__main__":
    main()
