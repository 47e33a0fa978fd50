"""Hugging Face GPT-2 interop: load OpenAI's released weights, export our models to the HF layout.

The mapping is declarative: `HF_TO_OURS` maps every `GPT2LMHeadModel` state-dict key to ours (our module names
are HF's, so it is the identity on names), and `CONV1D` names the weights HF stores transposed (its `Conv1D`
is a Linear whose weight is (in, out)). Export inverts the same map. Every tensor copied is shape-checked and
the key sets must match exactly, so a checkpoint of another architecture fails loudly instead of half-loading.

Layout conventions handled here, so that nothing else has to know them:
- Hub checkpoints (`openai-community/gpt2*`) store keys without the `transformer.` prefix and carry the old
  causal-mask buffers `h.N.attn.bias` / `h.N.attn.masked_bias`; both are normalised away.
- HF's vocabulary is the real one (50257 rows); ours is padded to a multiple of 64 with zero rows.
- `lm_head.weight` is tied to `wte`: it is not written on export, and on import it must equal `wte` if present.
- Biases: HF GPT-2 always has them. Our `bias=False` models export zero biases, which computes exactly the
  same function; importing always gives a `bias=True` model.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import torch

from gpt2.errors import UserError
from gpt2.model import GPT, RELEASED, GPTConfig

HUB_REPOS = {name: f"openai-community/{name}" for name in RELEASED}

# HF GPT2LMHeadModel key -> our key; "{i}" stands for the layer index.
HF_TO_OURS: dict[str, str] = {
    "transformer.wte.weight": "transformer.wte.weight",
    "transformer.wpe.weight": "transformer.wpe.weight",
    "transformer.h.{i}.ln_1.weight": "transformer.h.{i}.ln_1.weight",
    "transformer.h.{i}.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    "transformer.h.{i}.attn.c_attn.weight": "transformer.h.{i}.attn.c_attn.weight",
    "transformer.h.{i}.attn.c_attn.bias": "transformer.h.{i}.attn.c_attn.bias",
    "transformer.h.{i}.attn.c_proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "transformer.h.{i}.attn.c_proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "transformer.h.{i}.ln_2.weight": "transformer.h.{i}.ln_2.weight",
    "transformer.h.{i}.ln_2.bias": "transformer.h.{i}.ln_2.bias",
    "transformer.h.{i}.mlp.c_fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "transformer.h.{i}.mlp.c_fc.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "transformer.h.{i}.mlp.c_proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "transformer.h.{i}.mlp.c_proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
}
OURS_TO_HF: dict[str, str] = {ours: hf for hf, ours in HF_TO_OURS.items()}

# HF's Conv1D keeps weights as (in, out); nn.Linear as (out, in). These are transposed both ways.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Buffers (not parameters) that old HF checkpoints carry: the causal mask, rebuilt by every implementation.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_TIED = "lm_head.weight"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _expand(key_map: dict[str, str], n_layer: int) -> dict[str, str]:
    """Instantiate the "{i}" templates of `key_map` for layers 0..n_layer-1."""
    out = {}
    for src, dst in key_map.items():
        layers = range(n_layer) if "{i}" in src else [None]
        for i in layers:
            out[src.format(i=i)] = dst.format(i=i)
    return out


# --- configs -------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig from an HF GPT-2 config.json dict; raises UserError for variants we do not implement."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"config.json has model_type={hf.get('model_type')!r}, not 'gpt2'; only GPT-2 is supported")
    problems = []
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={hf['n_inner']} (GPT-2 uses 4*n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf['activation_function']!r} (GPT-2 uses gelu_new)")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (GPT-2 uses 1e-5)")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if hf.get(key, want) != want:
            problems.append(f"{key}={hf[key]} (GPT-2 uses {want})")
    if problems:
        raise UserError(f"unsupported GPT-2 variant in config.json: {'; '.join(problems)}")
    return GPTConfig(
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        dropout=dropout,
        bias=True,
    )


def config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict of a `GPT2LMHeadModel` that computes the same function as a GPT of `config`."""
    has_eot = config.vocab_size > 50256  # the GPT-2 vocabulary; char vocabularies have no end-of-text token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 50256 if has_eot else None,
        "eos_token_id": 50256 if has_eot else None,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --- state dicts ---------------------------------------------------------------------------------------------


def _normalise_hf_keys(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Add the `transformer.` prefix hub checkpoints lack, drop mask buffers and the tied LM head."""
    out = {}
    for key, t in sd.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = t
    head = out.pop(_TIED, None)
    wte = out.get("transformer.wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise UserError(f"{source}: lm_head.weight differs from transformer.wte.weight; GPT-2 ties them")
    return out


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """An HF GPT-2 state dict -> ours for a GPT of `config` (bias=True): keys renamed, Conv1D weights
    transposed, vocab padded with zero rows, fp32, `lm_head.weight` tied to `wte`. Raises UserError on any
    missing/unexpected key or shape mismatch, naming `source`."""
    hf_sd = _normalise_hf_keys(hf_sd, source)
    key_map = _expand(HF_TO_OURS, config.n_layer)
    missing, unexpected = sorted(set(key_map) - set(hf_sd)), sorted(set(hf_sd) - set(key_map))
    if missing or unexpected:
        raise UserError(
            f"{source} is not a GPT-2 checkpoint matching its config.json (n_layer={config.n_layer}): "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.device("meta"):
        expected = {k: t.shape for k, t in GPT(config).state_dict().items()}
    V, Vp = config.vocab_size, config.padded_vocab_size
    out = {}
    for hf_key, our_key in key_map.items():
        hf_t = hf_sd.pop(hf_key)  # each HF tensor is freed once converted: the peak is one model, not two
        t = hf_t.to(torch.float32)
        if hf_key.endswith(CONV1D):
            t = t.t()
        want = expected[our_key]
        if our_key == "transformer.wte.weight":
            want = torch.Size((V, want[1]))  # HF's vocab is unpadded
        if t.shape != want:
            raise UserError(
                f"{source}: {hf_key} has shape {tuple(hf_t.shape)}, expected {tuple(want)} "
                f"{'(transposed) ' if hf_key.endswith(CONV1D) else ''}for the sizes in its config.json"
            )
        if our_key == "transformer.wte.weight":
            t = torch.cat([t, t.new_zeros(Vp - V, t.shape[1])])  # (Vp, C): padded rows are zero
        out[our_key] = t.contiguous()
    out[_TIED] = out["transformer.wte.weight"]
    return out


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our model's weights in `GPT2LMHeadModel` layout (without the tied `lm_head.weight`): Conv1D weights
    transposed, vocab unpadded, zero biases where the model has none. Tensors are fresh, contiguous copies."""
    config = model.config
    sd = model.state_dict()
    with torch.device("meta"):  # shapes of the same model with biases, for the zero biases of bias=False
        shapes = {k: t.shape for k, t in GPT(replace(config, bias=True)).state_dict().items()}
    out = {}
    for our_key, hf_key in _expand(OURS_TO_HF, config.n_layer).items():
        if our_key in sd:
            t = sd[our_key].detach()
        else:
            assert not config.bias and our_key.endswith(".bias"), our_key
            t = torch.zeros(shapes[our_key], dtype=sd["transformer.wte.weight"].dtype)
        assert t.shape == shapes[our_key], (our_key, t.shape, shapes[our_key])
        if our_key == "transformer.wte.weight":
            t = t[: config.vocab_size]  # (V, C): drop the padded rows
        if hf_key.endswith(CONV1D):
            t = t.t()
        out[hf_key] = t.to("cpu").contiguous().clone()
    return out


# --- files ---------------------------------------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a model.safetensors, a sharded model.safetensors.index.json, or a pytorch_model.bin."""
    from safetensors import SafetensorError

    try:
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return {k: t for shard in shards for k, t in _load_safetensors(path.parent / shard).items()}
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read weights {path}: {type(e).__name__}: {e}") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, each copied out of its own short-lived mapping of the file: with one
    mapping for the whole load (`load_file`), every page read stays resident until the end, so loading peaked at
    twice the model (12 GB for gpt2-xl) instead of once."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        names = list(f.keys())
    out = {}
    for name in names:
        with safe_open(path, "pt") as f:
            out[name] = f.get_tensor(name).clone()
    return out


def _download(name: str) -> Path:
    """Fetch config.json + model.safetensors of a hub GPT-2 into the HF cache; returns their directory."""
    from huggingface_hub import hf_hub_download

    repo = HUB_REPOS.get(name, name)
    try:
        for filename in ("config.json", "model.safetensors"):
            path = hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # offline mode, no network, proxy errors: all mean "not here, cannot fetch"
        raise UserError(
            f"cannot download {name!r} weights (offline? {type(e).__name__}): download them where there is a "
            f"network with `hf download {repo} config.json model.safetensors "
            f"--local-dir <dir>` and pass that directory instead of {name!r}"
        ) from None
    return Path(path).parent


def _resolve(name_or_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(config.json, weights file) of a hub name or a local HF-layout directory."""
    name = str(name_or_dir)
    path = Path(name).expanduser()
    # A bare hub name always means the hub (the repo root holds a `gpt2/` package dir); write ./gpt2 for a folder.
    if name in HUB_REPOS or name in HUB_REPOS.values():
        path = _download(name)
    elif not path.exists():
        if "/" in name or name.startswith("."):
            raise UserError(f"{name} does not exist; pass a directory with config.json and model.safetensors")
        else:
            raise UserError(
                f"unknown pretrained model {name!r}; use one of {', '.join(HUB_REPOS)} or a local directory "
                "in Hugging Face layout (config.json + model.safetensors or pytorch_model.bin)"
            )
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a Hugging Face GPT-2 directory (config.json + weights)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} has no config.json; it is not a Hugging Face GPT-2 checkpoint directory")
    for filename in _WEIGHT_FILES:
        if (path / filename).is_file():
            return config_path, path / filename
    raise UserError(f"{path} has no {' or '.join(_WEIGHT_FILES)}; it is not a Hugging Face checkpoint directory")


def load_pretrained(name_or_dir: str | os.PathLike, dropout: float = 0.0) -> GPT:
    """A GPT with Hugging Face GPT-2 weights, in fp32 on the CPU, in eval mode.

    `name_or_dir`: a hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`; downloaded once into the HF cache,
    or read from it offline; a bare hub name never means a local folder, write `./gpt2` for that) or a local
    directory holding config.json and model.safetensors (or a sharded model.safetensors.index.json, or
    pytorch_model.bin). `dropout` is ours to choose (HF configs say 0.1; 0 is the
    usual choice for fine-tuning). Raises UserError for an unknown name, a missing download, or a directory that
    is not a GPT-2 checkpoint (other model_type, missing files, keys or shapes that do not match).
    """
    config_path, weights_path = _resolve(name_or_dir)
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from e
    config = config_from_hf(hf_config, dropout=dropout)
    sd = state_dict_from_hf(_read_weights(weights_path), config, source=str(weights_path))
    return GPT.from_state_dict(config, sd).eval()  # keys and shapes were checked by state_dict_from_hf


def save_pretrained(model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    """Write `model` as a Hugging Face GPT-2 checkpoint: `out_dir`/config.json + model.safetensors, with weights
    in `dtype` (fp32 unless asked otherwise, whatever dtype the model runs in: a bf16 sampler exports fp32).

    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it with no missing or unexpected keys and
    computes the same logits (over the real vocabulary). The tied LM head is stored once, as `wte`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: t.to(dtype) for k, t in state_dict_to_hf(model).items()}
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config_to_hf(model.config, dtype=hf_sd["transformer.wte.weight"].dtype)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
