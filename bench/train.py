"""Training throughput: tokens/s and MFU of the real `Trainer.train_step`, fp32 vs bf16, eager vs compiled.

    python bench/train.py                    # the first two models, all four variants; appends to BENCHMARKS.md
    python bench/train.py --models cpu_recipe --steps 5 --no-append
    python bench/train.py --models gpu_recipe --dtypes bfloat16 --modes eager --steps 4 --warmup 2

Models: the CPU recipe (experiment=shakespeare_char_cpu: 4 layers, 128 wide, context 64, batch 12), the
6-layer shakespeare_char model (384 wide, context 256; batch 8 here instead of 64 so a CPU step takes ~1 s,
dropout off) and, when asked for, `gpu_recipe`: that model exactly as nanoGPT's GPU recipe trains it (batch 64,
dropout 0.2), whose bf16 step on a CPU with native bf16 is measured against that CPU's bf16 matmul ceiling (on
a CPU without it, bf16 is emulated and a step takes minutes).
MFU is against the device's peak (`gpt2.flops.peak_flops`): on a CPU, the measured matmul ceiling in the
same dtype. Uses data/shakespeare_char when prepared, else prepares tiny-shakespeare into a temp dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py, next to this script)

from gpt2.config import DataConfig, TrainRunConfig, to_object  # noqa: E402
from gpt2.device import resolve_device  # noqa: E402
from gpt2.distributed import DistInfo  # noqa: E402
from gpt2.flops import peak_flops  # noqa: E402
from gpt2.resources import CONFIG_DIR  # noqa: E402
from gpt2.training import Trainer  # noqa: E402

MODELS = {
    "cpu_recipe": ["experiment=shakespeare_char_cpu"],
    "shakespeare_char": ["experiment=shakespeare_char", "train.batch_size=8", "model.dropout=0.0", "device=auto"],
    "gpu_recipe": ["experiment=shakespeare_char", "device=auto"],
}
DEFAULT_MODELS = ["cpu_recipe", "shakespeare_char"]


def dataset() -> str:
    prepared = ROOT / "data" / "shakespeare_char"
    if (prepared / "meta.json").exists():
        return str(prepared)
    from gpt2.data.prepare import prepare

    root = Path(tempfile.mkdtemp())
    prepare(DataConfig(name="shakespeare_char", source="builtin:tinyshakespeare", tokenizer="char"), data_root=root)
    return str(root / "shakespeare_char")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = to_object(compose("train", overrides=overrides), TrainRunConfig)
    trainer = Trainer(cfg, DistInfo(device=resolve_device(cfg.device)))
    for _ in range(warmup):  # includes compilation
        trainer.train_step()
    sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)  # train_step does not wait for the device
    dt = (time.perf_counter() - t0) / steps
    tokens_per_sec = trainer.tokens_per_step / dt
    peak = peak_flops(trainer.device, trainer.dtype)
    return {
        "ms_per_step": 1000 * dt,
        "tokens_per_sec": tokens_per_sec,
        "mfu": trainer.flops_per_token * tokens_per_sec / peak if peak else float("nan"),
        "peak": peak or float("nan"),
        "params": trainer.model.num_params() / 1e6,
    }


def peak_text(cuda: torch.device | None) -> str:
    if cuda is not None:
        return "the GPU's datasheet peak in the same dtype (`gpt2.flops.peak_flops`)"
    ceilings = ", ".join(
        f"{name}: {peak_flops(torch.device('cpu'), dtype) / 1e9:.0f} GFLOP/s"
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    )
    return f"the matmul ceiling of this CPU measured in the same dtype ({ceilings})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    data = dataset()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model in args.models:
            for dtype in args.dtypes:
                for compiled in (mode == "compiled" for mode in args.modes):
                    overrides = [
                        *MODELS[model],
                        f"data.name={data}",
                        f"out_dir={out}/{model}",
                        f"dtype={dtype}",
                        f"compile={str(compiled).lower()}",
                        "wandb.enabled=false",
                    ]
                    r = measure(overrides, args.warmup, args.steps)
                    rows.append((model, dtype, "compiled" if compiled else "eager", r))
                    print(
                        f"{model:17s} {dtype:9s} {rows[-1][2]:9s} {r['ms_per_step']:8.1f} ms/step "
                        f"{r['tokens_per_sec']:10,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%",
                        flush=True,
                    )

    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    lines = [
        "",
        report.heading("Training throughput"),
        "",
        f"`{report.command_line()}` on {report.machine(cuda)}, {torch.get_num_threads()} threads. The real "
        "`Trainer.train_step` (forward, backward, clip, AdamW), averaged over the timed steps after warmup. MFU = "
        f"`flops_per_token()` x tokens/s over {peak_text(cuda)}. The machine is shared with other jobs, so expect "
        "±20% noise.",
        "",
        "| model | params (M) | dtype | mode | ms/step | tokens/s | MFU |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for model, dtype, mode, r in rows:
        lines.append(
            f"| {model} | {r['params']:.2f} | {dtype} | {mode} | {r['ms_per_step']:.1f} | "
            f"{r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
