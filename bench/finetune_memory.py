"""Peak memory of fine-tuning GPT-2 124M-1.5B: full vs LoRA, with and without activation checkpointing (issue 9).

    python bench/finetune_memory.py                                  # the table; appends to BENCHMARKS.md
    python bench/finetune_memory.py --sizes gpt2 --no-append         # one size, print only
    python bench/finetune_memory.py --validate --sizes gpt2          # zero-matmul peaks vs real fp32 steps
    python bench/finetune_memory.py --dpo --sizes gpt2-xl             # LoRA r16: a DPO step against the SFT step

Each cell is the trainer as a user runs it, in a fresh process: `train.py init_from=<a Hugging Face-layout dir
of that size> data.name=<tiny-shakespeare, GPT-2 BPE> model.block_size=512 train.batch_size=1 dtype=bfloat16
train.max_iters=3` (an eval and a checkpoint included), `lora.rank=16` for LoRA, and
`train.activation_checkpointing=true` for AC; its peak resident set size (ru_maxrss) covers loading the init,
the optimizer, the steps, the eval and the checkpoint. The inits hold random weights (offline), written once
to --init-dir. `--dpo` compares, with LoRA r16, that step (objective=lm, on the instruction example shipped in
gpt2/assets/style) with `objective=dpo` on preference pairs (batch 1 pair: two sequences of 512, and a
reference pass with the adapters off) from the same init.

On a CPU without native bf16 (AVX2 only: a bf16 matmul runs at ~0.5 GFLOP/s, so one gpt2-xl step would take
hours), `--zero-matmuls` (the default there) replaces the results of the matrix products and of attention by
zero-filled tensors of the same shape, dtype and strides: every tensor of the step is still allocated and
written, with the same lifetimes, so the peak is the real step's while the losses are meaningless. `--validate`
checks the method against real fp32 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py)
from report import native_bf16  # noqa: E402

HEAVY_OPS = (
    "aten.mm.",
    "aten.addmm.",
    "aten.bmm.",
    "aten.baddbmm.",
    "aten._scaled_dot_product_flash_attention_for_cpu",
)


def zero_matmuls():
    """A dispatch mode in which matrix products and attention return zeros of the right shapes and strides."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def as_meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    def zeros_like_meta(t):
        return (
            torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu").zero_()
            if isinstance(t, torch.Tensor)
            else t
        )

    class ZeroMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not str(func).startswith(HEAVY_OPS):
                return func(*args, **kwargs)
            out = func(*torch.utils._pytree.tree_map(as_meta, args), **torch.utils._pytree.tree_map(as_meta, kwargs))
            return torch.utils._pytree.tree_map(zeros_like_meta, out)

    return ZeroMatmuls()


def child(overrides: list[str], zero: bool) -> dict:
    """In this process: compose train.yaml with `overrides`, run the trainer, return peak RSS (GiB)."""
    import contextlib
    import time

    from hydra import compose, initialize_config_dir

    from gpt2.resources import CONFIG_DIR
    from gpt2.training import run

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    with zero_matmuls() if zero else contextlib.nullcontext():
        run(cfg)
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "s": time.perf_counter() - t0}


def measure(
    init: Path, data: Path, out: Path, lora: bool, ac: bool, dtype: str, zero: bool, objective: str = "lm"
) -> dict:
    overrides = [
        f"objective={objective}",
        f"init_from={init}",
        f"data.name={data}",
        f"out_dir={out}",
        "model.block_size=512",
        "train.batch_size=1",
        "train.grad_accum_steps=1",
        "train.max_iters=3",
        "train.eval_interval=3",
        "train.eval_iters=1",
        "train.log_interval=1",
        f"dtype={dtype}",
        "device=cpu",
        "compile=false",
        f"train.activation_checkpointing={str(ac).lower()}",
        f"lora.rank={16 if lora else 0}",
    ]
    cmd = [sys.executable, __file__, "--child", json.dumps({"overrides": overrides, "zero": zero})]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "out of memory (killed)" if p.returncode in (-9, 137) else last}
    return json.loads(p.stdout.strip().splitlines()[-1])


def optimizer_state_bytes(size: str) -> int:
    """A full fine-tune's fp32 weights, gradients and AdamW moments: 16 bytes per parameter."""
    import torch

    from gpt2.model import GPT, preset

    with torch.device("meta"):
        return 16 * sum(p.numel() for p in GPT(preset(size)).parameters())


def make_init(size: str, init_dir: Path) -> Path:
    """A Hugging Face-layout dir of GPT-2 `size` with random weights (written once, in a child process)."""
    path = init_dir / f"{size}-random"
    if not (path / "model.safetensors").exists():
        code = (
            "import torch, sys; from gpt2.model import GPT, preset; from gpt2.hf import save_pretrained; "
            "torch.manual_seed(0); save_pretrained(GPT(preset(sys.argv[1])), sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, size, str(path)], check=True, cwd=ROOT)
    return path


def make_data(root: Path) -> Path:
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare

    return prepare(DataConfig(name="shakespeare", source="builtin:tinyshakespeare"), data_root=root)


def make_style_data(root: Path) -> dict[str, Path]:
    """The shipped SFT example and its preference pairs, prepared (for --dpo)."""
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare
    from gpt2.resources import ASSETS_DIR

    style = ASSETS_DIR / "style"
    return {
        "lm": prepare(DataConfig(name="sft", builder="instructions", source=str(style / "sft.jsonl")), root),
        "dpo": prepare(DataConfig(name="pairs", builder="preferences", source=str(style / "pairs.jsonl")), root),
    }


def dpo_rows(args, init_dir: Path, zero: bool) -> str:
    """LoRA r16, with and without AC: peak RSS of the SFT step and of the DPO step, and their ratio."""
    lines = [
        "| model | activation checkpointing | SFT step peak RSS (GiB) | DPO step peak RSS (GiB) | DPO / SFT |",
        "|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_style_data(Path(tmp))
        for size in args.sizes.split(","):
            init = make_init(size, init_dir)
            for ac in (False, True):
                cells = {}
                for objective in ("lm", "dpo"):
                    out = Path(tmp) / "run"
                    cells[objective] = measure(init, data[objective], out, True, ac, "bfloat16", zero, objective)
                    subprocess.run(["rm", "-rf", str(out)])
                    print(size, objective, "AC" if ac else "-", cells[objective], flush=True)
                lm, dpo = (cells[o].get("peak_gib") for o in ("lm", "dpo"))
                ratio = f"{dpo / lm:.2f}" if lm and dpo else "-"
                cell = [cells[o].get("error") or f"{cells[o]['peak_gib']:.2f}" for o in ("lm", "dpo")]
                lines.append(f"| {size} | {'yes' if ac else 'no'} | {cell[0]} | {cell[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    p.add_argument("--init-dir", default=os.path.join(tempfile.gettempdir(), "gpt2-random-inits"))
    p.add_argument("--zero-matmuls", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--validate", action="store_true", help="fp32 peaks: zero-matmul vs real steps")
    p.add_argument("--dpo", action="store_true", help="LoRA r16: the DPO step's peak against the SFT step's")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(child(job["overrides"], job["zero"])))
        return
    zero = args.zero_matmuls == "yes" or (args.zero_matmuls == "auto" and not native_bf16())
    init_dir = Path(args.init_dir)
    if args.dpo:
        section = (
            f"{report.heading('DPO memory: against the same SFT step')}\n\n`{report.command_line()}` on "
            f"{report.machine()}; LoRA r16, bf16, each cell a fresh `train.py` process (3 steps of batch 1 x 512, "
            f"{'zero-filled matmul results, ' if zero else ''}an eval and a checkpoint), peak RSS.\n\n"
            f"{dpo_rows(args, init_dir, zero)}\n"
        )
        print(section)
        if not args.no_append:
            report.append(section)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        rows = []
        for size in args.sizes.split(","):
            init = make_init(size, init_dir)
            for lora in (False, True):
                for ac in (False, True):
                    cases = [("float32", True), ("float32", False)] if args.validate else [("bfloat16", zero)]
                    cells = []
                    for dtype, z in cases:  # each in a new out_dir (a finished run there would just resume)
                        state = 0 if lora else optimizer_state_bytes(size)
                        if state > 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
                            cells.append(
                                {
                                    "error": f"does not fit: {state / 2**30:.1f} GiB of fp32 weights, gradients "
                                    "and AdamW state"
                                }
                            )
                            continue
                        cells.append(measure(init, data, Path(tmp) / "run", lora, ac, dtype, z))
                        subprocess.run(["rm", "-rf", str(Path(tmp) / "run")])
                    rows.append((size, lora, ac, cells))
                    print(size, "LoRA r16" if lora else "full", "AC" if ac else "-", cells, flush=True)
    section = (
        f"{report.heading('Fine-tuning memory: full vs LoRA, activation checkpointing')}\n\n"
        f"`{report.command_line()}` on {report.machine()}; each cell a fresh `train.py` process (3 steps of "
        f"batch 1 x 512, an eval and a checkpoint), peak RSS.\n\n{table(rows, args, zero)}\n"
    )
    print(section)
    if not args.no_append:
        report.append(section)


def table(rows, args, zero: bool) -> str:
    def cell(c: dict) -> str:
        return c.get("error") or f"{c['peak_gib']:.2f}"

    if args.validate:
        head = "| model | fine-tune | AC | fp32 peak RSS, zero matmuls (GiB) | fp32 peak RSS, real steps (GiB) |"
        lines = [head, "|---|---|---|---:|---:|"]
        lines += [
            f"| {s} | {'LoRA r16' if lo else 'full'} | {'yes' if ac else 'no'} | {cell(c[0])} | {cell(c[1])} |"
            for s, lo, ac, c in rows
        ]
    else:
        how = "zero-filled matmul results (this CPU emulates bf16)" if zero else "real steps"
        head = f"| model | fine-tune | activation checkpointing | bf16 peak RSS (GiB), {how} |"
        lines = [head, "|---|---|---|---:|"]
        lines += [
            f"| {s} | {'LoRA r16' if lo else 'full'} | {'yes' if ac else 'no'} | {cell(c[0])} |"
            for s, lo, ac, c in rows
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
