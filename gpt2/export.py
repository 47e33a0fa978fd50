"""`python -m gpt2.export checkpoint=out/run out_dir=out/run_hf` (console script `gpt2-export`).

- `format=hf`: a run as a Hugging Face GPT-2 folder that `transformers.pipeline("text-generation", model=out_dir)`
  uses as it is: config.json and model.safetensors (`gpt2.hf.save_pretrained`; a LoRA run merged onto its base)
  plus, for GPT-2 BPE runs, the tokenizer files (vocab.json and merges.txt are the BPE files the package ships).
  A char-vocabulary run has no Hugging Face tokenizer: its export holds the weights only, and says so.
- `format=peft`: a LoRA run's adapters alone in PEFT's layout (adapter_config.json, adapter_model.safetensors),
  for `peft.PeftModel.from_pretrained(<its base as a transformers GPT2LMHeadModel>, out_dir)`. Hugging Face GPT-2
  keeps these layers as Conv1D, which PEFT adapts with the same A (r, in) and B (out, r) as ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch

from gpt2.config import ExportConfig, to_object  # importing gpt2.config registers `export_schema` with Hydra
from gpt2.errors import UserError, exit_on_user_error
from gpt2.resources import CONFIG_DIR, GPT2_BPE_DIR

EOT = "<|endoftext|>"


def run(cfg: Any) -> Path:
    """Export as `cfg` (an ExportConfig or Hydra DictConfig) says; returns the folder written."""
    from gpt2.checkpoint import load_model
    from gpt2.hf import save_pretrained

    cfg = cfg if isinstance(cfg, ExportConfig) else to_object(cfg, ExportConfig)
    out = Path(cfg.out_dir)
    _check_out_dir(out, cfg.overwrite)
    if cfg.format == "peft":
        return write_peft_adapter(cfg.checkpoint, out, getattr(torch, cfg.dtype))
    model, tokenizer, _ = load_model(cfg.checkpoint, "cpu")
    save_pretrained(model, out, dtype=getattr(torch, cfg.dtype))
    if tokenizer.name == "gpt2":
        write_gpt2_tokenizer(out, model.config.block_size)
        print(f"exported {cfg.checkpoint} to {out}: transformers.pipeline(\"text-generation\", model=\"{out}\")")
    else:
        print(f"exported {cfg.checkpoint} to {out} (weights only: its {tokenizer.name} vocabulary has no Hugging "
              f"Face tokenizer; encode text with gpt2.tokenizer, as sample.py does)")  # fmt: skip
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out_dir={out} is not empty; choose another folder, or pass overwrite=true to write the "
                        "export's files over the ones there (other files are left alone)")


def write_gpt2_tokenizer(out: Path, model_max_length: int) -> None:
    """The files transformers' GPT2Tokenizer(Fast) loads from a folder: OpenAI's BPE files under HF's names."""
    shutil.copyfile(GPT2_BPE_DIR / "encoder.json", out / "vocab.json")
    shutil.copyfile(GPT2_BPE_DIR / "vocab.bpe", out / "merges.txt")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              **special}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_peft_adapter(run: str, out: Path, dtype: torch.dtype) -> Path:
    """A LoRA run's adapters in PEFT's files; UserError for a run without LoRA."""
    from safetensors.torch import save_file

    from gpt2.checkpoint import load

    ckpt = load(run)
    config = ckpt.get("config", {})
    lora = config.get("lora", {})
    if not lora.get("rank"):
        raise UserError(f"format=peft exports LoRA adapters, and {run} fine-tuned every weight (lora.rank=0); "
                        "use format=hf")  # fmt: skip
    tensors = {f"base_model.model.{name}.weight": t.to(dtype).contiguous() for name, t in ckpt["model"].items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config["init_from"],
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": lora["targets"], "fan_in_fan_out": True, "bias": "none", "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    print(f"exported the LoRA adapters of {run} to {out}: peft.PeftModel.from_pretrained(<{config['init_from']} as a "
          f"GPT2LMHeadModel>, \"{out}\")")  # fmt: skip
    return out


def main() -> None:
    """Console script `gpt2-export`: the same command as `python -m gpt2.export`."""
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")(exit_on_user_error(run))()


if __name__ == "__main__":
    main()
