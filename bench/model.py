"""Forward+backward throughput of a GPT preset: fp32 vs bf16 autocast, eager vs torch.compile.

    python bench/model.py                      # mini preset (6 layers, 384 wide, ctx 256), batch 4, vocab 65
    python bench/model.py --vocab 50304 --batch-size 4 --no-append

Prints a table and appends it to BENCHMARKS.md with the command and the machine. Each case runs `--warmup`
untimed steps (compilation happens there); then `--steps` timed rounds go over all cases in turn and each case
reports its median step. A step is zero_grad, forward with loss, backward (no optimizer). TFLOP/s uses
`GPT.flops_per_token` (the MFU numerator).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import report  # noqa: E402  (bench/report.py, next to this script)
import torch

from gpt2 import GPT
from gpt2.device import autocast, resolve_device
from gpt2.model import PRESETS, preset

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: GPT, step_fn, idx: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """One timed unit: zero_grad, forward with loss under autocast `dtype`, backward; returns its seconds."""

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            _, loss = step_fn(idx, targets=idx)
        loss.backward()
        sync(device)
        return time.perf_counter() - start

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini", choices=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab", type=int, default=65, help="65: char Shakespeare; 50257: GPT-2 BPE (padded 50304)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()

    device = resolve_device(args.device)
    load = os.getloadavg()[0]
    overrides = dict(vocab_size=args.vocab)
    if args.block_size:
        overrides["block_size"] = args.block_size
    config = preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    T = config.block_size
    idx = torch.randint(0, config.vocab_size, (args.batch_size, T), device=device)
    tokens = args.batch_size * T
    flops = model.flops_per_token(T) * tokens

    cases = [(c, d) for c in ([False] if args.no_compile else [False, True]) for d in (torch.float32, torch.bfloat16)]
    compiled = torch.compile(model) if not args.no_compile else None
    steps, warm = {}, {}
    for case in cases:  # warm up (and compile) every case first
        use_compile, dtype = case
        print(f"warming up {'compiled' if use_compile else 'eager'} {dtype}", file=sys.stderr, flush=True)
        steps[case] = make_step(model, compiled if use_compile else model, idx, device, dtype)
        warm[case] = sum(steps[case]() for _ in range(args.warmup))
    # Timed steps round-robin over the cases, median per case: load from other processes on a shared
    # machine then hits every case alike, so the ratios between rows stay meaningful.
    times = {case: [] for case in cases}
    for _ in range(args.steps):
        for case in cases:
            times[case].append(steps[case]())
    rows = []
    for use_compile, dtype in cases:
        sec = statistics.median(times[(use_compile, dtype)])
        mode, dt = ("compile" if use_compile else "eager"), str(dtype).removeprefix("torch.")
        rows.append((mode, dt, sec, warm[(use_compile, dtype)]))

    base = rows[0][2]
    header = "| mode | dtype | tokens/s | ms/step | TFLOP/s | vs eager fp32 | warmup s |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for mode, dt, sec, warm in rows:
        lines.append(
            f"| {mode} | {dt} | {tokens / sec:,.0f} | {sec * 1e3:,.0f} | {flops / sec / 1e12:.3f} | "
            f"{base / sec:.2f}x | {warm:.1f} |"
        )
    table = "\n".join(lines)
    n_params = model.num_params()
    title = (
        f"{args.preset} ({config.n_layer} layers, {config.n_embd} wide, {n_params / 1e6:.1f}M params), "
        f"vocab {config.vocab_size} (padded {config.padded_vocab_size}), batch {args.batch_size} x {T} tokens"
    )
    print(f"\n{title}\n{table}")
    if not args.no_append:
        report.append(
            f"{report.heading('Model forward+backward throughput')}\n\n"
            f"`{report.command_line()}` on {report.machine(device)} (load average {load:.1f} at start: the machine "
            f"is shared, so compare rows of one table, not tables): {title}; {args.warmup} warmup steps, then the "
            f"median of {args.steps} round-robin timed steps.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
