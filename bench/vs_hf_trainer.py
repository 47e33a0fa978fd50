"""A full fine-tune of GPT-2 124M: this trainer against transformers' `Trainer`, tokens/s and peak memory.

    python bench/vs_hf_trainer.py                        # 2 alternating rounds; appends to BENCHMARKS.md
    python bench/vs_hf_trainer.py --rounds 1 --steps 6 --block-size 1024 --no-append

Both start from the same weights (random GPT-2 124M in Hugging Face layout, written once to --init-dir) and
train on tiny-shakespeare's GPT-2 tokens, batch 4 x --block-size, bf16 autocast (where the CPU emulates bf16
that is very slow: pass --dtype float32), fused AdamW, gradient clipping at 1.0, one process each, in rounds
that alternate the three runs:
- `gpt2`: `train.py init_from=<dir> ...` in-process (`gpt2.training.Trainer`), its loss chunk by chunk
  (`gpt2.loss`, what training always uses);
- `gpt2, whole-batch logits`: the same run with the model's forward patched to return the whole batch's
  logits and take `F.cross_entropy` of them (the plain path; only this benchmark does that);
- `transformers Trainer`: `GPT2LMHeadModel` + `Trainer(TrainingArguments(bf16=..., use_cpu=True))` with its
  defaults otherwise (fused AdamW, max_grad_norm 1.0), windows of the same tokens.
Each run is its own process; a step's time is the median over the steps after --warmup (ours from the
trainer's per-step log lines, the Trainer's from a callback around each step); peak RSS covers the whole
process (ours includes its final eval of one batch and its checkpoint write).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py)
from finetune_memory import make_data, make_init  # noqa: E402
from report import native_bf16  # noqa: E402

RUNS = ("gpt2", "gpt2, whole-batch logits", "transformers Trainer")


def ours(job: dict) -> list[float]:
    """Seconds per step of `train.py` with `job`'s settings, in this process."""
    from hydra import compose, initialize_config_dir

    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.resources import CONFIG_DIR
    from gpt2.training import Trainer

    if job["logits"]:
        patch_whole_batch_logits()
    overrides = [
        f"init_from={job['init']}",
        f"data.name={job['data']}",
        f"out_dir={job['out']}",
        f"model.block_size={job['block_size']}",
        "train.batch_size=4",
        "train.grad_accum_steps=1",
        f"train.max_iters={job['steps']}",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "train.log_interval=1",
        f"dtype={job['dtype']}",
        "device=cpu",
        "compile=false",
        "model.dropout=0.0",
        "optim=adamw",
        "optim.warmup_iters=0",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = to_object(compose("train", overrides=overrides), TrainRunConfig)
    Trainer(cfg, DistInfo(), typed_model_keys=frozenset({"block_size", "dropout"})).fit()  # as if typed
    lines = [json.loads(line) for line in open(Path(job["out"]) / "metrics.jsonl")]
    return [r["ms_per_step"] / 1000 for r in lines if "ms_per_step" in r]


def patch_whole_batch_logits() -> None:
    """Make GPT.forward compute the loss from the whole batch's logits even when asked for chunks."""
    from gpt2.model import GPT

    forward = GPT.forward
    GPT.forward = lambda self, idx, targets=None, kv_cache=None, return_logits=True, **kwargs: forward(
        self, idx, targets, kv_cache, True, **kwargs
    )


def hf(job: dict) -> list[float]:
    """Seconds per step of transformers' Trainer with `job`'s settings, in this process."""
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    shard = sorted(Path(job["data"]).glob("train_*.bin"))[0]
    tokens = np.fromfile(shard, dtype=np.uint16, offset=1024).astype(np.int64)
    T = job["block_size"]
    windows = [torch.from_numpy(tokens[i : i + T]) for i in range(0, len(tokens) - T, T)]
    dataset = [{"input_ids": w, "labels": w} for w in windows]  # the model shifts the labels
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=job["out"],
        per_device_train_batch_size=4,
        max_steps=job["steps"],
        bf16=job["dtype"] == "bfloat16",
        use_cpu=True,
        learning_rate=6e-4,
        weight_decay=0.1,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = GPT2LMHeadModel.from_pretrained(job["init"])
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepTimer()]).train()
    return times


def measure(run: str, job: dict) -> dict:
    """One run in a fresh process: median step seconds after warmup, tokens/s, peak RSS (GiB)."""
    job = {**job, "logits": run == "gpt2, whole-batch logits", "hf": run == "transformers Trainer"}
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    subprocess.run(["rm", "-rf", job["out"]])
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(p.stdout.strip().splitlines()[-1])
    s = statistics.median(result["times"][job["warmup"] :])
    return {"s": s, "tokens_per_sec": 4 * job["block_size"] / s, "peak_gib": result["peak_gib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    p.add_argument("--init-dir", default=str(Path(tempfile.gettempdir()) / "gpt2-random-inits"))
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job = json.loads(args.child)
        times = hf(job) if job["hf"] else ours(job)
        print(json.dumps({"times": times, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
        return
    init = make_init("gpt2", Path(args.init_dir))
    results: dict[str, list[dict]] = {run: [] for run in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "init": str(init),
            "data": str(make_data(Path(tmp))),
            "out": str(Path(tmp) / "run"),
            "block_size": args.block_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": args.dtype,
        }
        for _ in range(args.rounds):
            for run in RUNS:
                results[run].append(measure(run, job))
                print(run, results[run][-1], flush=True)
    section = (
        f"{report.heading('Fine-tuning step: against transformers Trainer')}\n\n`{report.command_line()}` "
        f"on {report.machine()}; GPT-2 124M, batch "
        f"4 x {args.block_size}, {args.dtype}, {args.steps} steps per run, median after {args.warmup}, "
        f"{args.rounds} alternating rounds.\n\n{table(results, args)}\n"
    )
    print(section)
    if not args.no_append:
        report.append(section)


def table(results: dict[str, list[dict]], args) -> str:
    hf_rates = [r.get("tokens_per_sec") for r in results["transformers Trainer"]]
    lines = [
        "| run | round | s/step | tokens/s | vs Trainer (same round) | peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run, rounds in results.items():
        for i, r in enumerate(rounds):
            if "error" in r:
                lines.append(f"| {run} | {i + 1} | {r['error']} | | | |")
                continue
            ratio = f"{r['tokens_per_sec'] / hf_rates[i]:.2f}x" if hf_rates[i] else "-"
            lines.append(
                f"| {run} | {i + 1} | {r['s']:.2f} | {r['tokens_per_sec']:,.0f} | {ratio} | {r['peak_gib']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
