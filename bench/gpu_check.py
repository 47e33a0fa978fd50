"""The GPU check: on one CUDA machine, in under 10 minutes, PASS/FAIL for the paths only a GPU runs.

    make gpu-check            # or: python bench/gpu_check.py [--no-append]

Checks (each a row of the table it prints and appends to BENCHMARKS.md):
1. train: GPT-2 124M, bf16, torch.compile, on tiny-shakespeare (GPT-2 BPE, shipped): the loss falls; tokens/s, MFU.
2. fp16: the same for a few steps with dtype=float16 (GradScaler on): finite, falling loss, a loss scale saved.
3. fused AdamW: the optimizer the trainer builds on CUDA uses the fused kernel.
4. flash attention: a bf16 training forward/backward of the model runs under SDPBackend.FLASH_ATTENTION only.
5. sampling: KV-cached decoding, GPT-2 124M shape, batch 1, 256 new tokens: tokens/s.
6. compiled decode: the Sampler's compile=true path (static cache, CUDA graphs) gives eager's greedy text with
   one compiled graph; tokens/s of both.
7. resume: a run stopped by SIGTERM saves, exits 143, and the same command resumes and finishes.
8. ddp: with 2+ GPUs, torchrun with 2 processes (NCCL), compiled, 2 micro-steps per rank (the first under no_sync),
   gives the 1-process loss curve (bf16: within 2e-2).
A run that fails prints the end of its stderr, a check that crashes its traceback; the table has one line each.
On a machine where the project's venv cannot be built (no network), `python bench/gpu_check.py` runs with any
Python that has torch and the package's requirements: the package comes from this checkout.
On a machine without CUDA it says so and exits 0, having run nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The scripts it starts (train.py, data/prepare.py) import the package from this checkout too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
TRAIN = [sys.executable, str(ROOT / "train.py")]
RUN_124M = [
    "model=gpt2",
    "data=shakespeare",
    "train.batch_size=8",
    "train.eval_interval=0",
    "train.log_interval=5",
    "optim.warmup_iters=10",
    "optim.lr=6e-4",
    "device=cuda",
]


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + args, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


class RunFailed(Exception):
    """train.py exited non-zero; the message is its last error line."""


def train_run(tmp: Path, name: str, *overrides: str) -> tuple[Path, list[dict]]:
    """Train the 124M run with `overrides` into tmp/name; its out_dir and training records."""
    out = tmp / name
    p = train([*RUN_124M, *overrides, f"out_dir={out}"], tmp)
    if p.returncode:
        print(
            f"{name}: train.py exited with status {p.returncode}; the end of its stderr:\n{p.stderr[-3000:]}",
            file=sys.stderr,
            flush=True,
        )
        raise RunFailed((p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1])
    return out, records(out)


def check_train(tmp: Path) -> tuple[bool, str]:
    _, lines = train_run(tmp, "bf16", "dtype=bfloat16", "compile=true", "train.max_iters=60")
    first, last = lines[0], lines[-1]
    return last["loss"] < first["loss"] - 0.5, (
        f"loss {first['loss']:.2f} -> {last['loss']:.2f}, "
        f"{last['tokens_per_sec']:,.0f} tok/s, MFU {100 * last.get('mfu', math.nan):.1f}%"
    )


def check_fp16(tmp: Path) -> tuple[bool, str]:
    out, lines = train_run(tmp, "fp16", "dtype=float16", "compile=false", "train.max_iters=30")
    scale = torch.load(out / "ckpt.pt", weights_only=True)["scaler"].get("scale")
    ok = all(math.isfinite(r["loss"]) for r in lines) and lines[-1]["loss"] < lines[0]["loss"] and bool(scale)
    return ok, f"loss {lines[0]['loss']:.2f} -> {lines[-1]['loss']:.2f}, loss scale {scale}"


def check_fused_adamw() -> tuple[bool, str]:
    from gpt2.config import OptimConfig
    from gpt2.model import GPT, preset
    from gpt2.optim import build_optimizer

    model = GPT(preset("tiny", vocab_size=50257)).cuda()
    fused = [opt.defaults.get("fused") for opt in build_optimizer(model, OptimConfig(), "cuda").optimizers]
    return all(fused), f"fused={fused}"


def check_flash() -> tuple[bool, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpt2.model import GPT, preset

    model = GPT(preset("gpt2", vocab_size=50257)).cuda().train()
    idx = torch.randint(0, 50257, (4, 1024), device="cuda")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx, return_logits=False)
        loss.backward()
    except RuntimeError as e:
        return False, str(e).splitlines()[0]
    return True, "bf16 forward+backward ran on FLASH_ATTENTION alone"


def check_sampling() -> tuple[bool, str]:
    from gpt2.model import GPT, preset
    from gpt2.sampling.engine import SamplingParams, generate

    model = GPT(preset("gpt2", vocab_size=50257)).cuda().eval().to(torch.bfloat16)
    idx = torch.randint(0, 50257, (1, 8), device="cuda")
    for _ in generate(model, idx, 16, SamplingParams(top_k=200)):  # warm up
        pass
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = sum(1 for _ in generate(model, idx, 256, SamplingParams(top_k=200)))
    rate = n / (time.perf_counter() - t0)
    return n == 256, f"{rate:,.0f} tokens/s (bf16, batch 1, 256 new tokens, eager)"


def check_compiled_decode() -> tuple[bool, str]:
    """The Sampler's compile=true path on CUDA: static KV cache + mode="reduce-overhead" (CUDA graphs). Greedy
    text must equal eager's, with one compilation, and it should be faster."""
    from torch._dynamo.utils import counters

    from gpt2.model import GPT, preset
    from gpt2.sampling import Sampler
    from gpt2.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50257))
    eager = Sampler(model, GPT2Tokenizer(), device="cuda", dtype="bfloat16")
    compiled = Sampler(model, GPT2Tokenizer(), device="cuda", dtype="bfloat16", compile=True)  # same weights
    kw = dict(max_new_tokens=256, temperature=0.0, ignore_eot=True)
    counters.clear()
    same = compiled.generate("The history of", **kw) == eager.generate("The history of", **kw)
    rates = []
    for sampler in (eager, compiled):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.generate("The history of", **kw)
        rates.append(256 / (time.perf_counter() - t0))
    graphs = counters["stats"]["unique_graphs"]
    return same and graphs == 1, (
        f"greedy text {'equals' if same else 'DIFFERS from'} eager; {graphs} graph(s); "
        f"{rates[1]:,.0f} vs {rates[0]:,.0f} tokens/s eager (bf16, batch 1)"
    )


def check_resume(tmp: Path) -> tuple[bool, str]:
    out = tmp / "resume"
    args = [
        *RUN_124M,
        "dtype=bfloat16",
        "compile=false",
        "train.max_iters=200",
        "train.log_interval=1",
        f"out_dir={out}",
    ]
    p = subprocess.Popen(TRAIN + args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("step 20 |"):
            p.send_signal(signal.SIGTERM)
            break
    p.communicate(timeout=120)
    if p.returncode != 128 + signal.SIGTERM:
        return False, f"SIGTERM exit status {p.returncode}, expected 143"
    stopped = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    q = train(args, tmp)
    ok = q.returncode == 0 and f"at step {stopped}" in q.stdout and records(out)[-1]["step"] == 200
    return ok, f"stopped at step {stopped}, resumed, finished at {records(out)[-1]['step']}"


def check_ddp(tmp: Path) -> tuple[bool | None, str]:
    if torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} GPU: skipped"
    args = [
        *RUN_124M,
        "dtype=bfloat16",
        "compile=true",  # compiled DDP (graph breaks at its buckets) as users run it
        "train.max_iters=20",
        "train.log_interval=1",
        "train.grad_accum_steps=4",  # 2 micro-steps per rank: the first under no_sync
    ]
    single = train([*args, f"out_dir={tmp / 'ddp1'}"], tmp)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *args,
        f"out_dir={tmp / 'ddp2'}",
    ]
    double = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)
    if single.returncode or double.returncode:
        return False, (single.stderr or double.stderr).strip().splitlines()[-1]
    a, b = [r["loss"] for r in records(tmp / "ddp1")], [r["loss"] for r in records(tmp / "ddp2")]
    worst = max(abs(x - y) for x, y in zip(a, b))
    return worst < 2e-2 and len(a) == len(b), f"largest loss difference {worst:.2e} over {len(a)} steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False): nothing "
            "was run. Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch."
        )
        return
    import report

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prep = subprocess.run(
            [sys.executable, str(ROOT / "data" / "prepare.py"), "data=shakespeare", f"data_root={tmp}"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        assert prep.returncode == 0, prep.stderr
        RUN_124M.append(f"data.name={tmp / 'shakespeare'}")
        checks = [
            ("train 124M bf16 + compile", lambda: check_train(tmp)),
            ("fp16 + GradScaler", lambda: check_fp16(tmp)),
            ("fused AdamW", check_fused_adamw),
            ("flash attention", check_flash),
            ("KV-cache sampling", check_sampling),
            ("compiled decode (CUDA graphs)", check_compiled_decode),
            ("resume after SIGTERM", lambda: check_resume(tmp)),
            ("2-process NCCL DDP = 1 process", lambda: check_ddp(tmp)),
        ]
        rows = ["| check | result | details |", "|---|---|---|"]
        for name, check in checks:
            t0 = time.perf_counter()
            try:
                ok, details = check()
            except Exception as e:  # noqa: BLE001  (a check that crashes is a FAIL with its reason)
                traceback.print_exc()
                ok, details = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            rows.append(f"| {name} | {verdict} | {details} ({time.perf_counter() - t0:.0f} s) |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    machine = report.machine(torch.device("cuda"))
    section = f"{report.heading('GPU check')}\n\n`{report.command_line()}` on {machine}:\n\n{table}\n"
    if not args.no_append:
        report.append(section)
    sys.exit(0 if all("FAIL" not in r for r in rows) else 1)


if __name__ == "__main__":
    main()
