"""Evaluation throughput on CPU: perplexity tokens/s (small model) and HellaSwag examples/s (124M shape).

    python bench/eval.py                 # about 3 minutes of CPU time (longer on a busy machine)
    python bench/eval.py --no-append     # print the table only

1. Perplexity: `gpt2.eval.perplexity.evaluate` of a random mini-shaped model (6 layers, 384 wide, block
   256) with tiny-shakespeare's character vocabulary on the first `--ppl-chars` characters of tiny-shakespeare:
   scored tokens/s for non-overlapping windows (stride = window) and the default stride (window // 2, twice the
   forward passes), in fp32 and bf16 autocast, batch 8, plus batch 1 to show what batching buys.
2. HellaSwag: `gpt2.eval.hellaswag.evaluate` of a random GPT-2 124M-shaped model on `--hs-examples` synthetic
   examples (contexts of ~40 words, four endings of ~15 words, as the real set), batch 8 examples (32 rows).
Prints a markdown table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402  (bench/report.py, next to this script)

from gpt2.eval import hellaswag, perplexity  # noqa: E402
from gpt2.model import GPT, preset  # noqa: E402
from gpt2.resources import TINY_SHAKESPEARE  # noqa: E402
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402


def bench_perplexity(chars: int) -> list[tuple[str, str, float]]:
    text = TINY_SHAKESPEARE.read_text()[:chars]
    tok = CharTokenizer.from_text(text)
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(preset("mini", vocab_size=tok.vocab_size)).eval()  # 6L x 384, block 256
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for stride, batch in ((256, 8), (128, 8), (128, 1)):
            perplexity.evaluate(model, tokens[:2049], stride=stride, batch_size=batch, dtype=dtype)  # warm up
            t0 = time.perf_counter()
            r = perplexity.evaluate(model, tokens, stride=stride, batch_size=batch, dtype=dtype)
            dt = time.perf_counter() - t0
            what = f"mini shape (char vocab), window 256, stride {stride}, batch {batch}"
            rows.append((what, str(dtype).replace("torch.", ""), r.tokens / dt))
            print(f"{what} {dtype}: {r.tokens / dt:,.0f} tok/s (loss {r.loss:.3f})", flush=True)
    return rows


def synthetic_examples(n: int, seed: int = 0) -> list[hellaswag.Example]:
    words = TINY_SHAKESPEARE.read_text().split()
    rng = random.Random(seed)

    def phrase(k: int) -> str:
        i = rng.randrange(len(words) - k)
        return " ".join(words[i : i + k])

    return [hellaswag.Example(phrase(40), [phrase(15) for _ in range(4)], rng.randrange(4)) for _ in range(n)]


def bench_hellaswag(n: int) -> list[tuple[str, str, float]]:
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("gpt2")).eval()  # 124M shape, random weights: the speed does not depend on them
    examples = synthetic_examples(n)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hellaswag.evaluate(model, tok, examples[:8], "cpu", dtype, batch_size=8)  # warm up
        t0 = time.perf_counter()
        hellaswag.evaluate(model, tok, examples, "cpu", dtype, batch_size=8)
        dt = time.perf_counter() - t0
        what = f"GPT-2 124M shape, {n} synthetic examples, batch 8 (32 rows)"
        rows.append((what, str(dtype).replace("torch.", ""), n / dt))
        print(f"hellaswag {what} {dtype}: {n / dt:.2f} examples/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-chars", type=int, default=10_000, help="characters of text for perplexity")
    parser.add_argument("--hs-examples", type=int, default=8, help="synthetic HellaSwag examples")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    ppl = bench_perplexity(args.ppl_chars)
    hs = bench_hellaswag(args.hs_examples)
    load = os.getloadavg()[0]  # other jobs on a shared machine slow everything down: say so
    machine = (
        f"2-core x86 CPU sandbox, torch {torch.__version__.split('+')[0]} CPU ({platform.machine()}), "
        f"load average {load:.1f} at the end"
    )
    lines = [
        f"{report.heading('Evaluation throughput')}",
        "",
        f"`python bench/eval.py` — machine: {machine}, {torch.get_num_threads()} threads; random weights "
        "(speed does not depend on them). Perplexity counts scored tokens (each once); the default stride "
        "(window // 2) runs twice the forward passes of stride = window.",
        "",
        "| eval | setup | dtype | throughput |",
        "|---|---|---|---|",
    ]
    lines += [f"| perplexity | {what} | {dt} | {v:,.0f} tokens/s |" for what, dt, v in ppl]
    lines += [f"| HellaSwag | {what} | {dt} | {v:.2f} examples/s |" for what, dt, v in hs]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
