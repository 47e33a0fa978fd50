"""`python -m gpt2.export checkpoint=out/run out_dir=out/run_hf` (console script `gpt2-export`).

- `format=hf`: a run as a Hugging Face GPT-2 folder that `transformers.pipeline("text-generation", model=out_dir)`
  uses as it is: config.json and model.safetensors (`gpt2.hf.save_pretrained`; a LoRA run merged onto its base)
  plus, for GPT-2 BPE runs, the tokenizer files (vocab.json and merges.txt are the BPE files the package ships;
  tokenizer_config.json carries a chat run's `chat_template`).
  A char-vocabulary run has no Hugging Face tokenizer: its export holds the weights only, and says so.
- `format=peft`: a LoRA run's adapters alone in PEFT's layout (adapter_config.json, adapter_model.safetensors),
  for `peft.PeftModel.from_pretrained(<its base as a transformers GPT2LMHeadModel>, out_dir)`. Hugging Face GPT-2
  keeps these layers as Conv1D, which PEFT adapts with the same A (r, in) and B (out, r) as ours.
- `format=gguf`: `out_dir/model.gguf` for llama.cpp (`llama-cli -m`, llama-cpp-python, Ollama), written with
  the `gguf` package in llama.cpp's `gpt2` layout (its convert_hf_to_gguf.py's tensor names, the GPT-2 BPE
  vocabulary and merges, end-of-text as BOS/EOS, a chat run's template as `tokenizer.chat_template`; a LoRA run
  merged). `dtype=float16` halves the file (1-D tensors stay fp32, as llama.cpp's converter does); `float32`
  reproduces our greedy tokens exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch

from gpt2 import checkpoint, loading
from gpt2.config import ExportConfig, to_object  # importing gpt2.config registers `export_schema` with Hydra
from gpt2.errors import UserError, exit_on_user_error
from gpt2.hf import CONV1D, save_pretrained, state_dict_to_hf
from gpt2.resources import CONFIG_DIR, GPT2_BPE_DIR
from gpt2.tokenizer import GPT2_EOT_TEXT


def run(cfg: Any) -> Path:
    """Export as `cfg` (an ExportConfig or Hydra DictConfig) says; returns the folder written."""
    cfg = cfg if isinstance(cfg, ExportConfig) else to_object(cfg, ExportConfig)
    out = Path(cfg.out_dir)
    _check_out_dir(out, cfg.overwrite)
    if cfg.format == "peft":
        return write_peft_adapter(cfg.checkpoint, out, getattr(torch, cfg.dtype))
    loaded = loading.load_checkpoint(cfg.checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.format == "gguf":
        name = Path(cfg.checkpoint).stem
        return write_gguf(model, tokenizer, out, getattr(torch, cfg.dtype), name, loaded.chat_template)
    save_pretrained(model, out, dtype=getattr(torch, cfg.dtype))
    if tokenizer.name == "gpt2":
        write_gpt2_tokenizer(out, model.config.block_size, loaded.chat_template)
        print(f'exported {cfg.checkpoint} to {out}: transformers.pipeline("text-generation", model="{out}")')
    else:
        print(
            f"exported {cfg.checkpoint} to {out} (weights only: its {tokenizer.name} vocabulary has no Hugging "
            f"Face tokenizer; encode text with gpt2.tokenizer, as sample.py does)"
        )
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"out_dir={out} is not empty; choose another folder, or pass overwrite=true to write the "
            "export's files over the ones there (other files are left alone)"
        )


def write_gpt2_tokenizer(out: Path, model_max_length: int, chat_template: str | None = None) -> None:
    """The files transformers' GPT2Tokenizer(Fast) loads from a folder: OpenAI's BPE files under HF's names, and
    the run's chat template, if it has one (then `tokenizer.apply_chat_template` renders as the run trained)."""
    shutil.copyfile(GPT2_BPE_DIR / "encoder.json", out / "vocab.json")
    shutil.copyfile(GPT2_BPE_DIR / "vocab.bpe", out / "merges.txt")
    special = {"bos_token": GPT2_EOT_TEXT, "eos_token": GPT2_EOT_TEXT, "unk_token": GPT2_EOT_TEXT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        **special,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_peft_adapter(run: str, out: Path, dtype: torch.dtype) -> Path:
    """A LoRA run's adapters in PEFT's files; UserError for a run without LoRA."""
    from safetensors.torch import save_file

    ckpt = checkpoint.load(run, optimizer=False)
    config = ckpt.get("config", {})
    lora = config.get("lora", {})
    if not lora.get("rank"):
        raise UserError(
            f"format=peft exports LoRA adapters, and {run} fine-tuned every weight (lora.rank=0); use format=hf"
        )
    tensors = {f"base_model.model.{name}.weight": t.to(dtype).contiguous() for name, t in ckpt["model"].items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config["init_from"],
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": lora["targets"],
        "fan_in_fan_out": True,
        "bias": "none",
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    print(
        f"exported the LoRA adapters of {run} to {out}: peft.PeftModel.from_pretrained(<{config['init_from']} as a "
        f'GPT2LMHeadModel>, "{out}")'
    )
    return out


# HF GPT-2 key (as `gpt2.hf.state_dict_to_hf` writes it) -> llama.cpp's gpt2 tensor name.
GGUF_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}


def gguf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's gpt2 names, as (out, in) matrices, the vocabulary unpadded; the
    tied head is written as `output.weight` too, as llama.cpp's converter does."""
    out = {}
    for key, t in state_dict_to_hf(model).items():
        if key.startswith("transformer.h."):
            layer, rest = key.removeprefix("transformer.h.").split(".", 1)
            name = f"blk.{layer}.{GGUF_NAMES[rest]}"
        else:
            name = GGUF_NAMES[key]
        out[name] = t.t().contiguous() if key.endswith(CONV1D) else t
    out["output.weight"] = out["token_embd.weight"]
    return out


def write_gguf(
    model: Any, tokenizer: Any, out: Path, dtype: torch.dtype, name: str, chat_template: str | None = None
) -> Path:
    """`out/model.gguf`: the model in llama.cpp's gpt2 architecture with the GPT-2 BPE tokenizer (and the run's
    chat template as `tokenizer.chat_template`, if it has one)."""
    try:
        import gguf
    except ImportError:
        raise UserError("format=gguf needs the gguf package: pip install gguf") from None
    if tokenizer.name != "gpt2":
        raise UserError(
            f"format=gguf needs a GPT-2 BPE model: this run's {tokenizer.name} vocabulary has no "
            "llama.cpp tokenizer; use format=hf"
        )
    if dtype == torch.bfloat16:
        raise UserError("format=gguf writes dtype=float32 or float16; llama.cpp's bf16 support varies by build")
    config = model.config
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.gguf"
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(1e-5)
    half = dtype == torch.float16
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    _add_gpt2_vocab(writer, gguf)
    if chat_template:
        writer.add_chat_template(chat_template)
    for tensor_name, t in gguf_tensors(model).items():
        writer.add_tensor(tensor_name, t.to(torch.float16 if half and t.dim() == 2 else torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    print(f'exported to {path}: llama-cli -m {path} -p "...", or llama_cpp.Llama(model_path="{path}")')
    return path


def _add_gpt2_vocab(writer: Any, gguf: Any) -> None:
    """OpenAI's BPE files as llama.cpp's `gpt2` tokenizer: tokens by id, merges, end-of-text as BOS and EOS."""
    encoder = json.loads((GPT2_BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.get)
    assert [encoder[t] for t in tokens] == list(range(len(tokens)))
    merges = [line for line in (GPT2_BPE_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    types = [gguf.TokenType.CONTROL if t == GPT2_EOT_TEXT else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(encoder[GPT2_EOT_TEXT])
    writer.add_eos_token_id(encoder[GPT2_EOT_TEXT])
    writer.add_add_bos_token(False)


def main() -> None:
    """Console script `gpt2-export`: the same command as `python -m gpt2.export`."""
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")(exit_on_user_error(run))()


if __name__ == "__main__":
    main()
