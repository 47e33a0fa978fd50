"""LoRA: an adapted layer equals its merged weights, training touches only the adapters, a LoRA run's checkpoint
holds only them (and resumes exactly), and sample.py / export take the run directly (merged onto its base)."""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import TINY, assert_same_weights, interrupt, tiny_gpt, train
from omegaconf import OmegaConf

from gpt2.errors import UserError
from gpt2.lora import LoRALinear, adapter_names, apply_lora, merge_lora

LORA = ["lora.rank=4", "lora.alpha=8", "train.eval_interval=10", "model.dropout=0.0", "optim.lr=1e-2"]


def test_adapted_model_equals_its_merged_weights():
    model = tiny_gpt(vocab_size=50).eval()
    idx = torch.randint(0, 50, (2, 16))
    base = model(idx)[0]
    adapted = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["c_attn", "mlp.c_proj"])
    assert adapted == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    torch.testing.assert_close(model(idx)[0], base)  # B = 0: the adapted model starts as its base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(model) and len(trainable) == 8
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    adapted_logits = model(idx)[0]
    assert not torch.allclose(adapted_logits, base, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(idx)[0], adapted_logits, atol=1e-4, rtol=1e-4)
    assert set(model.state_dict()) == set(tiny_gpt(vocab_size=50).eval().state_dict())


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(UserError, match="lora.targets: 'q_proj' matches no Linear layer"):
        apply_lora(tiny_gpt(vocab_size=50).eval(), rank=4, alpha=8, dropout=0.0, targets=["q_proj"])


@pytest.fixture(scope="module")
def base_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_base") / "base"
    train(
        [f"data.name={char_data}", f"out_dir={out}", *TINY, "train.max_iters=30", "train.eval_interval=30"], out.parent
    )
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_lora_run_trains_adapters_only_resumes_exactly_and_samples_merged(char_data, base_run, tmp_path):
    from gpt2.export import run as export
    from gpt2.loading import load_checkpoint

    def args(out):
        return [
            f"data.name={char_data}",
            f"out_dir={out}",
            f"init_from={base_run}",
            *TINY,
            *LORA,  # noqa: E731
            "train.max_iters=60",
            "lora.dropout=0.1",
        ]

    full = tmp_path / "full"
    p = train(args(full), tmp_path)
    assert "LoRA rank 4 on 8 layers" in p.stdout  # c_attn, attn.c_proj, c_fc, mlp.c_proj x 2 blocks
    ckpt = torch.load(full / "ckpt.pt", weights_only=True)
    assert (
        set(ckpt["model"]) == {k for k in ckpt["model"] if k.endswith(("lora_A", "lora_B"))}
        and len(ckpt["model"]) == 16
    )
    assert set(ckpt["optimizer"]["state"]) == set(ckpt["model"])  # only adapters are optimized
    base = torch.load(base_run / "ckpt.pt", weights_only=True)["model"]

    merged = load_checkpoint(full).model  # the run as sample.py / eval / export see it: adapters merged onto the base
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed)

    interrupted = tmp_path / "interrupted"
    assert interrupt(args(interrupted), tmp_path, interrupted, at_step=35, sig=signal.SIGTERM) == 128 + signal.SIGTERM
    train(args(interrupted), tmp_path)
    assert_same_weights(torch.load(interrupted / "ckpt.pt", weights_only=True)["model"], ckpt["model"])

    out = export(OmegaConf.create({"checkpoint": str(full), "out_dir": str(tmp_path / "hf")}))
    assert (out / "model.safetensors").exists()
    from gpt2.sampling import run as sample_run

    texts = sample_run(
        OmegaConf.create(
            {"checkpoint": str(full), "device": "cpu", "max_new_tokens": 8, "temperature": 0.0, "stream": False}
        )
    )
    assert len(texts) == 1 and len(texts[0]) == 8


@pytest.mark.e2e
def test_lora_bad_inputs_are_one_line(char_data, base_run, tmp_path):
    from conftest import compose

    from gpt2.config import TrainRunConfig, to_object

    for overrides, message in (
        (["lora.rank=-1"], "lora.rank must be >= 0"),
        (["lora.rank=4"], "lora.rank adapts a trained model: give init_from="),
        (
            [f"init_from={base_run}", "lora.rank=4", "train.parallelism=fsdp"],
            "does not run under train.parallelism=fsdp",
        ),
        ([f"init_from={base_run}", "lora.rank=4", "lora.targets=[]"], "lora.targets is empty"),
    ):
        with pytest.raises(UserError, match=message):
            to_object(compose(f"data.name={char_data}", f"out_dir={tmp_path}", *overrides), TrainRunConfig)
    out = tmp_path / "run"
    train(
        [f"data.name={char_data}", f"out_dir={out}", f"init_from={base_run}", *TINY, *LORA, "train.max_iters=10"],
        tmp_path,
    )
    p = train(
        [
            f"data.name={char_data}",
            f"out_dir={out}",
            f"init_from={base_run}",
            *TINY,
            *LORA,
            "lora.rank=8",
            "train.max_iters=20",
        ],
        tmp_path,
        check=False,
    )
    assert p.returncode == 2 and "lora.rank=8 disagrees with the run" in p.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_lora_run_from_an_hf_base_exports_to_peft_and_merged_hf_with_our_logits(bpe_data, tmp_path):
    """A LoRA fine-tune of a Hugging Face base: format=peft loads with peft.PeftModel onto that base, format=hf is
    the merged model; both give the logits our merged model gives."""
    from conftest import hf_model_dir
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from gpt2.export import run as export
    from gpt2.loading import load_checkpoint

    base = hf_model_dir(tmp_path / "base")
    out = tmp_path / "run"
    train(
        [
            f"data.name={bpe_data}",
            f"out_dir={out}",
            f"init_from={base}",
            "train.batch_size=2",
            "train.max_iters=8",
            "train.eval_interval=8",
            "train.eval_iters=2",
            "optim.lr=1e-2",
            "optim.warmup_iters=2",
            "device=cpu",
            "dtype=float32",
            "compile=false",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.targets=[c_attn,mlp.c_proj]",
        ],
        tmp_path,
    )
    ours = load_checkpoint(out).model
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(idx)[0]
        assert not torch.allclose(want, GPT2LMHeadModel.from_pretrained(base)(idx).logits, atol=1e-4)  # it trained
        peft_dir = export(
            OmegaConf.create({"checkpoint": str(out), "out_dir": str(tmp_path / "peft"), "format": "peft"})
        )
        peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(peft_dir)).eval()
        torch.testing.assert_close(peft_model(idx).logits, want, atol=1e-4, rtol=1e-4)
        hf_dir = export(OmegaConf.create({"checkpoint": str(out), "out_dir": str(tmp_path / "hf")}))
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(hf_dir)(idx).logits, want, atol=1e-4, rtol=1e-4)
    full = tmp_path / "full"  # a run without LoRA has no adapters to export
    train(
        [
            f"data.name={bpe_data}",
            f"out_dir={full}",
            f"init_from={base}",
            "train.batch_size=2",
            "train.max_iters=1",
            "train.eval_interval=1",
            "train.eval_iters=1",
            "device=cpu",
            "dtype=float32",
            "compile=false",
        ],
        tmp_path,
    )
    with pytest.raises(UserError, match="format=peft exports LoRA adapters"):
        export(OmegaConf.create({"checkpoint": str(full), "out_dir": str(tmp_path / "x"), "format": "peft"}))


@pytest.mark.e2e
@pytest.mark.slow  # ~30 s each: half precision is emulated on CPUs without native bf16 / fp16 matmuls
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_run_keeps_the_frozen_base_in_that_dtype_and_the_adapters_in_fp32(
    char_data, base_run, tmp_path, dtype, monkeypatch
):
    from conftest import compose

    import gpt2.training
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    monkeypatch.setattr(gpt2.training, "resolve_dtype", lambda *_: getattr(torch, dtype))  # (fp16: a GPU's, e.g. a T4)
    overrides = [*TINY, *LORA, f"init_from={base_run}", f"dtype={dtype}"]
    trainer = Trainer(
        to_object(compose(f"data.name={char_data}", f"out_dir={tmp_path}", *overrides), TrainRunConfig), DistInfo()
    )
    attn = trainer.model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear) and attn.weight.dtype == getattr(torch, dtype) and not attn.weight.requires_grad
    assert attn.lora_A.dtype == attn.lora_B.dtype == torch.float32
    assert {p.dtype for group in trainer.optimizers.param_groups for p in group["params"]} == {torch.float32}
