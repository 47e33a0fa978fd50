"""Typed configs of `python -m gpt2.eval <command> key=value ...`: one dataclass per command.

The dataclass defaults are the only defaults. `parse(command, argv)` turns `key=value` arguments into the
dataclass: unknown keys, values of the wrong type and out-of-range values raise `UserError` naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.config import InferenceConfig, check_choice, to_object
from gpt2.errors import UserError


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/gpt2/hellaswag`, else `~/.cache/gpt2/hellaswag`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "gpt2" / "hellaswag")


@dataclass
class PerplexityConfig(InferenceConfig):
    """`python -m gpt2.eval perplexity`: mean loss, perplexity and bits per byte of a model on a text."""

    purpose: ClassVar[str] = "evaluate"
    data: Optional[str] = None
    """A prepared dataset: a folder name under `data_root`, or a path to one."""
    data_root: str = "data"
    """Directory holding the prepared datasets."""
    split: str = "val"
    """Split of the prepared dataset: train or val."""
    text: Optional[str] = None
    """Instead of `data`: a UTF-8 text file, tokenized with the model's tokenizer."""
    window: Optional[int] = None
    """Tokens of context per forward pass (default: the model's block_size)."""
    stride: Optional[int] = None
    """Tokens the window moves by; each token is scored once, with at least window - stride tokens of context
    (default: window // 2; stride = window gives non-overlapping windows, the trainer's val loss)."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_tokens: Optional[int] = None
    """Score only the first this many tokens (None: all)."""
    dtype: str = "float32"
    """float32 (the default: scores comparable with other tools'), auto (bf16 where fast), bfloat16 or float16."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.data) == bool(self.text):
            raise UserError("give exactly one of data=<prepared dataset> or text=<file> to evaluate on")
        check_choice("split", self.split, ("train", "val"))
        for key in ("window", "stride", "max_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be >= 1, got {value}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise UserError(f"stride={self.stride} is larger than window={self.window}: tokens would be skipped")


@dataclass
class HellaSwagConfig(InferenceConfig):
    """`python -m gpt2.eval hellaswag`: completion-style HellaSwag accuracy (acc, acc_norm). A checkpoint's
    tokenizer must be gpt2."""

    purpose: ClassVar[str] = "evaluate"
    path: Optional[str] = None
    """A local hellaswag_val.jsonl (default: download it once into `cache_dir`)."""
    cache_dir: str = default_cache_dir()
    """Where the downloaded validation set is kept."""
    url: str = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    """Where to download it from (a mirror, if the default is blocked)."""
    limit: Optional[int] = None
    """Score only the first this many examples (None: all 10,042)."""
    batch_size: int = 8
    """Examples per forward pass (each is 4 rows, one per ending)."""
    dtype: str = "float32"
    """float32 (the default: scores comparable with other tools'), auto (bf16 where fast), bfloat16 or float16."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")


@dataclass
class HarnessConfig(InferenceConfig):
    """`python -m gpt2.eval harness`: lm-evaluation-harness tasks on a GPT-2 BPE model."""

    purpose: ClassVar[str] = "evaluate"
    tasks: str = ""
    """Harness task names, comma-separated (hellaswag,arc_easy,...), or tasks of `include_path`."""
    include_path: Optional[str] = None
    """A folder of task YAML files of your own (the harness's `--include_path`)."""
    limit: Optional[int] = None
    """Examples per task at most (None: all)."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt (None: each task's default)."""
    batch_size: int = 8
    """Requests per forward pass."""
    dtype: str = "float32"
    """float32 (the default: scores comparable with other tools'), bfloat16 or float16."""
    output: Optional[str] = None
    """The results JSON (default: harness_<tasks>.json in the checkpoint's run folder, else in the current one)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.task_list:
            raise UserError("give the tasks to run: tasks=hellaswag,arc_easy (the harness's task names)")
        for key in ("limit", "num_fewshot"):
            value = getattr(self, key)
            if value is not None and value < (1 if key == "limit" else 0):
                raise UserError(f"{key} must be >= {1 if key == 'limit' else 0}, got {value}")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


T = TypeVar("T")


def parse(schema: type[T], argv: Sequence[str], prefix: str = "") -> T:
    """`key=value` arguments -> a validated `schema` instance.

    A leading `prefix.` on a key is dropped (so `hellaswag.path=...` means `path=...` for the hellaswag command).
    Unknown keys and malformed arguments raise UserError listing the valid keys.
    """
    names = [f.name for f in fields(schema)]  # type: ignore[arg-type]
    dotlist = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"argument {arg!r} is not key=value; valid keys: {', '.join(names)}")
        if prefix and key.startswith(prefix + "."):
            key = key[len(prefix) + 1 :]
        if key not in names:
            raise UserError(f"unknown key {key!r}; valid keys: {', '.join(names)}")
        dotlist.append(f"{key}={value}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as e:  # a value of the wrong type: name the key
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"bad value for {key}: {str(e).splitlines()[0]}") from None
    return to_object(cfg, schema)  # type: ignore[arg-type]
