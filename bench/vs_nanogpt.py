"""Side by side with nanoGPT's `train.py` on this machine, alternating runs (issue 14's CPU proxies).

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt      # any checkout; nothing else downloads
    python bench/vs_nanogpt.py --nanogpt /tmp/nanogpt [--pairs 2] [--no-append]

(a) The CPU recipe (nanoGPT README "I only have a macbook"; our `experiment=shakespeare_char_cpu`, the same
    model, data and batch with Muon for 600 steps): wall time of the whole command, start-up, evals and
    checkpoints included, and the final val loss. Goal: the same val loss (<= 1.89) in at most 2/3 of nanoGPT's
    time. Each pair also runs ours with nanoGPT's own AdamW recipe (2000 steps), which isolates the trainer.
(b) The GPU recipe's shape (6 x 384, context 256, batch 64, dropout 0.2; `experiment=shakespeare_char`) on
    the CPU: ms per training step (mean over steps 3-6, fp32 and eager on both sides), tokens/s and the ratio,
    --shape-pairs alternating runs; and what the step's FLOPs per second are of this CPU's fp32 matmul ceiling
    (measured in the same run at the step's largest products), which bounds every trainer's tokens/s. Then the
    same shape in one process, --shape-rounds steps of nanoGPT's model, ours, and ours with torch's dropout
    alternating (this shared machine's speed drifts between processes more than between steps).

With --gpu (on a CUDA machine) it runs instead:
(c) the GPU recipe as each README gives it (`config/train_shakespeare_char.py`; our `experiment=shakespeare_char`:
    bf16, torch.compile, AdamW, evals every 250 steps) for --gpu-iters steps (lr decay over as many), one run
    each: whole wall time, final val loss and the median ms per step after step 100.

Both prepare tiny-shakespeare from the copy this package ships (nanoGPT's prepare.py downloads it otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The scripts it starts (train.py, data/prepare.py) import the package from this checkout too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

NANO_CPU = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
"""nanoGPT README's CPU command, as written."""
NANO_GPU_SHAPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=1",
    "--eval_interval=100000",
    "--log_interval=1",
    "--max_iters=6",
]


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


OURS_CPU = {
    "our demo (Muon, 600 steps)": ["experiment=shakespeare_char_cpu"],
    "ours, nanoGPT's AdamW recipe": [
        "experiment=shakespeare_char_cpu",
        "optim=adamw",
        "train.max_iters=2000",
        "train.eval_interval=250",
    ],
}


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


def matmul_ceiling() -> float:
    """This CPU's fp32 matmul FLOP/s: the best of 5 at each of the GPU recipe shape's block products (batch
    64 x 256 tokens, 384 -> 1152, 384 -> 1536, 1536 -> 384), the slowest of those."""
    rates = []
    for k, n in ((384, 1152), (384, 1536), (1536, 384)):
        a, b = torch.randn(64 * 256, k), torch.randn(k, n)
        best = min(timed_call(lambda: a @ b) for _ in range(5))
        rates.append(2 * a.shape[0] * k * n / best)
    return min(rates)


def timed_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def shape_flops_per_step() -> float:
    """Training FLOPs of one step of the GPU recipe's shape (gpt2.model's count, nanoGPT's MFU formula)."""
    from gpt2.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    return model.flops_per_token() * 64 * 256


def gpu_shape(nano: Path, work: Path, run: int) -> tuple[float, float]:
    """ms per step (steps 3-6) of nanoGPT and of ours on the GPU recipe's shape (`run`: a fresh out_dir each)."""
    _, nano_out = timed([sys.executable, "train.py", *NANO_GPU_SHAPE], nano)
    nano_ms = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time (\d+\.\d+)ms", nano_out) if int(i) >= 3]
    _, our_out = timed(
        ours(
            [
                "experiment=shakespeare_char",
                "device=cpu",
                "dtype=float32",
                "compile=false",
                "train.max_iters=6",
                "train.eval_interval=0",
                "train.eval_iters=1",
                "train.log_interval=1",
                f"out_dir={work / f'gpu_shape{run}'}",
            ],
            work,
        ),
        work,
    )
    our_ms = [
        float(ms)
        for step, ms in re.findall(
            r"step (\d+) \| loss [^|]+\| lr [^|]+\| grad norm [^|]+\| "
            r"(\d+\.\d+) ms",
            our_out,
        )
        if int(step) >= 4
    ]
    return sum(nano_ms) / len(nano_ms), sum(our_ms) / len(our_ms)


def shape_in_one_process(nano: Path, rounds: int) -> dict[str, float]:
    """{model: median seconds per step} of the GPU recipe's shape in this process, steps alternating: nanoGPT's
    model and optimizer (its `configure_optimizers`), ours as the trainer builds them, and ours with torch's
    own dropout (`gpt2.dropout` off): the same machine state for all three."""
    import gpt2.dropout
    from gpt2.config import OptimConfig
    from gpt2.model import GPT, GPTConfig
    from gpt2.optim import build_optimizer

    sys.path.insert(0, str(nano))
    import model as nanogpt_model  # nanoGPT's model.py

    shape = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.2)
    theirs = nanogpt_model.GPT(nanogpt_model.GPTConfig(**shape, bias=False))  # its train.py's default
    their_opt = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    mine = GPT(GPTConfig(**shape))
    my_opt = build_optimizer(mine, OptimConfig(lr=1e-3, beta2=0.99), "cpu")
    x, y = torch.randint(0, 65, (64, 256)), torch.randint(0, 65, (64, 256))
    fast_mask = gpt2.dropout._draws_fast_mask

    def nanogpt_step() -> None:
        theirs(x, y)[1].backward()
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    def our_step(fast_dropout: bool) -> None:
        gpt2.dropout._draws_fast_mask = fast_mask if fast_dropout else (lambda *args: False)
        mine(x, y, return_logits=False)[1].backward()
        my_opt.step(None)
        my_opt.zero_grad(set_to_none=True)

    steps = {"nanoGPT": nanogpt_step, "ours": lambda: our_step(True), "ours, torch's dropout": lambda: our_step(False)}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            took = timed_call(step)
            if i:
                seconds[name].append(took)
    gpt2.dropout._draws_fast_mask = fast_mask
    return {name: statistics.median(s) for name, s in seconds.items()}


def gpu_recipe(nano: Path, work: Path, iters: int, logs: Path | None) -> dict[str, tuple[float, float, float]]:
    """{run: (wall s, final val loss, median ms/step after step 100)} of nanoGPT's GPU recipe and ours, on CUDA;
    each run's output goes to `logs` when given."""
    nano_s, nano_out = timed(
        [
            sys.executable,
            "train.py",
            "config/train_shakespeare_char.py",
            f"--max_iters={iters}",
            f"--lr_decay_iters={iters}",
        ],
        nano,
    )
    nano_ms = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time (\d+\.\d+)ms", nano_out) if int(i) > 100]
    args = ["experiment=shakespeare_char", f"train.max_iters={iters}", f"optim.lr_decay_iters={iters}"]
    our_s, our_out = timed(ours([*args, f"out_dir={work / 'gpu'}"], work), work)
    our_ms = [
        float(ms)
        for step, ms in re.findall(
            r"step (\d+) \| loss [^|]+\| lr [^|]+\| grad norm [^|]+\| "
            r"(\d+\.\d+) ms",
            our_out,
        )
        if int(step) > 100
    ]
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "nanogpt.log").write_text(nano_out)
        (logs / "ours.log").write_text(our_out)
    return {
        "nanoGPT": (nano_s, last_val_loss(nano_out), statistics.median(nano_ms)),
        "ours": (our_s, last_val_loss(our_out), statistics.median(our_ms)),
    }


def gpu_main(nano: Path, iters: int, logs: Path | None, append: bool) -> None:
    import report

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        timed(
            [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare_char", f"data_root={work / 'data'}"],
            work,
        )
        runs = gpu_recipe(nano, work, iters, logs)
    (ns, nv, nms), (os_, ov, oms) = runs["nanoGPT"], runs["ours"]
    table = "\n".join(
        [
            "| (c) GPU recipe | nanoGPT | ours | ratio (nanoGPT / ours) |",
            "|---|---|---|---|",
            f"| wall s, {iters} steps, evals included | {ns:.1f} | {os_:.1f} | {ns / os_:.2f}x |",
            f"| final val loss | {nv:.4f} | {ov:.4f} | |",
            f"| median ms/step after step 100 | {nms:.2f} | {oms:.2f} | {nms / oms:.2f}x |",
        ]
    )
    print(table)
    section = (
        f"{report.heading('Against nanoGPT on the GPU')}\n\n`{report.command_line()}` on "
        f"{report.machine(torch.device('cuda'))}, nanoGPT at its checkout's HEAD; one run each, "
        f"compilation included in the wall time.\n\n{table}\n"
    )
    if append:
        report.append(section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout (train.py, config/, data/)")
    p.add_argument("--pairs", type=int, default=2, help="alternating runs of the CPU recipe (0: skip it)")
    p.add_argument("--shape-pairs", type=int, default=2, help="alternating runs of the GPU recipe shape")
    p.add_argument("--shape-rounds", type=int, default=3, help="alternating steps of that shape in one process")
    p.add_argument("--gpu", action="store_true", help="(c) the GPU recipe on CUDA instead of (a) and (b)")
    p.add_argument("--gpu-iters", type=int, default=5000, help="--gpu: steps of each run (the recipe's 5000)")
    p.add_argument("--logs", type=Path, help="--gpu: write each run's output there")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit(
            "--gpu runs both trainers on CUDA and this machine has no CUDA GPU: drop --gpu for the CPU comparisons"
        )
    import report

    from gpt2.resources import TINY_SHAKESPEARE

    nano = args.nanogpt.resolve()
    shutil.copyfile(TINY_SHAKESPEARE, nano / "data" / "shakespeare_char" / "input.txt")
    timed([sys.executable, "data/shakespeare_char/prepare.py"], nano)
    if args.gpu:
        return gpu_main(nano, args.gpu_iters, args.logs, not args.no_append)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        timed(
            [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare_char", f"data_root={work / 'data'}"],
            work,
        )
        runs = cpu_recipe(nano, work, args.pairs)
        shapes = []  # (nanoGPT ms, our ms, the ceiling around them: this shared machine's speed drifts)
        for i in range(args.shape_pairs):
            before = matmul_ceiling()
            nano_ms, our_ms = gpu_shape(nano, work, i)
            shapes.append((nano_ms, our_ms, max(before, matmul_ceiling())))
            print(
                f"shape pair {i + 1}: nanoGPT {nano_ms:.0f} ms/step, ours {our_ms:.0f}, fp32 matmul ceiling "
                f"{shapes[-1][2] / 1e9:.0f} GFLOP/s",
                flush=True,
            )
    flops, tokens = shape_flops_per_step(), 64 * 256
    in_process = shape_in_one_process(nano, args.shape_rounds) if args.shape_rounds else {}
    rows = ["| run | nanoGPT | ours | ratio (nanoGPT / ours) |", "|---|---|---|---|"]
    for i, round_ in enumerate(runs):
        ns, nv = round_["nanoGPT"]
        for name in OURS_CPU:
            os_, ov = round_[name]
            rows.append(
                f"| (a) CPU recipe, round {i + 1}, {name}: wall s (final val loss) | {ns:.0f} ({nv:.4f}) "
                f"| {os_:.0f} ({ov:.4f}) | {ns / os_:.2f}x |"
            )
    for i, (nano_ms, our_ms, ceiling) in enumerate(shapes):
        rows.append(
            f"| (b) GPU recipe shape on CPU, pair {i + 1}: ms/step (tokens/s; share of the fp32 matmul "
            f"ceiling of {ceiling / 1e9:.0f} GFLOP/s) | {nano_ms:.0f} ({tokens / nano_ms * 1e3:,.0f}; "
            f"{flops / nano_ms * 1e3 / ceiling:.0%}) | {our_ms:.0f} ({tokens / our_ms * 1e3:,.0f}; "
            f"{flops / our_ms * 1e3 / ceiling:.0%}) | {nano_ms / our_ms:.2f}x |"
        )
    nano_s = in_process.pop("nanoGPT", None)
    for name, took in in_process.items():
        rows.append(
            f"| (b) GPU recipe shape, one process, {name}: median s/step of {args.shape_rounds} (tokens/s) "
            f"| {nano_s:.1f} ({tokens / nano_s:,.0f}) | {took:.1f} ({tokens / took:,.0f}) "
            f"| {nano_s / took:.2f}x |"
        )
    table = "\n".join(rows)
    if shapes:
        ceiling = max(c for _, _, c in shapes)
        table += (
            f"\n\nA step of the GPU recipe's shape is {flops / 1e12:.2f} TFLOP; at the best fp32 matmul rate "
            f"measured ({ceiling / 1e9:.0f} GFLOP/s) it would take {flops / ceiling:.1f} s, "
            f"{ceiling / flops * tokens:,.0f} tokens/s: the bound for any fp32 trainer on this CPU."
        )
    print(table)
    section = (
        f"{report.heading('Against nanoGPT on the CPU')}\n\n`{report.command_line()}` on {report.machine()}, "
        f"nanoGPT at its checkout's HEAD, runs alternating. (a) is each README's CPU command (ours also with "
        f"nanoGPT's AdamW recipe), whole wall time; (b) is fp32, eager, the mean of steps 3-6."
        f"\n\n{table}\n"
    )
    if not args.no_append:
        report.append(section)


if __name__ == "__main__":
    main()
