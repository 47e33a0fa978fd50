"""lm-evaluation-harness on our model, two ways: the harness's `hf` model on the HF export (what
`python -m gpt2.eval harness` runs) against its `local-completions` model through `python -m gpt2.serve` (our
engine: continuous batching, KV-cached decoding).

    python bench/harness.py                # GPT-2 124M shape, random weights, CPU fp32; ~6 minutes on 2 cores
    python bench/harness.py --mc-docs 20 --gen-docs 8 --no-append

Two local tasks written to a temporary folder: `bench_mc`, multiple choice, --mc-docs documents of a ~40-word
context and four ~15-word endings (HellaSwag's shape: loglikelihood requests), and `bench_gen`, generate_until,
--gen-docs ~40-word prompts continued greedily by up to --gen-tokens tokens (`until` a string a random model
never writes, so every request generates them all). Both ways run the same requests, batch 8: the `hf` model
with batch_size=8; `local-completions` with 8 requests in flight (num_concurrent=8) against a server of 8 rows.
The ways alternate, --reps times; each task's best wall time is kept. The server's start and the `hf` model's
loading are not timed.

Prints a markdown table and appends it to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import lm_eval
import report  # noqa: E402  (bench/report.py, next to this script)
import torch
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager
from serve import start_server  # bench/serve.py

from gpt2.export import write_gpt2_tokenizer
from gpt2.hf import save_pretrained
from gpt2.model import GPT, GPTConfig
from gpt2.resources import TINY_SHAKESPEARE


def write_tasks(folder: Path, mc_docs: int, gen_docs: int, gen_tokens: int) -> None:
    words = TINY_SHAKESPEARE.read_text().split()
    rng = random.Random(0)

    def phrase(k: int) -> str:
        i = rng.randrange(len(words) - k)
        return " ".join(words[i : i + k])

    docs = [
        {"context": phrase(40), "endings": [" " + phrase(15) for _ in range(4)], "label": 0} for _ in range(mc_docs)
    ]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"context": phrase(40)}) + "\n" for _ in range(gen_docs)))
    common = 'dataset_path: json\ntest_split: test\ndoc_to_text: "{{context}}"\n'
    (folder / "mc.yaml").write_text(
        f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: bench_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        'output_type: generate_until\ndoc_to_target: " x"\n'
        f'generation_kwargs:\n  until: ["@@never@@"]\n  max_gen_toks: {gen_tokens}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


def timed(model: LM, task: str, tasks: TaskManager) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=tasks, log_samples=True)
    return time.perf_counter() - t0, [s["resps"] for s in results["samples"][task]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mc-docs", type=int, default=50)
    p.add_argument("--gen-docs", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, model_dir = Path(tmp) / "tasks", Path(tmp) / "model"
        folder.mkdir()
        write_tasks(folder, args.mc_docs, args.gen_docs, args.gen_tokens)
        save_pretrained(GPT(GPTConfig()).eval(), model_dir)  # GPT-2 124M shape, random weights
        write_gpt2_tokenizer(model_dir, 1024, None)
        tasks = TaskManager(include_path=str(folder))
        proc, url = start_server(str(model_dir), 8)
        ways = {  # built once: the timings leave out loading the weights
            "hf (HF export)": HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8),
            "local-completions (gpt2.serve)": LocalCompletionsAPI(
                base_url=f"{url}/v1/completions", model="model", max_length=1024, num_concurrent=8
            ),
        }
        best: dict[tuple[str, str], float] = {}
        answers: dict[tuple[str, str], list] = {}
        try:
            for rep in range(args.reps):
                for way, model in ways.items():
                    for task in ("bench_mc", "bench_gen"):
                        seconds, answers[way, task] = timed(model, task, tasks)
                        best[way, task] = min(best.get((way, task), float("inf")), seconds)
                        print(f"rep {rep}: {way} {task}: {seconds:.1f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    hf, served = list(ways)
    assert answers[hf, "bench_gen"] == answers[served, "bench_gen"], "the two ways generated different text"

    def row(task: str, what: str, n: int) -> str:
        a, b = best[hf, task], best[served, task]
        return f"| {what} | {n / a:.2f} | {n / b:.2f} | {a / b:.2f}x |\n"

    table = (
        f"{report.heading('lm-evaluation-harness: HF export vs our server')}\n\n"
        f"`{report.command_line()}` on {report.machine()}, {torch.get_num_threads()} threads, lm_eval "
        f"{lm_eval.__version__}. GPT-2 124M shape, random weights, fp32; the harness's `hf` model on the HF export "
        "(batch_size=8) against its `local-completions` model through `python -m gpt2.serve` (8 rows, "
        f"num_concurrent=8); best of {args.reps}; same generations checked.\n\n"
        "| task | hf: docs/s | local-completions: docs/s | server speed-up |\n|---|---:|---:|---:|\n"
        + row("bench_mc", f"multiple choice, {args.mc_docs} docs x 4 endings (~70 tokens each)", args.mc_docs)
        + row("bench_gen", f"generate_until, {args.gen_docs} docs x {args.gen_tokens} tokens", args.gen_docs)
    )
    print("\n" + table)
    if not args.no_append:
        report.append(table)


if __name__ == "__main__":
    main()
