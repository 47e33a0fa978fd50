"""Peak memory of a training step: the chunked cross-entropy and activation checkpointing (issue 14's lean step).

    python bench/memory.py                     # the three tables below; appends to BENCHMARKS.md
    python bench/memory.py --no-append --tables step   # the first table only
    python bench/memory.py --dtype bfloat16 --tables step   # bf16 on any CPU (zero-filled matmuls where emulated)
    python bench/memory.py --tables parallel   # the DDP/FSDP table only

Each measurement runs in a fresh process (peak RSS is per process): build the model and AdamW, then run the
steps, and report the peak resident set size (ru_maxrss). On CPU this is the whole footprint: weights,
gradients, optimizer state, activations and the loss.

1. GPT-2 124M, batch 4 x 1024, bf16 autocast (fp32 where this CPU emulates bf16, unless --dtype bfloat16), an
   AdamW step with its state allocated: the loss from the whole batch's logits (the plain path, as nanoGPT
   computes it), from chunks (gpt2.loss, what the trainer uses), and chunks plus activation checkpointing
   (train.activation_checkpointing=true). bf16 on a CPU that emulates it (a step would take hours) runs with
   the matrix products' and attention's results replaced by zero-filled tensors of the same shapes and strides
   (bench/finetune_memory.py's method: every tensor is still allocated; 3-11% low against real fp32 steps).
2. What activation checkpointing saves at 124M/350M/774M/1.5B, batch 4 x 1024, bf16 and fp32: the bytes of the
   tensors autograd keeps for the backward, counted on fake tensors (exact, instant, any size). Peak RSS at
   batch 1 hides it: there the gradients, allocated during the backward as the activations are freed, are as
   large as the activations.
3. DDP and FSDP2, 2 processes over gloo (torchrun): peak RSS per rank of GPT-2 124M over 4 AdamW steps of 2
   micro-steps of 1 x 1024 tokens (the first under no_sync), fp32, with the trainer's DDP
   (`gpt2.distributed.wrap_model` and `zero_grad`: the gradients live in the all-reduce buckets from step to
   step), with torch's DDP defaults (nanoGPT's train.py), where the first micro-step of each step allocates
   gradients beside the buckets, and with the trainer's FSDP2 (built on meta, sharded, then initialised). Run
   with glibc's MALLOC_MMAP_THRESHOLD_=131072, so that every tensor of 128 KiB or more is returned to the
   system when freed: the RSS then follows the live tensors (glibc's default keeps freed ones up to 32 MiB in
   its heap, which hid the difference behind the order of allocations in a first try).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARALLEL_STEPS = 4


def measure(size: str, batch: int, logits: bool, checkpointing: bool, optimizer: bool, dtype: str, zero: bool) -> dict:
    """In this process: one training step, then peak RSS in GiB and the step's seconds. With `optimizer`, AdamW's
    state exists before the step (as from the second step on: a first step with zero gradients allocates it),
    so one forward+backward shows the steady-state peak. `zero`: matmul results zero-filled (see the docstring)."""
    import contextlib

    import torch
    from finetune_memory import zero_matmuls

    from gpt2.config import OptimConfig
    from gpt2.device import autocast
    from gpt2.model import GPT, preset
    from gpt2.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(preset(size)).train()
    model.activation_checkpointing = checkpointing
    adamw = build_optimizer(model, OptimConfig(), "cpu") if optimizer else None
    if adamw is not None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    idx = torch.randint(0, 50257, (batch, 1024))
    t0 = time.perf_counter()
    with zero_matmuls() if zero else contextlib.nullcontext():
        with autocast(torch.device("cpu"), getattr(torch, dtype)):  # the trainer's
            _, loss = model(idx, idx, return_logits=logits)
        loss.backward()
        if adamw is not None:
            adamw.step()
            adamw.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "s_per_step": seconds}


def in_child(**case) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_table(dtype: str, zero: bool) -> str:
    rows = ["| loss | activation checkpointing | peak RSS (GiB) | s/step |", "|---|---|---|---|"]
    for name, logits, checkpointing in [
        ("whole-batch logits (plain path)", True, False),
        ("chunked (gpt2.loss)", False, False),
        ("chunked", False, True),
    ]:
        r = in_child(
            size="gpt2", batch=4, logits=logits, checkpointing=checkpointing, optimizer=True, dtype=dtype, zero=zero
        )
        rows.append(f"| {name} | {'on' if checkpointing else 'off'} | {r['peak_gib']:.2f} | {r['s_per_step']:.1f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def measure_parallel(mode: str) -> dict:
    """Under torchrun: the largest peak RSS of the ranks, in GiB, over training steps (the docstring's table 3).
    `mode`: "torch-ddp" (torch's DDP defaults), "ddp" or "fsdp" (the trainer's `gpt2.distributed`)."""
    import torch
    import torch.nn as nn

    from gpt2 import distributed
    from gpt2.config import OptimConfig
    from gpt2.model import GPT, preset
    from gpt2.optim import build_optimizer

    info = distributed.init("cpu")
    torch.manual_seed(0)
    if mode == "fsdp":  # as the trainer: built on meta, sharded, rank 0's weights broadcast into the shards
        with torch.device("meta"):
            model = GPT(preset("gpt2")).train()
        initial = GPT(preset("gpt2")).state_dict() if info.is_main else {}
        wrapped = distributed.wrap_model(model, info, "fsdp")
        distributed.materialize(model, info.device, initial)
        del initial
    else:
        model = GPT(preset("gpt2")).train()
        ddp = nn.parallel.DistributedDataParallel
        wrapped = ddp(model) if mode == "torch-ddp" else distributed.wrap_model(model, info, "ddp")
    adamw = build_optimizer(model, OptimConfig(), "cpu")
    idx = torch.randint(0, 50257, (1, 1024))
    for _ in range(PARALLEL_STEPS):  # DDP rebuilds its buckets after the first; the steady state from the third
        for micro in range(2):
            with distributed.no_sync(wrapped, enabled=micro == 0):
                wrapped(idx, idx, return_logits=False)[1].backward()
        adamw.step()
        if mode == "torch-ddp":
            adamw.zero_grad(set_to_none=True)
        else:
            distributed.zero_grad(wrapped, adamw)
    peak = max(distributed.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
    del model, wrapped, adamw  # (so that `cleanup` can stop gloo's threads)
    distributed.cleanup()
    return {"peak_gib": peak}


def parallel_table() -> str:
    rows = ["| 2 processes | peak RSS per rank (GiB) |", "|---|---|"]
    for name, mode in [
        ("DDP, torch's defaults (as nanoGPT's train.py)", "torch-ddp"),
        ("DDP, ours: gradients kept in the buckets", "ddp"),
        ("FSDP2, ours (`train.parallelism=fsdp`)", "fsdp"),
    ]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            "--parallel-child",
            mode,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
            "MALLOC_MMAP_THRESHOLD_": "131072",
        }  # freed tensors leave the RSS at once (see the docstring)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(f"| {name} | {json.loads(out.stdout.strip().splitlines()[-1])['peak_gib']:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def activation_bytes(size: str, batch: int, checkpointing: bool, dtype: str) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward (activations, and the chunked
    loss's gradients), counted exactly on fake tensors: no memory, no compute, any model size."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpt2.model import GPT, preset

    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[id(t)] = t.numel() * t.element_size()
        return t

    with FakeTensorMode():
        model = GPT(preset(size, vocab_size=50257)).train()
        model.activation_checkpointing = checkpointing
        idx = torch.randint(0, 50257, (batch, 1024))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
                model(idx, idx, return_logits=False)
    return sum(kept.values())


def activations_table(sizes: list[str]) -> str:
    rows = [
        "| model | dtype | activations kept for backward, without (GiB) | with checkpointing (GiB) | saved (GiB) |",
        "|---|---|---|---|---|",
    ]
    for size in sizes:
        for dtype in ("bfloat16", "float32"):
            off, on = (activation_bytes(size, 4, c, dtype) / 2**30 for c in (False, True))
            rows.append(f"| {size} | {dtype} | {off:.2f} | {on:.2f} | {off - on:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    p.add_argument(
        "--dtype",
        default="auto",
        help="of the 124M step table: auto (bfloat16 where this CPU has "
        "fast bf16 matmuls, else float32: emulated bf16 is ~50x slower), float32 or bfloat16",
    )
    p.add_argument(
        "--zero-matmuls",
        choices=("auto", "yes", "no"),
        default="auto",
        help="zero-filled matmul results: auto = for bf16 on a CPU without native bf16",
    )
    p.add_argument("--tables", default="step,activations,parallel", help="which of the three tables to measure")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--parallel-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if args.parallel_child:
        result = measure_parallel(args.parallel_child)
        if os.environ["RANK"] == "0":
            print(json.dumps(result))
        return
    import report
    import torch
    from report import native_bf16

    from gpt2.device import resolve_dtype

    tables = set(args.tables.split(","))
    if tables - {"step", "activations", "parallel"}:
        p.error(f"--tables {args.tables}: choose among step, activations and parallel, comma-separated")
    title = (
        "Training-step memory: DDP and FSDP2"
        if tables == {"parallel"}
        else "Training-step memory: chunked loss and activation checkpointing"
    )  # (BENCHMARKS.md's measures)
    parts = [f"{report.heading(title)}\n\n`{report.command_line()}` on {report.machine()}."]
    if "step" in tables:
        dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
        zero = args.zero_matmuls == "yes" or (args.zero_matmuls == "auto" and dtype == "bfloat16" and not native_bf16())
        parts.append(
            "Chunked loss and activation checkpointing. Each row is a fresh process (peak RSS: weights, gradients, "
            f"optimizer state, activations, loss). GPT-2 124M, batch 4 x 1024 tokens, {dtype}, one AdamW step with "
            "the optimizer state already allocated (the steady state)"
            f"{'; matmul and attention results zero-filled (this CPU emulates bf16): s/step is no speed' * zero}"
            f":\n\n{step_table(dtype, zero)}"
        )
    if "activations" in tables:
        parts.append(
            "What activation checkpointing saves, batch 4 x 1024 tokens, chunked loss: the bytes autograd keeps from "
            "the forward for the backward, counted exactly on fake tensors (`torch._subclasses.FakeTensorMode`):\n\n"
            f"{activations_table(args.sizes.split(','))}"
        )
    if "parallel" in tables:
        parts.append(
            f"DDP and FSDP2, 2 processes over gloo: peak RSS per rank of GPT-2 124M, fp32, {PARALLEL_STEPS} AdamW "
            "steps of two micro-steps of 1 x 1024 tokens (the first under no_sync), MALLOC_MMAP_THRESHOLD_=131072:\n\n"
            f"{parallel_table()}"
        )
    section = "\n\n".join(parts) + "\n"
    print(section)
    if not args.no_append:
        report.append(section)


if __name__ == "__main__":
    main()
