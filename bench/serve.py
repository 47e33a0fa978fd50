"""The server's throughput (N clients at once against the same N requests one after another) and, with
--latency, the inter-token latency of N streams while a long prompt arrives (chunked prefill against one whole
prefill).

    python bench/serve.py                       # GPT-2 124M shape, random weights, CPU fp32; ~2 minutes on 2 cores
    python bench/serve.py --clients 4 --max-tokens 32 --no-append
    python bench/serve.py --latency             # ~5 minutes on 2 cores

Throughput: starts `python -m gpt2.serve` (batch_size = --clients) on a Hugging Face-layout export of a
random-weight model, then alternates, --reps times: `sequential` (the requests one at a time) and `concurrent`
(one thread per client, all at once: the server decodes them in one batch). Each request is a different prompt,
greedy, with --max-tokens new tokens; every reply is checked to have them all. tokens/s = completion tokens /
wall time, best of the repetitions.

Latency: one server per `prefill_chunk` in --chunks (the largest, 1024, prefills a whole prompt at once, as the
server did before chunking), batch_size = --clients + 1. --clients streams of --max-tokens greedy tokens each
(`logprobs: 0`, so every token is its own event); in the `long prompt` runs a --long-prompt-token prompt arrives
once every stream has its 8th token. Inter-token latency = the gaps between a stream's events; p50/p99/max over
every gap of every stream, and the long prompt's time to first token. Settings alternate, --reps times; the
table keeps each setting's repetition with the lowest p99.

Prints a markdown table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
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


def start_server(model_dir: str, rows: int, *args: str) -> tuple[subprocess.Popen, str]:
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
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = re.search(r"http://[\d.]+:\d+", proc.stdout.readline()).group(0)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the access log: a full pipe blocks it
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


def stream_gaps(url: str, body: dict, running: threading.Semaphore | None = None) -> list[float]:
    """Stream one completion; returns the seconds between its events (the first: from sending the request).
    Releases `running` once 8 events have arrived (so the long prompt can be sent while every stream runs)."""
    times = [time.perf_counter()]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=600) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                if running is not None and len(times) == 9:
                    running.release()
    return [b - a for a, b in zip(times, times[1:])]


def latency_run(url: str, clients: int, max_tokens: int, long_prompt: list[int] | None) -> dict[str, float]:
    """`clients` streams at once (and the long prompt, once each has 8 tokens): ITL percentiles in ms."""
    running = threading.Semaphore(0)
    bodies = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
        for i in range(clients)
    ]
    with ThreadPoolExecutor(clients) as pool:
        streams = [pool.submit(stream_gaps, url, body, running) for body in bodies]
        for _ in bodies:
            running.acquire()
        first = stream_gaps(url, {"prompt": long_prompt, "max_tokens": 1})[0] if long_prompt else float("nan")
        gaps = [gap for stream in streams for gap in stream.result()[1:]]  # [0] is the stream's first token
    assert len(gaps) == clients * (max_tokens - 1), len(gaps)
    q = torch.tensor(gaps).quantile(torch.tensor([0.5, 0.99])).tolist()
    return {"p50": 1e3 * q[0], "p99": 1e3 * q[1], "max": 1e3 * max(gaps), "ttft": 1e3 * first}


def latency(args: argparse.Namespace, model_dir: str) -> str:
    long_prompt = torch.randint(0, 50257, (args.long_prompt_tokens,), generator=torch.Generator().manual_seed(0))
    settings = [(chunk, long) for chunk in args.chunks for long in (False, True)]
    best: dict[tuple[int, bool], dict[str, float]] = {}
    servers = {chunk: start_server(model_dir, args.clients + 1, f"prefill_chunk={chunk}") for chunk in args.chunks}
    try:
        for _proc, url in servers.values():
            request(httpx.Client(trust_env=False), url, "warm up", 4)
        for rep in range(args.reps):
            for chunk, long in settings:
                prompt = long_prompt.tolist() if long else None
                result = latency_run(servers[chunk][1], args.clients, args.max_tokens, prompt)
                if (chunk, long) not in best or result["p99"] < best[chunk, long]["p99"]:
                    best[chunk, long] = result
                print(f"rep {rep}: prefill_chunk={chunk} long prompt={long}: {result}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    rows = "".join(
        f"| {chunk} | {'yes' if long else 'no'} | {r['p50']:.0f} | {r['p99']:.0f} | {r['max']:.0f} | "
        f"{r['ttft']:.0f} |\n".replace("| nan |", "| - |")
        for (chunk, long), r in sorted(best.items())
    )
    return (
        f"{report.heading('Server inter-token latency while a long prompt arrives')}\n\n"
        f"`{report.command_line()}` on {report.machine()}, {torch.get_num_threads()} threads. `python -m gpt2.serve` "
        f"with batch_size={args.clients + 1}, GPT-2 124M shape, random weights, fp32; {args.clients} greedy streams "
        f"of {args.max_tokens} tokens; in the `long prompt` runs a {args.long_prompt_tokens}-token prompt arrives "
        f"once every stream has 8 tokens. Inter-token latency over every gap of every stream, in ms; of "
        f"{args.reps} repetitions (settings alternating) the one with the lowest p99. prefill_chunk={max(args.chunks)} "
        "prefills the whole prompt at once (the server before chunked prefill).\n\n"
        "| prefill_chunk | long prompt | p50 ms | p99 ms | max ms | its first token, ms |\n"
        "|---:|---|---:|---:|---:|---:|\n" + rows
    )


def throughput(args: argparse.Namespace, model_dir: str) -> str:
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" * (i >= len(PROMPTS)) for i in range(args.clients)]
    proc, url = start_server(model_dir, args.clients)
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
    return (
        f"{report.heading('Server throughput')}\n\n"
        f"`{report.command_line()}` on {report.machine()}, {torch.get_num_threads()} threads. `python -m gpt2.serve` "
        f"with batch_size={args.clients}, GPT-2 124M shape, random weights, fp32; {args.clients} requests with "
        f"different prompts, greedy, {args.max_tokens} tokens each, every reply checked; best of {args.reps}.\n\n"
        "| clients | how | tokens/s | vs sequential |\n|---:|---|---:|---:|\n"
        f"| {args.clients} | one after another | {best['sequential']:.1f} | 1.00x |\n"
        f"| {args.clients} | all at once (continuous batching) | {best['concurrent']:.1f} | {ratio:.2f}x |\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="measure inter-token latency instead of throughput")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64], help="prefill_chunk values (--latency)")
    p.add_argument("--long-prompt-tokens", type=int, default=1000)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(GPT(GPTConfig()).eval(), tmp)  # GPT-2 124M shape, random weights
        table = latency(args, tmp) if args.latency else throughput(args, tmp)
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
