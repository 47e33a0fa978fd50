"""What a distributed run's checkpoint costs: save and resume time, and the peak RSS of each rank, for DDP and
FSDP2 on 2 CPU processes (gloo), GPT-2 124M and 350M shapes, fp32 AdamW, as a single file and sharded.

    python bench/checkpoint.py                     # ~10 minutes on 2 cores, ~16 GB of memory at 350M
    python bench/checkpoint.py --sizes gpt2 --no-append

Each case runs under `torchrun --nproc_per_node=2` in fresh processes: the model is built as the trainer builds
it (FSDP2: on the meta device, rank 0's weights broadcast into the shards), steps twice (batch 1 x 256) so the
optimizer has its state, then saves and resumes through the trainer's own `Checkpointer` and
`checkpoint.load_for_ranks`. A single file: every rank gives its state dict (FSDP gathers the full state to rank
0), rank 0 writes one ckpt.pt; on resume every rank reads it under DDP, rank 0 alone under FSDP (its copy is
broadcast into every rank's shards). Sharded (`train.sharded_checkpoint`, the default under torchrun): every rank
writes and reads its own part (DDP: each whole tensor is written by one rank). Times are rank 0's wall time (each
ends with a barrier); peak RSS is each rank's high-water mark after the step (before saving), after the save and
after the resume, the largest of the ranks (and after the resume, of the ranks but rank 0). Prints a markdown
table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(size: str, mode: str, kind: str, out_dir: str) -> dict:
    """Under torchrun: one case's figures (rank 0's times, the ranks' largest peak RSS in GiB)."""
    import torch

    from gpt2 import checkpoint, distributed
    from gpt2.config import OptimConfig
    from gpt2.model import GPT, preset
    from gpt2.optim import build_optimizer

    def peak(others: bool = False) -> float:
        """The ranks' largest high-water mark (with `others`: of the ranks but rank 0)."""
        peaks = distributed.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        return max(peaks[1:] if others else peaks)

    info = distributed.init("cpu")
    torch.manual_seed(0)
    if mode == "fsdp":
        with torch.device("meta"):
            model = GPT(preset(size)).train()
        initial = GPT(preset(size)).state_dict() if info.is_main else {}
        wrapped = distributed.wrap_model(model, info, "fsdp")
        distributed.materialize(model, info.device, initial)
        del initial
    else:
        model = GPT(preset(size)).train()
        wrapped = distributed.wrap_model(model, info, "ddp")
    optimizers = build_optimizer(model, OptimConfig(), "cpu")
    idx = torch.randint(0, 50257, (1, 256))
    for _ in range(2):
        wrapped(idx, idx, return_logits=False)[1].backward()
        optimizers.step()
        distributed.zero_grad(wrapped, optimizers)
    figures, config = {"peak_step_gib": peak()}, asdict(model.config)
    checkpointer = checkpoint.Checkpointer(
        out_dir,
        components={"model": distributed.FullModelState(model), "optimizer": optimizers},
        counters=(_Step(),),
        metadata=lambda: {"model_config": config},
        is_main=info.is_main,
        background=False,
        sharded=kind == "sharded",
    )

    distributed.barrier()
    t0 = time.perf_counter()
    checkpointer.save()
    path = checkpoint.latest(out_dir)
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    figures.update(save_s=time.perf_counter() - t0, peak_save_gib=peak())
    figures["size_gib"] = sum(p.stat().st_size for p in files) / 2**30

    t0 = time.perf_counter()
    ckpt = checkpoint.load_for_ranks(path, info, rank_0_only=mode == "fsdp")
    checkpointer.restore(ckpt, directory=path if path.is_dir() else None)
    del ckpt
    distributed.barrier()
    figures.update(resume_s=time.perf_counter() - t0, peak_resume_gib=peak(), peak_resume_others_gib=peak(True))
    del model, wrapped, optimizers, checkpointer
    distributed.cleanup()
    return figures


class _Step:
    """The trainer's counters, as far as a checkpoint needs them."""

    def state_dict(self) -> dict:
        return {"step": 2}

    def load_state_dict(self, state: dict) -> None:
        assert state["step"] == 2


def run_case(size: str, mode: str, kind: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
        out = subprocess.run([*cmd, "--child", size, mode, kind, tmp], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{size} {mode} {kind} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"])
    parser.add_argument("--kinds", nargs="+", default=["file", "sharded"], choices=["file", "sharded"])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.child:
        figures = child(*args.child)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(figures), flush=True)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    import report
    import torch

    rows = []
    for size in args.sizes:
        for mode, kind in ((mode, kind) for mode in ("ddp", "fsdp") for kind in args.kinds):
            r = run_case(size, mode, kind)
            rows.append(
                f"| {size} | {mode} | {kind} | {r['size_gib']:.2f} | {r['save_s']:.1f} | {r['resume_s']:.1f} | "
                f"{r['peak_step_gib']:.2f} | {r['peak_save_gib']:.2f} | {r['peak_resume_gib']:.2f} | "
                f"{r['peak_resume_others_gib']:.2f} |"
            )
            print(rows[-1], flush=True)
    table = (
        f"{report.heading('Checkpoint save and resume under torchrun')}\n\n"
        f"`{report.command_line()}` on {report.machine()}, 2 gloo processes of {max(1, torch.get_num_threads() // 2)} "
        "thread(s). file: one ckpt.pt written by rank 0 (FSDP: the full state gathered to it first), read whole "
        "by every rank on resume under DDP, by rank 0 alone under FSDP (which shards from its copy); sharded: "
        "every rank writes and reads its own part. Peak RSS: the largest rank's high-water mark after the "
        "training steps, after the save and after the resume.\n\n"
        "| model | parallelism | checkpoint | GiB on disk | save s | resume s | peak GiB: steps | after save "
        "| after resume | after resume, ranks but 0 |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
    )
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
