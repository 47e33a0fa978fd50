"""The GPU training step of GPT-2 124M, side by side with nanoGPT's `train.py` at its 124M config.

    python bench/gpu_step.py --nanogpt /path/to/nanoGPT            # 6 runs, each compiling once (not yet timed)
    python bench/gpu_step.py --nanogpt /path/to/nanoGPT --micro-batches 16 --compile-modes default,reduce-overhead
    python bench/gpu_step.py --device cpu --rehearse --no-append    # the same plumbing on a CPU, 2-layer model

Both trainers train GPT-2 124M (12 x 768, context 1024, vocab 50304, no dropout, no biases: nanoGPT's config)
from scratch in bf16 autocast with torch.compile and fused AdamW, one micro-step of `B` sequences per step, on the
same tokens: tiny-shakespeare in GPT-2 BPE, prepared by `data/prepare.py` (nanoGPT reads the same tokens as its
`train.bin`, header stripped). nanoGPT runs as `python train.py config/train_gpt2.py --batch_size=B
--gradient_accumulation_steps=1 ...`, ours as `train.py experiment=gpt2_124m_owt data=shakespeare
train.batch_size=B train.grad_accum_steps=1 compile_mode=M ...`. For each micro-batch B the runs alternate:
nanoGPT, then ours in each `--compile-modes` mode, `--rounds` times.

Time per step is taken the same way for both, from the outside: the wall-clock time between the log lines of
step `--warmup` and of the last step (`--steps`) as they reach this script, over the steps between (compilation,
CUDA-graph recording and the first steps are before it). Both log every 10 steps, so neither reads the loss
from the GPU more often than the other. MFU = tokens/s x training FLOPs per token (6N + 12 L H Q T, nanoGPT's
formula: `GPT.flops_per_token`) / the device's dense bf16 peak (`gpt2.flops`). Then one step of ours (the first
micro-batch, the first mode) runs under torch.profiler in this process, through the trainer's own
`train_step`, and its top kernels by device time are tabled.

A run that fails is a row that says so (the end of its stderr is printed), not the end of the measurement.
Prints the tables and appends them to BENCHMARKS.md unless --no-append. With --rehearse (meant for `--device
cpu`) both models shrink to 2 x 64 with context 128 in fp32 without compile, so a CPU checks the whole script in
a few minutes before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The scripts it starts (train.py, data/prepare.py) import the package from this checkout too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

LOG_INTERVAL = 10
NANO_LINE = re.compile(r"^iter (\d+): loss")
OUR_LINE = re.compile(r"^step (\d+) \| loss")
REHEARSAL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128}


def prepare_tokens(work: Path) -> tuple[Path, Path]:
    """Tiny-shakespeare in GPT-2 BPE twice over: our prepared folder, and nanoGPT's train.bin/val.bin of the
    same tokens (our shards without their header)."""
    from gpt2.data.shards import open_tokens, read_header

    data_root = work / "data"
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare", f"data_root={data_root}"],
        check=True,
        capture_output=True,
        text=True,
    )
    ours = data_root / "shakespeare"
    nano = work / "nanogpt_data"
    nano.mkdir()
    for split in ("train", "val"):
        shards = sorted(ours.glob(f"{split}_*.bin"))
        tokens = np.concatenate([np.asarray(open_tokens(s, read_header(s))) for s in shards])
        tokens.astype(np.uint16).tofile(nano / f"{split}.bin")
    return ours, nano


def nanogpt_command(data: Path, out: Path, batch: int, steps: int, device: str, rehearse: bool) -> list[str]:
    """nanoGPT's train.py at its 124M config, one micro-step of `batch` per step (run from its checkout)."""
    args = [
        sys.executable,
        "train.py",
        "config/train_gpt2.py",
        f"--dataset={data}",  # an absolute path: os.path.join('data', it) is it
        f"--out_dir={out}",
        f"--batch_size={batch}",
        "--gradient_accumulation_steps=1",
        f"--max_iters={steps}",
        f"--lr_decay_iters={steps}",
        "--eval_iters=1",
        f"--log_interval={LOG_INTERVAL}",
        "--wandb_log=False",
        f"--device={device}",
    ]
    if rehearse:
        args += [f"--{k}={v}" for k, v in REHEARSAL.items()] + ["--compile=False", "--dtype=float32"]
    return args


def our_overrides(data: Path, out: Path, batch: int, steps: int, mode: str, device: str, rehearse: bool):
    """train.py's overrides for our side of a run."""
    overrides = [
        "experiment=gpt2_124m_owt",
        f"data.name={data}",
        "model.bias=false",
        f"train.batch_size={batch}",
        "train.grad_accum_steps=1",
        f"train.max_iters={steps}",
        "train.eval_interval=0",
        "train.eval_iters=1",
        f"train.log_interval={LOG_INTERVAL}",
        f"optim.lr_decay_iters={steps}",
        "optim.warmup_iters=10",
        f"compile_mode={mode}",
        f"device={device}",
        f"out_dir={out}",
    ]
    if rehearse:
        return overrides + [f"model.{k}={v}" for k, v in REHEARSAL.items()] + ["compile=false", "dtype=float32"]
    return overrides + ["compile=true", "dtype=bfloat16"]


def timed_steps(
    command: list[str], cwd: Path, line: re.Pattern, warmup: int, timeout: float
) -> tuple[float | None, str]:
    """Seconds per step between the log lines of step `warmup` and the last one, stamped as they arrive; None
    (and the end of stderr) when the run fails or outlasts `timeout` seconds (then it is killed)."""
    stamps: dict[int, float] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        for text in proc.stdout:
            match = line.match(text)
            if match:
                stamps[int(match.group(1))] = time.perf_counter()
        killer.cancel()
        err.seek(0)
        tail = err.read()[-3000:]
    after = sorted(step for step in stamps if step >= warmup)
    if proc.wait() or len(after) < 2:
        killed = f"killed after --run-timeout {timeout:.0f} s; " if proc.returncode == -9 else ""
        return None, killed + (tail or f"exit status {proc.returncode}, {len(stamps)} log lines")
    first, last = after[0], after[-1]
    return (stamps[last] - stamps[first]) / (last - first), ""


def profile_table(data: Path, work: Path, batch: int, mode: str, device: str, rehearse: bool, warmup: int) -> str:
    """Top kernels of one of our training steps (the trainer's own `train_step`), by device time, as markdown."""
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.resources import CONFIG_DIR
    from gpt2.training import Trainer

    overrides = our_overrides(data, work / "profiled", batch, warmup + 1, mode, device, rehearse)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = Trainer(to_object(cfg, TrainRunConfig), DistInfo())
    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()

    def own_time(event) -> float:  # microseconds on the device (CUDA) or the CPU
        if not cuda:
            return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if own_time(e) > 0]
    total = sum(own_time(e) for e in events)
    rows = ["| kernel / op | calls | ms | share |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=own_time, reverse=True)[:15]:
        name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
        rows.append(f"| `{name.replace('|', '/')}` | {e.count} | {own_time(e) / 1e3:.2f} | {own_time(e) / total:.1%} |")
    where = "device" if cuda else "CPU"
    return (
        f"One step at {batch} x {trainer.block_size}, compile_mode={mode}: {total / 1e3:.1f} ms of {where} time.\n\n"
        + "\n".join(rows)
    )


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    ours_data, nano_data = prepare_tokens(work)
    results = []
    for batch in args.micro_batches:
        for round_ in range(args.rounds):
            runs = [("nanoGPT", "default")] if args.nanogpt else []
            runs += [("ours", mode) for mode in args.compile_modes]
            for who, mode in runs:
                out = work / f"{who}_{batch}_{mode}_{round_}"
                if who == "nanoGPT":
                    command = nanogpt_command(nano_data, out, batch, args.steps, args.device, args.rehearse)
                    cwd, line = args.nanogpt, NANO_LINE
                else:
                    overrides = our_overrides(ours_data, out, batch, args.steps, mode, args.device, args.rehearse)
                    command, cwd, line = [sys.executable, str(ROOT / "train.py"), *overrides], work, OUR_LINE
                seconds, error = timed_steps(command, cwd, line, args.warmup, args.run_timeout)
                if error:
                    print(f"{who} ({mode}) at batch {batch} failed; the end of its stderr:\n{error}", file=sys.stderr)
                results.append({"who": who, "mode": mode, "batch": batch, "round": round_, "s": seconds})
                shown = f"{1e3 * seconds:.1f} ms/step" if seconds else "failed"
                print(f"batch {batch}, round {round_ + 1}: {who} ({mode}) {shown}", flush=True)
    return results


def table(results: list[dict], block_size: int, flops_per_token: float, peak: float | None) -> str:
    rows = [
        "| micro-batch | trainer | compile mode | ms/step (median of rounds) | tokens/s | MFU | vs nanoGPT |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["batch"], r["who"], r["mode"]) for r in results}, key=lambda k: (k[0], k[1] != "nanoGPT", k[2]))
    for batch, who, mode in keys:
        times = [r["s"] for r in results if (r["batch"], r["who"], r["mode"]) == (batch, who, mode) and r["s"]]
        peer = [r["s"] for r in results if (r["batch"], r["who"]) == (batch, "nanoGPT") and r["s"]]
        if not times:
            rows.append(f"| {batch} | {who} | {mode} | failed | | | |")
            continue
        s = statistics.median(times)
        tokens_per_s = batch * block_size / s
        mfu = f"{tokens_per_s * flops_per_token / peak:.1%}" if peak else ""
        ratio = f"{statistics.median(peer) / s:.2f}x" if peer and who == "ours" else ""
        rows.append(f"| {batch} | {who} | {mode} | {1e3 * s:.1f} | {tokens_per_s:,.0f} | {mfu} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (train.py, config/); without it, ours alone")
    p.add_argument("--micro-batches", default="8,16,32", help="sequences per micro-step, comma-separated")
    p.add_argument("--compile-modes", default="default", help="our compile_mode values, comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each trainer per micro-batch")
    p.add_argument("--steps", type=int, default=60, help="steps of each run")
    p.add_argument("--warmup", type=int, default=20, help="steps before the timing starts (a multiple of 10)")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds before a run is killed (a failed row)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rehearse", action="store_true", help="a 2-layer fp32 model without compile (a CPU dry run)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    args.micro_batches = [int(b) for b in args.micro_batches.split(",")]
    args.compile_modes = args.compile_modes.split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py measures a CUDA GPU and this machine has none: --device cpu --rehearse")
    if args.nanogpt and not (args.nanogpt / "config" / "train_gpt2.py").is_file():
        raise SystemExit(f"--nanogpt {args.nanogpt} has no config/train_gpt2.py: point it at a nanoGPT checkout")
    if args.warmup % LOG_INTERVAL or not LOG_INTERVAL <= args.warmup < args.steps:
        raise SystemExit(f"--warmup must be a multiple of {LOG_INTERVAL} below --steps")
    args.nanogpt = args.nanogpt.resolve() if args.nanogpt else None
    import report

    from gpt2.flops import peak_flops
    from gpt2.model import GPT, preset

    shape = REHEARSAL if args.rehearse else {}
    with torch.device("meta"):
        model = GPT(preset("gpt2", bias=False, dropout=0.0, vocab_size=50304, **shape))
    device = torch.device(args.device)
    dtype = torch.float32 if args.rehearse else torch.bfloat16
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        results = measure(args, work)
        text = table(results, model.config.block_size, model.flops_per_token(), peak_flops(device, dtype))
        print(text, flush=True)  # before the profile: what was measured is out whatever happens next
        if not args.no_profile:
            first = args.micro_batches[0], args.compile_modes[0]
            try:
                kernels = profile_table(
                    work / "data" / "shakespeare", work, *first, args.device, args.rehearse, args.warmup
                )
            except Exception:  # the measured table is still worth recording
                traceback.print_exc()
                kernels = "The profiled step failed (its traceback is in the command's output)."
            print(f"\n{kernels}")
            text += f"\n\n{kernels}"
    section = (
        f"{report.heading('GPT-2 124M training step against nanoGPT on the GPU')}\n\n`{report.command_line()}` on "
        f"{report.machine(device)}, nanoGPT at its checkout's HEAD (config/train_gpt2.py), one micro-step per "
        f"step, bf16, compiled; ms/step from the arrival of the log lines of steps {args.warmup}-{args.steps}.\n\n"
        f"{text}\n"
    )
    if not args.no_append and not args.rehearse:
        report.append(section)


if __name__ == "__main__":
    main()
