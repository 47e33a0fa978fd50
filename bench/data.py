"""Data pipeline throughput and memory: preparation vs raw tiktoken, peak RSS on a large corpus, loader speed.

    python bench/data.py                  # ~1 GB generated corpus; about 2-3 minutes on 2 cores
    python bench/data.py --gb 3 --no-append

1. Generates a corpus of .jsonl files (`--gb` of text; documents are random 0.5-8 KB slices of tiny-shakespeare)
   on disk, plus a `--sample-mb` sample of its first documents.
2. Raw baseline: tiktoken's `encode_ordinary_batch(num_threads=N)` on the sample, held in memory.
3. `gpt2.data.prepare` on the same sample, then on the whole corpus, each in a fresh process that reports its
   wall time and peak RSS: the two peaks should be about equal (memory does not grow with the corpus).
4. Loader: `TokenLoader.next_batch()` and `eval_batches` batches/s on the prepared corpus (CPU tensors).
Prints a table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py, next to this script)

from gpt2.resources import TINY_SHAKESPEARE  # noqa: E402
from gpt2.tokenizer import gpt2_encoding  # noqa: E402


def rss_mb(peak: bool) -> float:
    """Resident memory of this process in MB: now, or its peak (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    try:
        key = "VmHWM:" if peak else "VmRSS:"
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    except OSError:  # not Linux: ru_maxrss (KB on Linux, bytes on macOS) is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def child_prepare(source: str, data_root: str, name: str, threads: int, val_fraction: float) -> None:
    """Runs in a fresh process: prepare `source`, print timings and memory as one JSON line."""
    from gpt2.config import DataConfig
    from gpt2.data import open_dataset
    from gpt2.data.prepare import prepare

    before = rss_mb(peak=False)
    t0, c0 = time.perf_counter(), time.process_time()
    prepare(
        DataConfig(name=name, source=source, num_proc=threads, val_fraction=val_fraction), data_root, overwrite=True
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ds = open_dataset(name, data_root)
    tokens = ds.num_tokens("train") + ds.num_tokens("val")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "tokens": tokens,
                "rss_after_imports_mb": before,
                "peak_rss_mb": rss_mb(peak=True),
            }
        )
    )


def generate(out_dir: Path, total_bytes: int, sample_bytes: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write `total_bytes` of text as .jsonl files (256 MB each) and a sample file of the first documents."""
    import numpy as np

    text = TINY_SHAKESPEARE.read_text()
    rng = np.random.default_rng(seed)
    corpus, sample_dir = out_dir / "corpus", out_dir / "sample"
    corpus.mkdir(parents=True)
    sample_dir.mkdir()
    sample = open(sample_dir / "sample.jsonl", "w")
    written, part, docs, f = 0, 0, 0, None
    while written < total_bytes:
        if f is None or f.tell() > 256 << 20:
            if f is not None:
                f.close()
            f = open(corpus / f"part_{part:04d}.jsonl", "w")
            part += 1
        lines = []
        for start, length in zip(rng.integers(0, len(text) - 8192, 1000), rng.integers(512, 8192, 1000)):
            lines.append(json.dumps({"text": text[start : start + length]}) + "\n")
            written += int(length)
            docs += 1
        chunk = "".join(lines)
        f.write(chunk)
        if sample.tell() < sample_bytes:
            sample.write(chunk)
    f.close()
    sample.close()
    return corpus, sample_dir / "sample.jsonl", docs


def run_child(source: Path, data_root: Path, name: str, threads: int, val_fraction: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(data_root), name, str(threads), str(val_fraction)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the generated corpus (GB of text)")
    p.add_argument("--sample-mb", type=float, default=32, help="text tokenized in memory for the raw baseline")
    p.add_argument("--threads", type=int, default=0, help="tokenizer threads (0: all cores)")
    p.add_argument("--dir", help="work directory (default: a temporary one, deleted afterwards)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        source, data_root, name, threads, val_fraction = args.child
        return child_prepare(source, data_root, name, int(threads), float(val_fraction))

    import torch

    from gpt2.data import TokenLoader, eval_batches, open_dataset

    threads = args.threads or os.cpu_count() or 1
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    work = Path(tmp.name)
    t0 = time.perf_counter()
    corpus, sample, docs = generate(work, int(args.gb * 1e9), int(args.sample_mb * 1e6))
    gen_s = time.perf_counter() - t0
    print(f"generated {args.gb:g} GB ({docs:,} documents) in {gen_s:.0f}s", file=sys.stderr, flush=True)

    enc = gpt2_encoding()
    texts = [json.loads(line)["text"] for line in open(sample)]
    t0, c0 = time.perf_counter(), time.process_time()
    raw_tokens = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts, num_threads=threads))  # + EOT each
    raw_s, raw_cpu = time.perf_counter() - t0, time.process_time() - c0
    del texts
    small = run_child(sample, work / "data", "sample", threads, 0.0)  # no split: same tokens as raw
    assert small["tokens"] == raw_tokens, (small["tokens"], raw_tokens)
    print(
        f"sample: raw {raw_tokens / raw_s:,.0f} tok/s, prepare {small['tokens'] / small['seconds']:,.0f} tok/s",
        file=sys.stderr,
        flush=True,
    )
    big = run_child(corpus, work / "data", "big", threads, 0.005)
    print(
        f"corpus: prepare {big['tokens'] / big['seconds']:,.0f} tok/s, peak RSS {big['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )

    ds = open_dataset("big", work / "data")
    loader_rows = []
    for batch_size, block_size in ((12, 1024), (64, 1024)):
        loader = TokenLoader(ds, "train", batch_size=batch_size, block_size=block_size, device=torch.device("cpu"))
        n = 300
        loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(n):
            loader.next_batch()
        train_s = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in eval_batches(ds, "val", num_batches=50, batch_size=batch_size, block_size=block_size):
            pass
        eval_s = (time.perf_counter() - t0) / 50
        loader_rows.append((batch_size, block_size, train_s, eval_s))
    tmp.cleanup()

    gb_sample = args.sample_mb / 1e3
    lines = [
        "| stage | text | tokens | seconds | tokens/s | vs raw | CPU s per 1M tokens | CPU vs raw "
        "| peak RSS MB (after imports) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| raw `encode_ordinary_batch` (in memory) | {gb_sample:g} GB | {raw_tokens:,} | {raw_s:.1f} | "
        f"{raw_tokens / raw_s:,.0f} | 1.00x | {raw_cpu / raw_tokens * 1e6:.2f} | 1.00x | |",
    ]
    for label, size, r in (
        ("prepare (read, tokenize, write shards)", gb_sample, small),
        ("prepare, whole corpus", args.gb, big),
    ):
        rate = r["tokens"] / r["seconds"]
        cpu_per = r["cpu"] / r["tokens"]
        lines.append(
            f"| {label} | {size:g} GB | {r['tokens']:,} | {r['seconds']:.1f} | {rate:,.0f} | "
            f"{rate / (raw_tokens / raw_s):.2f}x | {cpu_per * 1e6:.2f} | {cpu_per / (raw_cpu / raw_tokens):.2f}x | "
            f"{r['peak_rss_mb']:.0f} ({r['rss_after_imports_mb']:.0f}) |"
        )
    lines += ["", "| loader | batch x block | batches/s | tokens/s |", "|---|---|---:|---:|"]
    for b, t, train_s, eval_s in loader_rows:
        lines.append(
            f"| `TokenLoader.next_batch` (random windows) | {b} x {t} | {1 / train_s:,.0f} | {b * t / train_s:,.0f} |"
        )
        lines.append(f"| `eval_batches` (fixed windows) | {b} x {t} | {1 / eval_s:,.0f} | {b * t / eval_s:,.0f} |")
    table = "\n".join(lines)
    torch_version = torch.__version__.split("+")[0]
    where = f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch_version} CPU, {threads} tokenizer threads"
    print(f"\n{where}\n{table}")
    if not args.no_append:
        report.append(
            f"{report.heading('Data preparation and loading')}\n\n"
            f"`{report.command_line()}` on {where}. Corpus: {args.gb:g} GB of generated .jsonl ({docs:,} documents, "
            f"0.5-8 KB slices of tiny-shakespeare) streamed from disk; each prepare runs in a fresh process.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
