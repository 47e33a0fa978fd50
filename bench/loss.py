"""The chunked loss (`gpt2.loss`, what training uses) against whole-batch logits, in a full training step.

    python bench/loss.py                                   # fp32 and bf16 x 4 x 256 and 4 x 1024, into BENCHMARKS.md
    python bench/loss.py --dtypes bfloat16 --seq-lens 256 --rounds 2 --no-append
    python bench/loss.py --profile --dtypes bfloat16 --seq-lens 256   # where a chunked step's time goes

GPT-2 124M (random weights, dropout 0), one process: each round times one step of each path, alternating
(forward, backward, gradient clipping and a fused AdamW step; the same batch), so the machine's drift hits
both alike; the table gives the median over the rounds after one warm-up round. `whole-batch logits` is
`model(idx, targets)` (the logits of every position, then `F.cross_entropy`, as nanoGPT and transformers
compute it); `chunked` is `model(idx, targets, return_logits=False)`. bf16 is autocast, as the trainer runs it
(on a CPU without native bf16 it is emulated and very slow: pass --dtypes float32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py)
from report import native_bf16  # noqa: E402

from gpt2.config import OptimConfig  # noqa: E402
from gpt2.device import autocast  # noqa: E402
from gpt2.model import GPT, preset  # noqa: E402
from gpt2.optim import build_optimizer, clip_grad_norm_  # noqa: E402

PATHS = {"whole-batch logits": True, "chunked": False}  # name: return_logits


def step_seconds(model: GPT, optimizers, idx: torch.Tensor, dtype: torch.dtype, return_logits: bool) -> float:
    t0 = time.perf_counter()
    with autocast(torch.device("cpu"), dtype):
        _, loss = model(idx, idx, return_logits=return_logits)
    loss.backward()
    clip_grad_norm_(list(model.parameters()), 1.0)
    optimizers.step(None)
    optimizers.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(dtype: torch.dtype, seq_len: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0)).train()
    optimizers = build_optimizer(model, OptimConfig(), "cpu")
    idx = torch.randint(0, 50257, (4, seq_len))
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(rounds + 1):
        for name, return_logits in PATHS.items():
            times[name].append(step_seconds(model, optimizers, idx, dtype, return_logits))
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def profile(dtype: torch.dtype, seq_len: int) -> str:
    """torch.profiler's top operators (self time) of one chunked training step, after one warm-up step."""
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0)).train()
    optimizers = build_optimizer(model, OptimConfig(), "cpu")
    idx = torch.randint(0, 50257, (4, seq_len))
    step_seconds(model, optimizers, idx, dtype, return_logits=False)
    with torch_profile() as prof:
        seconds = step_seconds(model, optimizers, idx, dtype, return_logits=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    return f"{dtype}, 4 x {seq_len}: {seconds:.2f} s/step under the profiler\n{table}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16" if native_bf16() else "float32")
    p.add_argument("--seq-lens", default="256,1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print a profile of one chunked step per case instead")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    if args.profile:
        for name in args.dtypes.split(","):
            for seq_len in map(int, args.seq_lens.split(",")):
                print(profile(getattr(torch, name), seq_len))
        return
    lines = [
        "| dtype | batch | whole-batch logits s/step | chunked s/step | chunked / whole-batch |",
        "|---|---|---:|---:|---:|",
    ]
    for name in args.dtypes.split(","):
        for seq_len in map(int, args.seq_lens.split(",")):
            r = measure(getattr(torch, name), seq_len, args.rounds)
            lines.append(
                f"| {name} | 4 x {seq_len} | {r['whole-batch logits']:.2f} | {r['chunked']:.2f} | "
                f"{r['chunked'] / r['whole-batch logits']:.2f} |"
            )
            print(lines[-1], flush=True)
    section = (
        f"{report.heading('Loss paths in a training step')}\n\n`{report.command_line()}` on {report.machine()}; "
        f"GPT-2 124M, one process, the two paths "
        f"alternating, median of {args.rounds} rounds after a warm-up round.\n\n" + "\n".join(lines) + "\n"
    )
    print(section)
    if not args.no_append:
        report.append(section)


if __name__ == "__main__":
    main()
