"""Hugging Face interop: logits parity both ways on tiny random GPT-2s, file variants, and bad inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2 import GPT, GPTConfig, hf
from gpt2.errors import UserError

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=64)


def hf_model(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A random HF GPT-2 with non-trivial LayerNorms and biases (HF inits them to 1/0, which hides bugs)."""
    torch.manual_seed(seed)
    eot = 50256 if vocab_size > 50256 else None
    config = GPT2Config(**TINY, n_positions=64, vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def our_model(vocab_size: int, bias: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, block_size=64, vocab_size=vocab_size, bias=bias)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(vocab_size: int, T: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def assert_same_logits(ours: GPT, theirs: GPT2LMHeadModel, vocab_size: int) -> None:
    idx = tokens(vocab_size)
    logits, _ = ours(idx)
    ref = theirs(idx).logits
    assert logits.shape == ref.shape == (2, idx.shape[1], vocab_size)
    assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("vocab_size", [100, 50257])
def test_load_hf_checkpoint_matches_transformers(tmp_path, vocab_size):
    theirs = hf_model(vocab_size)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_pretrained(str(tmp_path))
    assert ours.config.vocab_size == vocab_size and ours.config.padded_vocab_size % 64 == 0
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert not ours.transformer.wte.weight[vocab_size:].any()  # padded rows are zero
    assert_same_logits(ours, theirs, vocab_size)


@pytest.mark.parametrize("vocab_size,bias", [(100, True), (50257, True), (100, False)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, vocab_size, bias):
    ours = our_model(vocab_size, bias=bias)
    hf.save_pretrained(ours, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()  # tied in HF too
    assert_same_logits(ours, theirs.eval(), vocab_size)


def test_round_trip_is_exact(tmp_path):
    ours = our_model(100)
    hf.save_pretrained(ours, str(tmp_path))
    back = hf.load_pretrained(str(tmp_path))
    assert back.state_dict().keys() == ours.state_dict().keys()
    for key, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key


def test_export_writes_the_dtype_asked_for_not_the_one_the_model_runs_in(tmp_path):
    import json

    from safetensors import safe_open

    ours = our_model(100)
    reference = {k: t.clone() for k, t in ours.state_dict().items()}
    ours.to(torch.bfloat16)  # as a Sampler leaves it on a bf16 machine
    for name, dtype, hf_name in [("default", None, "float32"), ("bf16", torch.bfloat16, "bfloat16")]:
        (
            hf.save_pretrained(ours, str(tmp_path / name))
            if dtype is None
            else hf.save_pretrained(ours, str(tmp_path / name), dtype=dtype)
        )
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype or torch.float32}
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == hf_name
    back = hf.load_pretrained(str(tmp_path / "default"))
    assert torch.equal(
        back.state_dict()["transformer.h.0.mlp.c_fc.weight"],
        reference["transformer.h.0.mlp.c_fc.weight"].to(torch.bfloat16).float(),
    )


def test_pytorch_model_bin_in_hub_layout(tmp_path):
    """Hub-era checkpoints: pytorch_model.bin, keys without `transformer.`, causal-mask buffers, tied lm_head."""
    theirs = hf_model(100)
    theirs.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    for i in range(TINY["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_logits(hf.load_pretrained(tmp_path), theirs, 100)


def test_dropout_is_ours_to_choose(tmp_path):
    hf_model(100).save_pretrained(tmp_path)
    assert hf.load_pretrained(tmp_path).config.dropout == 0.0
    assert hf.load_pretrained(tmp_path, dropout=0.1).config.dropout == 0.1


# --- bad inputs ----------------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "ckpt"
    hf_model(100).save_pretrained(d)
    return d


def edit_config(d, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.e2e
def test_hub_name_offline_says_how_to_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"cannot download 'gpt2-medium' weights.*hf download") as e:
        hf.load_pretrained("gpt2-medium")
    # The command it names exists in the installed huggingface_hub and takes those arguments.
    import subprocess
    import sys
    from pathlib import Path

    command = re.search(r"`hf (download [^`]*)`", str(e.value)).group(1).replace("<dir>", "x").split()
    hf_cli = Path(sys.executable).parent / "hf"
    assert subprocess.run([str(hf_cli), *command[:1], "--help"], capture_output=True).returncode == 0


def test_unknown_name():
    with pytest.raises(UserError, match=r"unknown pretrained model 'gpt3'.*gpt2-medium"):
        hf.load_pretrained("gpt3")


def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "nope"))


def test_dir_without_config(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        hf.load_pretrained(str(hf_dir))


def test_dir_without_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors"):
        hf.load_pretrained(str(hf_dir))


def test_other_model_type(hf_dir):
    edit_config(hf_dir, model_type="llama")
    with pytest.raises(UserError, match="model_type='llama', not 'gpt2'"):
        hf.load_pretrained(str(hf_dir))


def test_unsupported_variant(hf_dir):
    edit_config(hf_dir, activation_function="relu", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="activation_function='relu'.*scale_attn_by_inverse_layer_idx"):
        hf.load_pretrained(str(hf_dir))


def test_shape_mismatch(hf_dir):
    edit_config(hf_dir, n_embd=128)
    with pytest.raises(UserError, match=r"transformer.wte.weight has shape \(100, 64\), expected \(100, 128\)"):
        hf.load_pretrained(str(hf_dir))


def test_missing_layer(hf_dir):
    edit_config(hf_dir, n_layer=3)
    with pytest.raises(UserError, match=r"missing keys \['transformer.h.2"):
        hf.load_pretrained(str(hf_dir))


def test_corrupt_weights(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read weights"):
        hf.load_pretrained(str(hf_dir))


def test_corrupt_bin(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read weights"):
        hf.load_pretrained(str(hf_dir))
