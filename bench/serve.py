"""The server's throughput: N clients at once against the same N requests one after another.

    python bench/serve.py                       # GPT-2 124M shape, random weights, CPU fp32; ~2 minutes on 2 cores
    python bench/serve.py --clients 4 --max-tokens 32 --no-append

Starts `python -m gpt2.serve` (batch_size = --clients) on a Hugging Face-layout export of a random-weight model,
then alternates, --reps times: `sequential` (the requests one at a time) and `concurrent` (one thread per client,
all at once: the server decodes them in one batch). Each request is a different prompt, greedy, with
--max-tokens new tokens; every reply is checked to have them all. tokens/s = completion tokens / wall time, best
of the repetitions. Prints a markdown table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import report  # noqa: E402  (bench/report.py, next to this script)
import torch

from gpt2.hf import save_pretrained
from gpt2.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The history of",
    "In a small village",
    "Scientists have found",
    "Once upon a time",
    "The market",
    "My favourite",
    "According to the report",
    "She opened the door and",
]


def start_server(model_dir: str, rows: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2.serve",
            f"init_from={model_dir}",
            "port=0",
            "device=cpu",
            "dtype=float32",
            f"batch_size={rows}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = re.search(r"http://[\d.]+:\d+", proc.stdout.readline()).group(0)
    for _ in range(100):
        try:
            httpx.get(url + "/health", timeout=1, trust_env=False)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


def request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    reply = client.post(url + "/v1/completions", json=body, timeout=600).json()
    assert reply["choices"][0]["finish_reason"] == "length", reply
    tokens = reply["usage"]["completion_tokens"]
    assert tokens == max_tokens, reply
    return tokens


def sequential(url: str, prompts: list[str], max_tokens: int) -> float:
    with httpx.Client(trust_env=False) as client:
        t0 = time.perf_counter()
        tokens = sum(request(client, url, p, max_tokens) for p in prompts)
        return tokens / (time.perf_counter() - t0)


def concurrent(url: str, prompts: list[str], max_tokens: int) -> float:
    with httpx.Client(trust_env=False) as client, ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        tokens = sum(pool.map(lambda p: request(client, url, p, max_tokens), prompts))
        return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()

    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" * (i >= len(PROMPTS)) for i in range(args.clients)]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(GPT(GPTConfig()).eval(), tmp)  # GPT-2 124M shape, random weights
        proc, url = start_server(tmp, args.clients)
        try:
            request(httpx.Client(trust_env=False), url, "warm up", 4)
            best = {"sequential": 0.0, "concurrent": 0.0}
            for rep in range(args.reps):
                for name, fn in (("sequential", sequential), ("concurrent", concurrent)):
                    best[name] = max(best[name], fn(url, prompts, args.max_tokens))
                    print(f"rep {rep}: {name}: {best[name]:.1f} tokens/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    ratio = best["concurrent"] / best["sequential"]
    table = (
        f"{report.heading('Server throughput')}\n\n"
        f"`{report.command_line()}` on {report.machine()}, {torch.get_num_threads()} threads. `python -m gpt2.serve` "
        f"with batch_size={args.clients}, GPT-2 124M shape, random weights, fp32; {args.clients} requests with "
        f"different prompts, greedy, {args.max_tokens} tokens each, every reply checked; best of {args.reps}.\n\n"
        "| clients | how | tokens/s | vs sequential |\n|---:|---|---:|---:|\n"
        f"| {args.clients} | one after another | {best['sequential']:.1f} | 1.00x |\n"
        f"| {args.clients} | all at once (continuous batching) | {best['concurrent']:.1f} | {ratio:.2f}x |\n"
    )
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
