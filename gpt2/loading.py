"""Where a model comes from: the one place that turns a name or a path into a model and its tokenizer.

A source is one of
- one of our checkpoints: a run's out_dir or a .pt file, with its model config and tokenizer inside. A LoRA run's
  checkpoint holds its adapters only: they are applied to the run's base (its `init_from`, which must be at hand)
  and merged, so the model is a plain GPT either way;
- OpenAI's GPT-2 weights by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face-layout folder
  (config.json + weights), with GPT-2's BPE tokenizer.

`load(source)` is what sampling, serving, evaluation, export and a fine-tuning run's `init_from` call;
`load_either(checkpoint, init_from)` reads the `checkpoint=` / `init_from=` pair of the sampling, serving and
evaluation configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2 import checkpoint, hf
from gpt2.errors import UserError
from gpt2.lora import apply_lora, merge_lora
from gpt2.model import GPT, RELEASED, GPTConfig
from gpt2.tokenizer import GPT2Tokenizer, Tokenizer
from gpt2.tokenizer import from_dict as tokenizer_from_dict


@dataclass
class Loaded:
    """A model in eval mode on the device asked for, and what goes with it."""

    model: GPT
    tokenizer: Tokenizer
    description: str
    """What was loaded, for messages: `checkpoint out/run` or `gpt2 (Hugging Face GPT-2 weights)`."""
    run_config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the run that wrote the checkpoint; empty for Hugging Face weights."""
    chat_template: str | None = None
    """The chat template (Jinja, gpt2.chat) the model was fine-tuned with: a checkpoint's, or a Hugging Face
    folder's tokenizer_config.json `chat_template`; None for a model never tuned on chats."""


def load(source: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A checkpoint, a pretrained name or a Hugging Face-layout folder -> `Loaded` (see the module docstring).
    Its callers take `source` from an `init_from=` key, which the errors name."""
    source = str(source)
    path = Path(source)
    if source in RELEASED or (path.is_dir() and (path / "config.json").exists()):
        return load_hf(source, device)
    if not path.exists() and not source.endswith(".pt"):
        raise UserError(
            f"init_from={source!r} is neither scratch, a pretrained name ({', '.join(RELEASED)}), a Hugging "
            "Face-layout directory nor a checkpoint; fix the name or the path"
        )
    return load_checkpoint(source, device)


def load_either(checkpoint_path: str | None, init_from: str | None, device: str | torch.device = "cpu") -> Loaded:
    """The model of a config's `checkpoint=` (one of our runs) or, without one, its `init_from=` (Hugging Face
    weights). Configs check that exactly one is given."""
    if checkpoint_path:
        return load_checkpoint(checkpoint_path, device)
    assert init_from, "configs require checkpoint or init_from"
    return load_hf(init_from, device)


def load_hf(name_or_dir: str, device: str | torch.device = "cpu") -> Loaded:
    """OpenAI's GPT-2 weights by name, or a Hugging Face-layout folder, with GPT-2's BPE tokenizer."""
    model = hf.load_pretrained(name_or_dir)
    description = f"{name_or_dir} (Hugging Face GPT-2 weights)"
    return Loaded(model.to(device).eval(), GPT2Tokenizer(), description, chat_template=_hf_chat_template(name_or_dir))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """One of our checkpoints (a run's out_dir or a .pt file); a LoRA run's comes merged onto its base."""
    ckpt = checkpoint.load(path, optimizer=False)  # (a sharded run: its optimizer moments are not read)
    config = ckpt.get("config", {})
    model = _merged_lora_model(ckpt, config) if config.get("lora", {}).get("rank") else model_from_state(ckpt)
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    return Loaded(model.to(device).eval(), tokenizer, f"checkpoint {path}", config, ckpt.get("chat_template"))


def _hf_chat_template(name_or_dir: str) -> str | None:
    """A Hugging Face folder's chat template (tokenizer_config.json), if it has one (an export of a chat run)."""
    config = Path(name_or_dir) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config} is not a JSON object ({e}); restore it from the export") from None
    return template if isinstance(template, str) else None


def model_from_state(ckpt: dict[str, Any]) -> GPT:
    """Build the GPT a checkpoint describes and assign its weights (meta-device build, no double init)."""
    try:
        return GPT.from_state_dict(GPTConfig(**ckpt["model_config"]), ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model_config: {str(e).splitlines()[0]}") from None


def _merged_lora_model(ckpt: dict[str, Any], config: dict[str, Any]) -> GPT:
    lora, init_from = config["lora"], config["init_from"]
    try:
        model = load(init_from).model
    except UserError as e:
        raise UserError(
            f"this LoRA run's base model, init_from={init_from}, cannot be loaded ({e}); put it back where the run "
            "found it"
        ) from None
    model.crop_block_size(ckpt["model_config"]["block_size"])
    apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise UserError(f"the LoRA adapters in this checkpoint do not fit init_from={init_from}")
    return merge_lora(model)
