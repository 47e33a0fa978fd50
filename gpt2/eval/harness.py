"""`python -m gpt2.eval harness checkpoint=<run>|init_from=gpt2 tasks=hellaswag,arc_easy [key=value ...]`:
EleutherAI's lm-evaluation-harness on one of our models (keys: `gpt2.eval.config.HarnessConfig`).

The model runs under the harness's own `hf` model, as the run's HF export (`gpt2.export`: same weights, the
GPT-2 tokenizer, the chat template if any) written to a temporary folder, so every task scores exactly as
`lm_eval --model hf` scores the export. The harness's table is printed and its results written as JSON next to
the run. Task datasets come from Hugging Face: offline, only what the datasets cache holds can run, and a task
whose data is missing is one line naming it. Needs the `eval` extra (`pip install "lm_eval[api]"`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from gpt2 import loading
from gpt2.device import resolve_device
from gpt2.errors import UserError
from gpt2.eval.config import HarnessConfig, parse
from gpt2.export import write_gpt2_tokenizer
from gpt2.hf import save_pretrained


def main(argv: Sequence[str]) -> dict[str, Any]:
    """`python -m gpt2.eval harness key=value ...` (keys may also be written `harness.tasks=...`)."""
    return run(parse(HarnessConfig, argv, prefix="harness"))


def run(cfg: HarnessConfig) -> dict[str, Any]:
    """Run the tasks; print the table; write and return the results (the harness's `results` per task)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise UserError('the harness command needs lm-evaluation-harness: pip install "lm_eval[api]"') from None
    tasks = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.task_list if t not in tasks.all_tasks]
    if unknown:
        raise UserError(f"unknown harness task(s): {', '.join(unknown)}; `lm_eval ls tasks` lists them")
    loaded = loading.load_either(cfg.checkpoint, cfg.init_from)
    if loaded.tokenizer.name != "gpt2":
        raise UserError(f"the harness needs a GPT-2 BPE model; {loaded.description} has a {loaded.tokenizer.name} one")
    with tempfile.TemporaryDirectory(prefix="gpt2-harness-") as folder:
        save_pretrained(loaded.model, folder)
        write_gpt2_tokenizer(Path(folder), loaded.model.config.block_size, loaded.chat_template)
        device = str(resolve_device(cfg.device))
        model = HFLM(pretrained=folder, device=device, dtype=cfg.dtype, batch_size=cfg.batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=model, tasks=cfg.task_list, limit=cfg.limit, num_fewshot=cfg.num_fewshot, task_manager=tasks
            )
        except (ConnectionError, OSError) as e:
            raise UserError(
                f"a task's dataset is not in the Hugging Face datasets cache and cannot be downloaded here ({e}); "
                "run once with network access, or point HF_DATASETS_CACHE at a cache that holds it"
            ) from None
    print(make_table(results))
    out = Path(cfg.output) if cfg.output else _default_output(cfg)
    summary = {"model": loaded.description, "results": results["results"], "n-samples": results.get("n-samples")}
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"results: {out}")
    return summary


def _default_output(cfg: HarnessConfig) -> Path:
    name = f"harness_{'_'.join(cfg.task_list)}.json"
    if cfg.checkpoint:
        run_dir = Path(cfg.checkpoint)
        return (run_dir if run_dir.is_dir() else run_dir.parent) / name
    return Path(name)
