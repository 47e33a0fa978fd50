"""Packed against padded instruction data (data.packing=true / false), in the trainer's own training step.

    python bench/packing.py                        # GPT-2 124M shape, block_size 1024, bf16 where native
    python bench/packing.py --rounds 2 --no-append

A synthetic chat set made offline: prompt and reply lengths drawn log-normal (medians 40 and 120 GPT-2 tokens,
a long tail past the context), the long-tailed shape of public instruction sets, the words taken from the
tiny-shakespeare text the package ships. Both runs are `Trainer`s built from the same overrides but
data.packing (epoch order, batch 4, one micro-step, fused AdamW, dropout 0); each round times one training step
of each, alternating. Target tokens (the tokens the loss is on) per step are the epoch's mean (every example's
targets / rows per epoch x batch: a few rows' own count varies too much to compare), over the median step time
after a warm-up round: target tokens per second is what a fine-tune is paid in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py)
from report import native_bf16  # noqa: E402

from gpt2.config import DataConfig, TrainRunConfig, to_object  # noqa: E402
from gpt2.data.prepare import prepare  # noqa: E402
from gpt2.distributed import DistInfo  # noqa: E402
from gpt2.resources import TINY_SHAKESPEARE  # noqa: E402
from gpt2.training import Trainer  # noqa: E402


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """n prompt/completion rows with log-normal lengths in words (~1.3 GPT-2 tokens per word)."""
    rng = np.random.default_rng(seed)
    words = Path(TINY_SHAKESPEARE).read_text().split()
    rows = []
    for prompt_tokens, reply_tokens in zip(rng.lognormal(np.log(40), 0.8, n), rng.lognormal(np.log(120), 1.0, n)):
        start = int(rng.integers(0, len(words) - 2000))
        p, r = max(1, int(prompt_tokens / 1.3)), max(1, int(reply_tokens / 1.3))
        rows.append(
            {
                "prompt": "User: " + " ".join(words[start : start + p]) + "\nAssistant:",
                "completion": " " + " ".join(words[start + p : start + p + r]),
            }
        )
    return rows


def trainer(data: Path, out: Path, packing: bool, dtype: str, block_size: int) -> Trainer:
    from hydra import compose, initialize_config_dir

    from gpt2.resources import CONFIG_DIR

    overrides = [
        f"data.name={data}",
        f"out_dir={out}",
        "model=gpt2",
        f"model.block_size={block_size}",
        "model.dropout=0",
        f"data.packing={str(packing).lower()}",
        "data.order=epoch",
        "train.batch_size=4",
        "train.grad_accum_steps=1",
        "train.max_iters=1000",
        "train.eval_interval=0",
        "device=cpu",
        f"dtype={dtype}",
        "compile=false",
        "wandb.enabled=false",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = to_object(compose("train", overrides=overrides), TrainRunConfig)
    return Trainer(cfg, DistInfo())


def timed_step(run: Trainer) -> float:
    t0 = time.perf_counter()
    run.train_step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "chat.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(args.rows)))
        data = prepare(DataConfig(name="chat", builder="instructions", source=str(source)), data_root=Path(tmp))
        runs = {
            name: trainer(data, Path(tmp) / name, packing, args.dtype, args.block_size)
            for name, packing in (("padded", False), ("packed", True))
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds + 1):
            for name, run in runs.items():
                times[name].append(timed_step(run))
                print(name, times[name][-1], flush=True)
        examples = runs["padded"].loader.sequences
        stats = {}
        for name, run in runs.items():
            seconds, rows = statistics.median(times[name][1:]), len(run.loader.epoch)
            targets = 4 * int(examples.target_counts.sum()) / rows
            stats[name] = (seconds, targets, targets / seconds, rows)
    lines = [
        "| data.packing | rows per epoch | s/step | target tokens/step | target tokens/s | vs padded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (seconds, targets, rate, rows) in stats.items():
        lines.append(
            f"| {name} | {rows:,} | {seconds:.2f} | {targets:,.0f} | {rate:,.0f} | {rate / stats['padded'][2]:.2f}x |"
        )
    section = (
        f"{report.heading('Packed instruction data')}\n\n`{report.command_line()}` on {report.machine()}; "
        f"GPT-2 124M shape, block_size {args.block_size}, {args.dtype}, batch 4, {examples.count:,} training "
        f"examples ({examples.truncated:,} cut to block_size + 1), median of {args.rounds} alternating rounds "
        "after a warm-up round.\n\n" + "\n".join(lines) + "\n"
    )
    print(section)
    if not args.no_append:
        report.append(section)


if __name__ == "__main__":
    main()
