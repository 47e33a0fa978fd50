"""The GPT-2 model: shapes, loss over the real vocab, KV cache equivalence, init, sizes, FLOPs, compile."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import tiny_gpt

from gpt2 import GPT, GPTConfig, KVCache
from gpt2.errors import UserError
from gpt2.model import PRESETS, preset
from gpt2.resources import CONFIG_DIR


def test_forward_shapes_and_loss():
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 100) and loss is None
    logits, loss = model(idx, targets=torch.randint(0, 100, (3, 17)))
    assert loss.shape == () and math.isfinite(loss.item())
    # A fresh model predicts nearly uniformly: loss on random targets ~ ln(V).
    assert abs(loss.item() - math.log(100)) < 0.1


def test_loss_is_cross_entropy_over_real_vocab_only():
    model = tiny_gpt(100, 32)  # padded to 128
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():  # make the padded logits huge: they would dominate a softmax that included them
        model.transformer.wte.weight[100:] = 1.0
        model.transformer.ln_f.bias.fill_(1.0)
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    targets[0, :5] = -1  # ignored positions
    logits, loss = model(idx, targets)
    full = model.lm_head(model.transformer.ln_f(_hidden(model, idx)))  # (B, T, Vp)
    assert full[..., 100:].min() > full[..., :100].max()
    logp = full[..., :100].log_softmax(-1)
    keep = targets != -1
    manual = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(logits, full[..., :100])


def _hidden(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The residual stream before ln_f, computed outside `forward`."""
    pos = torch.arange(idx.shape[1])
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for block in model.transformer.h:
        x = block(x)
    return x


def test_sequence_longer_than_block_size():
    model = tiny_gpt(100, 8)
    with pytest.raises(ValueError, match="exceeds the model's block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_forward():
    model = tiny_gpt(100, 32).eval()
    idx = torch.randint(0, 100, (2, 20))
    full, _ = model(idx)  # (B, T, V)
    cache = KVCache(model.config, batch_size=2)
    prefill, _ = model(idx[:, :12], kv_cache=cache)  # the prompt at once
    assert cache.lengths.tolist() == [12, 12] and cache.host_lengths.tolist() == [12, 12]
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=0)
    chunk, _ = model(idx[:, 12:16], kv_cache=cache)  # a chunk after a prefix (needs the offset causal mask)
    torch.testing.assert_close(chunk, full[:, 12:16], atol=1e-5, rtol=0)
    for t in range(16, 20):  # then one token at a time
        step, _ = model(idx[:, t : t + 1], kv_cache=cache)
        torch.testing.assert_close(step, full[:, t : t + 1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [20, 20]
    cache.reset()
    again, _ = model(idx[:, :5], kv_cache=cache)
    torch.testing.assert_close(again, full[:, :5], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_rows_at_different_lengths_equal_their_full_forward(static):
    """Per-row positions: rows prefilled alone to different lengths, then chunks and single tokens for all rows
    at once (the per-row mask path), give each row the logits of its own full forward."""
    model = tiny_gpt(100, 32).eval()
    idx = torch.randint(0, 100, (3, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=3, max_len=24, static=static)
    starts = [4, 9, 1]
    for b, start in enumerate(starts):
        model(idx[b : b + 1, :start], kv_cache=cache.rows(b, b + 1))
    assert cache.lengths.tolist() == starts
    chunk = torch.stack([idx[b, s : s + 3] for b, s in enumerate(starts)])  # 3 positions after each prefix
    logits, _ = model(chunk, kv_cache=cache)
    for b, s in enumerate(starts):
        torch.testing.assert_close(logits[b], full[b, s : s + 3], atol=1e-5, rtol=0)
    for t in range(3, 8):
        step = torch.stack([idx[b, s + t : s + t + 1] for b, s in enumerate(starts)])
        logits, _ = model(step, kv_cache=cache)
        for b, s in enumerate(starts):
            torch.testing.assert_close(logits[b, 0], full[b, s + t], atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_decoding_with_and_without_cache_is_identical():
    model = tiny_gpt(100, 32).eval()
    prompt = torch.randint(0, 100, (2, 5))
    plain = prompt
    for _ in range(20):
        logits, _ = model(plain)
        plain = torch.cat([plain, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    cache = KVCache(model.config, batch_size=2)
    cached, nxt = prompt, prompt
    for _ in range(20):
        logits, _ = model(nxt, kv_cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        cached = torch.cat([cached, nxt], dim=1)
    assert torch.equal(plain, cached)


def test_kv_cache_overflow():
    model = tiny_gpt(100, 8).eval()
    cache = KVCache(model.config, batch_size=1)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds the KV cache's 8 positions"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's block_size 8"):
        KVCache(model.config, batch_size=1, max_len=9)


def test_init_stds_match_init_weights_docstring():
    """std 0.02; residual projections 0.02/sqrt(2 n_layer); biases 0; LayerNorm 1/0; padding rows 0; tied."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=256, vocab_size=1000)
    model = GPT(config)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    sd = model.state_dict()
    wte = sd["transformer.wte.weight"]
    assert wte.shape == (1024, 256)
    assert not wte[1000:].any()
    assert wte[:1000].std().item() == pytest.approx(0.02, rel=0.02)
    assert model.lm_head.weight is model.transformer.wte.weight
    checked = 0
    for name, t in sd.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            continue
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(t == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert not t.any(), name
        else:
            want = residual if name.endswith("c_proj.weight") else 0.02
            assert t.mean().abs().item() < 0.1 * want, name
            assert t.std().item() == pytest.approx(want, rel=0.02), name
        checked += 1
    assert checked == len(sd) - 2


# Parameter counts of OpenAI's releases (HF GPT2LMHeadModel, tied head counted once, vocab 50257).
RELEASED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(RELEASED))
def test_preset_parameter_counts(name):
    config = preset(name)
    with torch.device("meta"):
        model = GPT(config)
    padding = (config.padded_vocab_size - config.vocab_size) * config.n_embd
    assert model.num_params(non_embedding=False) - padding == RELEASED[name]
    assert model.num_params() == model.num_params(non_embedding=False) - config.block_size * config.n_embd


def test_released_counts_are_transformers_counts():
    transformers = pytest.importorskip("transformers")
    for name in ("gpt2", "gpt2-medium"):
        c = PRESETS[name]
        hf_config = transformers.GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(hf_config)
        assert sum(p.numel() for p in hf.parameters()) == RELEASED[name]


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown model preset 'gpt5'"):
        preset("gpt5")


def test_bad_config_values():
    with pytest.raises(UserError, match="n_embd .* divisible by model.n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="model.dropout"):
        GPTConfig(dropout=1.0)


def test_every_preset_is_a_model_choice_on_the_command_line():
    """`model=<name>` selects `gpt2.model.PRESETS[name]` (one table of sizes, registered with Hydra)."""
    from hydra import compose, initialize_config_dir

    from gpt2.config import TrainRunConfig, to_object

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for name in PRESETS:
            run = to_object(compose("train", overrides=[f"model={name}"]), TrainRunConfig)
            assert GPTConfig.of(run.model, 50257) == preset(name, vocab_size=50257), name
            assert run.model.dropout == 0.0 and run.model.bias is True


def test_weight_tying_shares_storage_and_gradients():
    model = tiny_gpt(100, 32)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in set(model.parameters()))
    idx = torch.randint(0, 100, (2, 8))
    model(idx, targets=idx)[1].backward()
    grad = model.transformer.wte.weight.grad
    assert grad is not None and grad[:100].abs().sum() > 0
    assert not grad[100:].any()  # padded rows get no gradient, so they stay zero under AdamW too
    model.to(torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_eval_is_deterministic_and_dropout_only_acts_in_training():
    model = tiny_gpt(100, 32, dropout=0.2)
    idx = torch.randint(0, 100, (2, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    no_dropout = tiny_gpt(100, 32, dropout=0.0).train()
    assert torch.equal(no_dropout(idx)[0], no_dropout(idx)[0])


def test_flops_per_token():
    """6 N (N: parameters without wpe, with the padded wte/lm_head) + 12 n_layer n_embd T."""
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    n = 124_439_808 + 47 * 768 - 1024 * 768  # released count + padding rows - wpe
    assert model.num_params() == n == 123_689_472
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024 == 855_383_040
    assert model.flops_per_token(seq_len=256) == 6 * n + 12 * 12 * 768 * 256


@pytest.mark.slow  # ~30 s of inductor compilation on 2 CPU cores
def test_compiled_matches_eager():
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (2, 16))
    eager_logits, eager_loss = model(idx, targets=idx)
    eager_loss.backward()
    eager_grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    compiled = torch.compile(model)
    logits, loss = compiled(idx, targets=idx)
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.grad, eager_grad, atol=1e-5, rtol=1e-4)
    assert time.perf_counter() - start < 120


def test_bias_false_has_no_biases():
    model = tiny_gpt(100, 32, bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    idx = torch.randint(0, 100, (1, 8))
    assert model(idx, targets=idx)[1].isfinite()


def test_loss_under_bf16_autocast_is_close_to_fp32():
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (2, 16))
    _, fp32 = model(idx, targets=idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = model(idx, targets=idx)
    assert bf16.dtype == torch.float32  # cross-entropy runs in fp32 under autocast
    assert abs(bf16.item() - fp32.item()) < 0.05


@pytest.mark.parametrize(
    "capability, want",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_uses_bf16_only_on_gpus_that_have_it(monkeypatch, capability, want):
    """T4/V100 report is_bf16_supported() (emulated): auto must still pick fp16 + GradScaler there."""
    from gpt2.device import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == want


@pytest.mark.parametrize("local_rank, visible, want", [(3, 8, 3), (3, 1, 0), (5, 2, 1)])
def test_each_process_gets_a_gpu_it_can_see(monkeypatch, local_rank, visible, want):
    from gpt2.distributed import cuda_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert cuda_device(local_rank) == torch.device("cuda", want)


def _loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor, **kwargs) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, **kwargs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("vocab_size", [100, 50257])
def test_chunked_loss_and_gradients_equal_the_logits_path(monkeypatch, vocab_size):
    """return_logits=False computes the loss chunk by chunk from the hidden states (gpt2.loss): the same loss
    and the same gradients as cross-entropy over the full logits, in fp32, across chunks, with ignored targets
    and the padded vocabulary rows (whose gradient stays zero)."""
    import gpt2.loss

    monkeypatch.setattr(gpt2.loss, "CHUNK_BYTES", 7 * 4 * vocab_size)  # 7 positions a chunk: 5 chunks
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size, 32)
    idx = torch.randint(0, vocab_size, (2, 16))
    targets = torch.randint(0, vocab_size, (2, 16))
    targets[0, :5] = -1
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets)
    logits, loss = model(idx, targets, return_logits=False)
    assert logits is None
    chunked_loss, grads = _loss_and_grads(model, idx, targets, return_logits=False)
    assert chunked_loss == pytest.approx(ref_loss, abs=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradients computed
        assert model(idx, targets, return_logits=False)[1].item() == pytest.approx(ref_loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert grads["transformer.wte.weight"][vocab_size:].abs().max() == 0

    # A frozen head and embedding (LoRA): their gradient is not computed; the others are the same.
    model.transformer.wte.weight.requires_grad_(False)
    _, frozen = _loss_and_grads(model, idx, targets, return_logits=False)
    assert "transformer.wte.weight" not in {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in frozen.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_the_autocast_logits_path():
    torch.manual_seed(0)
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, idx, idx)
        loss, grads = _loss_and_grads(model, idx, idx, return_logits=False)
    assert loss == pytest.approx(ref_loss, abs=2e-3)  # bf16 matmuls either way; fp32 softmax
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=2e-2, rtol=5e-2, msg=name)


def test_chunked_loss_under_bf16_autocast_is_the_same_in_one_chunk_or_many(monkeypatch):
    """Under autocast the head-weight gradient of later chunks is added in slices of the vocabulary into an fp32
    buffer: across 5 chunks (and 3 slices) the loss and gradients are one chunk's, up to bf16 rounding, and both
    are the autocast logits path's."""
    import gpt2.loss

    torch.manual_seed(0)
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (2, 16))
    results = []
    for chunk_bytes, head_slice in ((1 << 30, 4096), (7 * 6 * 100, 40)):
        monkeypatch.setattr(gpt2.loss, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(gpt2.loss, "HEAD_SLICE", head_slice)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, idx, idx, return_logits=False))
        assert gpt2.loss.chunk_rows(32, 100, torch.bfloat16) == (32 if chunk_bytes > 1e6 else 7)
    (one_loss, one_grads), (loss, grads) = results
    assert loss == pytest.approx(one_loss, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, one_grads[name], atol=2e-3, rtol=1e-2, msg=name)


def test_chunked_loss_makes_no_vocabulary_sized_temporaries_per_chunk(monkeypatch):
    """However many chunks, the loss allocates two (V, C) tensors: the head-weight gradient (fp32) and the
    weight in the autocast dtype; no chunk makes a product, a cast or a sum of that size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import gpt2.loss

    monkeypatch.setattr(gpt2.loss, "CHUNK_BYTES", 7 * 6 * 512)  # 7 positions a chunk: 5 chunks
    monkeypatch.setattr(gpt2.loss, "HEAD_SLICE", 64)
    V, C = 500, 32
    x = torch.randn(32, C, requires_grad=True)
    weight = torch.randn(512, C, requires_grad=True)
    targets = torch.randint(0, V, (32,))
    large = []

    class LargeOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            out = func(*args, **(kwargs or {}))
            if (
                isinstance(out, torch.Tensor)
                and out.numel() >= V * C
                and out.untyped_storage().data_ptr() not in inputs
            ):
                large.append(str(func))  # a new tensor of the vocabulary's size (not a view, not written in place)
            return out

    for dtype in (torch.bfloat16, torch.float32):
        large.clear()
        with LargeOutputs(), torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            gpt2.loss.linear_cross_entropy(x, weight, targets, V).backward()
        assert len(large) <= 2, (dtype, large)


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout():
    torch.manual_seed(0)
    model = tiny_gpt(100, 32, dropout=0.1).train()
    idx = torch.randint(0, 100, (2, 16))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks: the recomputation replays the RNG
        results.append(_loss_and_grads(model, idx, idx, return_logits=False))
    (plain_loss, plain_grads), (loss, grads) = results
    assert loss == plain_loss
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-7, rtol=0, msg=name)


@pytest.mark.slow  # compiles a forward and backward (~30 s on 2 cores)
def test_compiled_chunked_loss_with_activation_checkpointing_matches_eager():
    torch.manual_seed(0)
    model = tiny_gpt(100, 32)
    idx = torch.randint(0, 100, (2, 16))
    eager_loss, eager_grads = _loss_and_grads(model, idx, idx)
    model.activation_checkpointing = True
    model.compile()
    loss, grads = _loss_and_grads(model, idx, idx, return_logits=False)
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
