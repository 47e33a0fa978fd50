"""Generation speed: this engine vs the same model without a KV cache vs `transformers` generate, one run.

    python bench/sample.py                    # GPT-2 124M shape, random weights, CPU fp32; a few minutes on 2 cores
    python bench/sample.py --new-tokens 64 --reps 1 --no-append
    python bench/sample.py --ragged           # prompts of different lengths, batched: vs transformers, left-padded

For batch 1 and 8, a prompt of 4 tokens and `--new-tokens` new ones (sampling: temperature 1, top_k 200):
- `gpt2 engine`: `gpt2.sampling.generate` on the model as `Sampler` prepares it (on CPU, Linears of the kind
  that decodes fastest there, see `use_decode_linears`), KV cache preallocated once;
- `gpt2 engine, plain nn.Linear` (batch 1): the same with PyTorch's own Linear, to show what that buys;
- `gpt2 engine, bfloat16` (batch 1): weights and cache in bf16, the alternative `dtype=auto` was measured against;
- `gpt2 engine, compiled decode` (batch 1, with --compiled): `torch.compile`'d decode step on a static KV cache;
- `no KV cache`: the same model, a full forward over the whole context for every token (`--nocache-tokens`
  new tokens, fewer because its cost grows with the context; tokens/s is still comparable, and flattering
  to it since its contexts are shorter);
- `llama.cpp` (batch 1, when llama-cpp-python is installed): the same weights exported by this project's GGUF
  writer (`gpt2.export.write_gguf`) in f32 and f16, generated with `Llama.generate` (same prompt, temperature 1,
  top_k 200) on as many threads as torch uses: the engine users compare CPU decoding with;
- `transformers generate`: `GPT2LMHeadModel.generate` on the same weights, exported with `gpt2.hf.save_pretrained`
  and loaded with `from_pretrained`; in bf16 too at batch 1 (`--nocache-tokens` new tokens: on CPUs without
  native bf16 its (in, out) Conv1D weights take an emulated path). "vs transformers" is against its fp32 row.
Engines run round-robin `--reps` times and the best tokens/s is kept (the machine is shared). Each KV-cache row
also gets its weight stream: one decode step reads every weight once (the ~124M parameters except the position
table), so GB/s = steps/s x weight bytes, against this machine's copy bandwidth measured at the start (read +
write bytes of a 256 MB `copy_`, best of 5): the limit of one-row decoding. Prints a markdown table and appends
it to BENCHMARKS.md unless --no-append. The batch-1 fp32 engine and transformers are also profiled (64 tokens,
torch.profiler, fastest of 3 alternating runs): the share of their time in matrix products (`MATMUL_OPS`:
PyTorch's, MKL's and oneDNN's), the GB/s those stream, and the ratio to transformers an engine with no
work outside them would reach.

--ragged instead: `--prompts` prompts of 4 to 64 tokens, greedy, `--new-tokens` each, generated in batches of
each of `--batch-sizes`: our engine (each row its own positions, no padding) against transformers' batched
`generate` with left padding and an attention mask, on the same weights. Also checks that every prompt gets the
same tokens in a batch as alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import report  # noqa: E402  (bench/report.py, next to this script)
import torch

from gpt2.hf import save_pretrained
from gpt2.model import GPT, GPTConfig
from gpt2.sampling import SamplingParams, decode_step, generate, sample_next_token, use_decode_linears

ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(temperature=1.0, top_k=200)


def engine(model: GPT, idx: torch.Tensor, n: int, decode_linears: bool = True, **kw) -> int:
    if decode_linears:  # as the Sampler does
        use_decode_linears(model, idx.size(0))
    steps = sum(1 for _ in generate(model, idx, n, PARAMS, generator=torch.Generator().manual_seed(0), **kw))
    return steps * idx.size(0)


@torch.inference_mode()
def no_cache(model: GPT, idx: torch.Tensor, n: int) -> int:
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :])[0][:, -1]
        token = sample_next_token(logits, temperature=PARAMS.temperature, top_k=PARAMS.top_k, generator=g)
        idx = torch.cat([idx, token[:, None]], dim=1)
    return n * idx.size(0)


@torch.inference_mode()
def hf_generate(hf_model, idx: torch.Tensor, n: int) -> int:
    torch.manual_seed(0)
    out = hf_model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=True,
        temperature=PARAMS.temperature,
        top_k=PARAMS.top_k,
        pad_token_id=50256,
    )
    return (out.size(1) - idx.size(1)) * idx.size(0)


GREEDY = SamplingParams(temperature=0.0)


def engine_ragged(model: GPT, prompts: list[list[int]], n: int, batch_size: int) -> list[list[int]]:
    out = []
    use_decode_linears(model, batch_size)
    for start in range(0, len(prompts), batch_size):
        steps = torch.stack(list(generate(model, prompts[start : start + batch_size], n, GREEDY)), dim=1)
        out += steps.tolist()
    return out


@torch.inference_mode()
def llama_cpp_models(model: GPT, out: Path) -> dict[str, object]:
    """llama.cpp on `model`'s weights exported as GGUF, per dtype ("float32", "float16"); {} without
    llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    from gpt2.export import write_gguf
    from gpt2.tokenizer import GPT2Tokenizer

    models = {}
    for dtype in (torch.float32, torch.float16):
        path = write_gguf(model, GPT2Tokenizer(), out / str(dtype).removeprefix("torch."), dtype, "gpt2-bench")
        models[str(dtype).removeprefix("torch.")] = llama_cpp.Llama(
            model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False
        )
    return models


def llama_generate(llm, idx: torch.Tensor, n: int) -> int:
    """n new tokens from llama.cpp after the prompt idx (1, T): prefill, then n - 1 decode steps, as `engine`."""
    for count, _ in enumerate(llm.generate(idx[0].tolist(), top_k=200, temp=1.0, reset=True), start=1):
        if count == n:
            break
    return n


def hf_ragged(hf_model, prompts: list[list[int]], n: int, batch_size: int) -> list[list[int]]:
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        idx = torch.tensor([[50256] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        ids = hf_model.generate(
            idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256
        )
        out += ids[:, width:].tolist()
    return out


def ragged(args, ours: GPT, hf_model) -> str:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 65, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
    n, rows = args.new_tokens, []
    alone = engine_ragged(ours, prompts, n, 1)
    for B in (int(b) for b in args.batch_sizes.split(",")):
        best = {"gpt2": 0.0, "transformers": 0.0}
        same = True
        for rep in range(args.reps):
            t0 = time.perf_counter()
            tokens = engine_ragged(ours, prompts, n, B)
            best["gpt2"] = max(best["gpt2"], len(prompts) * n / (time.perf_counter() - t0))
            same &= tokens == alone
            t0 = time.perf_counter()
            hf_ragged(hf_model, prompts, n, B)
            best["transformers"] = max(best["transformers"], len(prompts) * n / (time.perf_counter() - t0))
            print(f"batch {B} rep {rep}: {best}", flush=True)
        rows.append(
            f"| {B} | {best['gpt2']:.1f} | {best['transformers']:.1f} | "
            f"{best['gpt2'] / best['transformers']:.2f}x | {'yes' if same else 'NO'} |"
        )
    return (
        f"{report.heading('Batched prompts of different lengths')}\n\n"
        f"`python bench/sample.py --ragged --prompts {args.prompts} --new-tokens {n} --batch-sizes {args.batch_sizes} "
        f"--reps {args.reps}` on {report.machine()}, {torch.get_num_threads()} threads. GPT-2 124M shape, random "
        f"weights, fp32, {args.prompts} prompts of 4 to 64 tokens (mean {sum(lengths) / len(lengths):.0f}), greedy, "
        f"{n} new tokens each, in batches of `batch`; tokens/s = all new tokens / wall time, best of the "
        "repetitions. transformers: `generate` with left padding and an attention mask. `same as alone`: every "
        "prompt's tokens in the batch equal its tokens generated alone (batch 1).\n\n"
        "| batch | gpt2 tokens/s | transformers tokens/s | gpt2 / transformers | same as alone |\n"
        "|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n"
    )


def weight_bytes(model: GPT) -> int:
    """Bytes one decode step reads: every parameter once (tied ones once), but one row of the position table."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not wpe)


def copy_bandwidth() -> float:
    """Bytes/s read + written by the best of 5 copies of 256 MB (the memory-bandwidth roof of decoding)."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def matmul_profile(run: Callable[[], int]) -> tuple[float, float]:
    """(seconds, of which in matrix products: `MATMUL_OPS`) of one `run`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()  # self times, in microseconds
    total = sum(e.self_cpu_time_total for e in events)
    return total / 1e6, sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6


def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--nocache-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--compiled", action="store_true", help="add a torch.compile'd decode row (minutes to compile)")
    p.add_argument("--ragged", action="store_true", help="the batched-prompts table instead (see above)")
    p.add_argument("--prompts", type=int, default=32, help="--ragged: how many prompts")
    args = p.parse_args()

    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = GPT(GPTConfig()).eval()  # GPT-2 124M shape, random weights
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(plain, tmp)
        hf_model = GPT2LMHeadModel.from_pretrained(tmp).eval()
    ours = use_decode_linears(copy.deepcopy(plain))
    if args.ragged:
        table = ragged(args, ours, hf_model)
        print("\n" + table)
        if not args.no_append:
            report.append(table)
        return
    compiled = torch.compile(decode_step) if args.compiled else None
    # bf16 at batch 1 on every CPU: without native bf16 its matrix products are emulated (slow), but one row
    # is a matrix-vector product, which PyTorch's reduced-precision kernel streams at fp32's bytes/s.
    ours_bf16 = use_decode_linears(copy.deepcopy(plain).to(torch.bfloat16))
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    gguf_dir = tempfile.TemporaryDirectory()
    llamas = llama_cpp_models(plain, Path(gguf_dir.name))
    load = os.getloadavg()[0]
    bandwidth = copy_bandwidth()

    rows = []
    for B in (int(b) for b in args.batch_sizes.split(",")):
        idx = torch.randint(0, 50257, (B, 4), generator=torch.Generator().manual_seed(B))
        n, nc = args.new_tokens, args.nocache_tokens
        cases: list[tuple[str, str, int, Callable[[], int]]] = [  # (name, dtype, new tokens, run)
            ("gpt2 engine (KV cache)", "float32", n, lambda: engine(ours, idx, n)),
            ("no KV cache (full forward per token)", "float32", nc, lambda: no_cache(ours, idx, nc)),
            ("transformers generate", "float32", n, lambda: hf_generate(hf_model, idx, n)),
        ]
        if B == 1:
            cases.insert(
                1, ("gpt2 engine, plain nn.Linear", "float32", n, lambda: engine(plain, idx, n, decode_linears=False))
            )
            cases.insert(2, ("gpt2 engine, bfloat16", "bfloat16", n, lambda: engine(ours_bf16, idx, n)))
            cases.append(("transformers generate, bfloat16", "bfloat16", nc, lambda: hf_generate(hf_bf16, idx, nc)))
            for dtype, llm in llamas.items():
                cases.append((f"llama.cpp ({dtype} GGUF)", dtype, n, lambda llm=llm: llama_generate(llm, idx, n)))
            if compiled is not None:
                cases.insert(
                    1,
                    (
                        "gpt2 engine, compiled decode (static cache)",
                        "float32",
                        n,
                        lambda: engine(ours, idx, n, decode=compiled, static=True),
                    ),
                )
                engine(ours, idx, n, decode=compiled, static=True)  # compile outside the timed runs
        engine(ours, idx, 4), hf_generate(hf_model, idx, 4)  # warm up kernels
        if B == 1:
            engine(ours_bf16, idx, 4), hf_generate(hf_bf16, idx, 4)
            for llm in llamas.values():
                llama_generate(llm, idx, 4)
        best = {name: 0.0 for name, *_ in cases}
        for rep in range(args.reps):
            for name, _, _, fn in cases:
                best[name] = max(best[name], timed(fn))
                print(f"batch {B} rep {rep}: {name}: {best[name]:.1f} tok/s", flush=True)
        hf = best["transformers generate"]
        for name, dtype, tokens, _ in cases:
            roof = ""  # weight stream and its share of the copy bandwidth, for the rows that read each weight once
            if not name.startswith("no KV cache"):
                stream = best[name] / B * weight_bytes(ours if dtype == "float32" else ours_bf16)
                roof = f"{stream / 1e9:.1f} | {stream / bandwidth:.0%}"
            rows.append(
                f"| {B} | {name} | {dtype} | {tokens} | {best[name]:.1f} | {best[name] / hf:.2f}x | {roof or ' | '} |"
            )

    # Batch 1, fp32, 64 tokens: n forwards (prefill, then n - 1 decode steps) each read every weight once.
    idx, n = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(1)), 64
    runs = [
        (matmul_profile(lambda: engine(ours, idx, n)), matmul_profile(lambda: hf_generate(hf_model, idx, n)))
        for _ in range(3)
    ]  # alternating; the fastest of each
    (ours_s, ours_mm), (hf_s, hf_mm) = min(r[0] for r in runs), min(r[1] for r in runs)
    profiled = (
        f"Profiled at batch 1 in fp32 (64 tokens): the engine spends {ours_mm / ours_s:.0%} of its time in "
        f"matrix products ({', '.join(MATMUL_OPS)}), which stream the weights at "
        f"{n * weight_bytes(ours) / ours_mm / 1e9:.1f} GB/s, transformers {hf_mm / hf_s:.0%}; an engine doing "
        f"nothing but these products would be {hf_s / ours_mm:.2f}x transformers."
    )
    print(profiled)
    cpu_kind = "with" if report.native_bf16() else "without"  # one section each: their kernels differ
    header = (
        f"{report.heading(f'Sampling speed on a CPU {cpu_kind} native bf16')}\n\n"
        f"`python bench/sample.py --new-tokens {args.new_tokens} --nocache-tokens {args.nocache_tokens} "
        f"--reps {args.reps}{f' --threads {args.threads}' if args.threads else ''}` on {report.machine()}, "
        f"{torch.get_num_threads()} threads (load average {load:.1f} at start: the machine is shared, so compare "
        "rows of one table). GPT-2 124M shape, random weights, prompt of 4 tokens, sampling with temperature 1 "
        f"and top_k 200; tokens/s = new tokens x batch / wall time, best of the round-robin repetitions. Weight "
        f"stream = decode steps/s x weight bytes ({weight_bytes(ours) / 1e6:.0f} MB in fp32); copy bandwidth "
        f"measured at the start: {bandwidth / 1e9:.1f} GB/s. {profiled}\n\n"
        "| batch | engine | dtype | new tokens | tokens/s | vs transformers | weight stream GB/s "
        "| of copy bandwidth |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|\n"
    )
    table = header + "\n".join(rows) + "\n"
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
