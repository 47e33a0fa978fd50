"""HellaSwag (Zellers et al., 2019), scored completion-style as OpenAI's GPT-2 results and build-nanogpt do.

Each example is a context and 4 candidate endings, one of them right. The model reads the context followed by
`" " + ending` and we sum the cross-entropy of the ending's tokens only (the context is given, not scored):
- `acc`: the predicted ending is the one with the lowest summed loss;
- `acc_norm`: the one with the lowest mean loss per ending token (length-normalised; the headline number).
Published references for GPT-2 124M: acc_norm 0.2955 by this method (build-nanogpt), 0.3114 by the Eleuther
lm-evaluation-harness (which normalises by characters and formats the context slightly differently).

The validation set (10,042 examples) is downloaded once from its public location into a cache directory
(atomically: a temp file renamed into place), or read from a local file in the same jsonl schema.

In training: `examples_for_training(...)` once, then `training_metrics(model, tokenizer, examples, device, dtype, rank,
world_size)` on every rank: each rank scores `examples[rank::world_size]` (`evaluate`), the counts are summed
over ranks (`all_reduce`), and the result comes back under the metrics.jsonl keys `hellaswag_acc` and
`hellaswag_acc_norm`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from gpt2 import distributed, files, loading
from gpt2.config import EvalConfig
from gpt2.device import autocast, resolve_device, resolve_dtype
from gpt2.distributed import DistInfo
from gpt2.errors import UserError, exit_on_user_error
from gpt2.eval.config import HellaSwagConfig, default_cache_dir, parse
from gpt2.model import GPT
from gpt2.progress import progress_bar

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"
NUM_VAL = 10_042
REFERENCE = "GPT-2 124M: acc_norm 0.2955 by this method, 0.3114 by the Eleuther harness"


@dataclass
class Example:
    ctx: str
    """The context the endings continue."""
    endings: list[str]
    label: int
    """Index of the right ending."""


# --- data ----------------------------------------------------------------------------------------------------


def download(url: str, dest: Path) -> Path:
    """Fetch `url` into `dest` atomically (`gpt2.files.download`), failing with one line that says what to do."""
    try:
        return files.download(url, dest)
    except (OSError, ValueError) as e:  # no network, DNS, HTTP errors, bad URL
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot download HellaSwag from {url} ({reason}); download {FILENAME} where there is a network and "
            f"put it at {dest}, or pass path=<local jsonl>"
        ) from None


def _parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (HellaSwag lines have ctx, endings, label)")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str):
        raise UserError(f"{where}: ctx must be a string")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: endings must be a list of at least 2 strings")
    if isinstance(label, str) and label.strip().isdigit():  # the Hugging Face copy stores "0".."3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f"{where}: label must be an integer index into endings (0..{len(endings) - 1})")
    return Example(ctx=ctx, endings=endings, label=label)


def read_examples(path: str | Path, limit: Optional[int] = None) -> list[Example]:
    """Examples of a HellaSwag jsonl file (blank lines skipped); a malformed line -> UserError with file:line."""
    path = Path(path)
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(_parse_line(line, f"{path}:{lineno}"))
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist; pass path=<hellaswag_val.jsonl>") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass HellaSwag's hellaswag_val.jsonl") from None
    if not examples:
        raise UserError(f"{path} holds no examples; pass HellaSwag's hellaswag_val.jsonl")
    return examples


def load_examples(
    path: Optional[str | Path] = None,
    limit: Optional[int] = None,
    cache_dir: Optional[str | Path] = None,
    url: str = URL,
) -> list[Example]:
    """The HellaSwag validation examples: from `path`, else from `cache_dir`/hellaswag_val.jsonl, downloading
    it from `url` on first use (default cache: ~/.cache/gpt2/hellaswag). `limit` keeps the first N."""
    if path is None:
        cached = Path(cache_dir or default_cache_dir()).expanduser() / FILENAME
        path = cached if cached.exists() else download(url, cached)
    return read_examples(path, limit)


# --- scoring -------------------------------------------------------------------------------------------------


def check_tokenizer(tokenizer: Any) -> None:
    """HellaSwag is English text scored with GPT-2's BPE; a char vocabulary cannot encode it."""
    if tokenizer.name != "gpt2":
        raise UserError(
            f"HellaSwag needs a model with the gpt2 tokenizer; this one uses a {tokenizer.name} vocabulary "
            "(train on data prepared with data.tokenizer=gpt2, or use init_from=gpt2)"
        )


def _rows(example: Example, tokenizer: Any, max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, n_ending) per ending: context + " " + ending, cut from the left to `max_len` tokens."""
    ctx = tokenizer.encode(example.ctx) or [tokenizer.eot_id]  # the first ending token needs some context
    rows = []
    for ending in example.endings:
        end = tokenizer.encode(" " + ending)  # the space belongs to the ending, as GPT-2's BPE merges it
        row = (ctx + end)[-max_len:]
        rows.append((row, min(len(end), len(row) - 1)))
    return rows


@torch.no_grad()
def ending_losses(
    model: GPT, rows: list[tuple[list[int], int]], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, mean loss) of each row's last `n_ending` tokens, rows padded to one batch (R rows).

    Right padding never changes the scored positions (attention is causal); padded targets are ignored.
    """
    T = max(len(r) for r, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)  # (R, T) inputs
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # (R, T) targets, -1 = not scored
    for i, (row, n_end) in enumerate(rows):
        x[i, : len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(row) - 1 - n_end : len(row) - 1] = torch.tensor(row[-n_end:])
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast(device, dtype):
        logits, _ = model(x)  # (R, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    nll = nll.view(len(rows), T)  # (R, T), 0 where not scored
    total = nll.sum(dim=1)
    return total, total / (y != -1).sum(dim=1)


def _result(correct: int, correct_norm: int, n: int) -> dict[str, float | int]:
    return {
        "acc": correct / n if n else 0.0,
        "acc_norm": correct_norm / n if n else 0.0,
        "correct": correct,
        "correct_norm": correct_norm,
        "n": n,
    }


@torch.no_grad()
def evaluate(
    model: GPT,
    tokenizer: Any,
    examples: Sequence[Example],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float | int]:
    """Score `examples[rank::world_size]`: {"acc", "acc_norm", "correct", "correct_norm", "n"} of this rank.

    `acc`/`acc_norm` are this rank's fractions; with several ranks, `all_reduce` the result to get the global
    ones. `batch_size` examples (4 rows each) share one forward pass. Every rank runs the same number of forward
    passes (a rank with fewer examples scores a throw-away batch), since FSDP's forward is a collective.
    Restores the model's train/eval mode.
    """
    check_tokenizer(tokenizer)
    device = torch.device(device)
    mine = list(examples[rank::world_size])
    per_rank = -(-len(examples) // world_size)  # the most any rank gets
    num_batches = -(-per_rank // batch_size)
    max_len = model.config.block_size + 1  # inputs are row[:-1]
    was_training = model.training
    model.eval()
    correct = correct_norm = done = 0
    bar = progress_bar(total=len(mine), unit="ex", desc="hellaswag", disable=not progress, dynamic_ncols=True)
    for b in range(num_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        if not chunk:  # keep step with the other ranks' forward passes; the result is discarded
            ending_losses(model, _rows(examples[0], tokenizer, max_len), device, dtype)
            continue
        rows = [r for ex in chunk for r in _rows(ex, tokenizer, max_len)]
        total, mean = ending_losses(model, rows, device, dtype)
        i = 0
        for ex in chunk:
            k = len(ex.endings)
            correct += int(total[i : i + k].argmin().item() == ex.label)
            correct_norm += int(mean[i : i + k].argmin().item() == ex.label)
            i += k
        done += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(acc_norm=f"{correct_norm / done:.4f}", refresh=False)
    bar.close()
    model.train(was_training)
    return _result(correct, correct_norm, len(mine))


def all_reduce(result: dict[str, float | int], device: torch.device | str) -> dict[str, float | int]:
    """Sum the counts of every rank's `evaluate` result (a no-op without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return result
    counts = torch.tensor([result["correct"], result["correct_norm"], result["n"]], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return _result(*(int(c) for c in counts.tolist()))


def examples_for_training(cfg: EvalConfig, tokenizer: Any, info: DistInfo) -> list[Example]:
    """The examples in-training HellaSwag scores (`eval.hellaswag_*`): checked before training starts, and
    downloaded once while the other ranks wait: by rank 0, then by the first rank of each node whose cache that
    did not fill (a cache in a node-local home directory), never by every rank of a node at once."""
    check_tokenizer(tokenizer)
    for downloads in (info.is_main, info.local_rank == 0 and not info.is_main):
        if downloads:
            load_examples(cfg.hellaswag_path, cfg.hellaswag_limit)
        distributed.barrier()
    return load_examples(cfg.hellaswag_path, cfg.hellaswag_limit)


def training_metrics(
    model: GPT,
    tokenizer: Any,
    examples: Sequence[Example],
    device: torch.device | str,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
) -> dict[str, float]:
    """For the trainer: `evaluate` on every rank, `all_reduce`, and the metrics.jsonl keys that `gpt2.plot`
    reads: {"hellaswag_acc", "hellaswag_acc_norm"} (the same on every rank)."""
    result = all_reduce(
        evaluate(model, tokenizer, examples, device, dtype, rank, world_size, batch_size=batch_size), device
    )
    return {"hellaswag_acc": float(result["acc"]), "hellaswag_acc_norm": float(result["acc_norm"])}


# --- command -------------------------------------------------------------------------------------------------


def run(cfg: HellaSwagConfig) -> dict[str, float | int]:
    """The `hellaswag` command: load the model and the examples, score them, print and return the result."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    examples = load_examples(cfg.path, cfg.limit, cfg.cache_dir, cfg.url)  # before the (slower) model load
    loaded = loading.load_either(cfg.checkpoint, cfg.init_from, device)
    model, tokenizer, what = loaded.model, loaded.tokenizer, loaded.description
    check_tokenizer(tokenizer)
    print(f"hellaswag: {what}, {len(examples):,} examples, {dtype}")
    result = evaluate(model, tokenizer, examples, device, dtype, batch_size=cfg.batch_size, progress=True)
    print(
        f"hellaswag: {result['n']:,} examples | acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} "
        f"(reference {REFERENCE})",
        flush=True,
    )
    return result


@exit_on_user_error
def main(argv: Sequence[str]) -> dict[str, float | int]:
    """`python -m gpt2.eval hellaswag key=value ...` (keys may also be written `hellaswag.path=...`)."""
    return run(parse(HellaSwagConfig, argv, prefix="hellaswag"))
