"""The CPU dropout (gpt2.dropout) against brute force: masks drawn from torch's generator, 16 bits an element."""

import math

import pytest
import torch
import torch.nn.functional as F

import gpt2.dropout as dropout_module
from gpt2.dropout import Dropout, dropout, keep_mask, scaled_dot_product_attention
from gpt2.model import GPT, GPTConfig


def test_keep_mask_keeps_each_element_with_the_rounded_probability():
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.2)
    kept = 1 - 13107 / 65536  # 0.2 rounded to a multiple of 2^-16
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert scale == pytest.approx(1 / kept, rel=1e-12)
    sigma = math.sqrt(kept * (1 - kept) / keep.numel())
    assert abs(keep.float().mean().item() - kept) < 5 * sigma
    rows, cols = keep.float().mean(1), keep.float().mean(0)  # no position is favoured
    assert rows.std().item() < 2 * math.sqrt(kept * (1 - kept) / 1000)
    assert cols.std().item() < 2 * math.sqrt(kept * (1 - kept) / 1000)
    keep, scale = keep_mask(torch.Size([7]), 0.0)
    assert keep.all() and scale == 1.0
    assert math.isfinite(keep_mask(torch.Size([7]), 0.999999)[1])


def test_dropout_is_the_masked_input_scaled_and_so_is_its_gradient():
    x = torch.randn(3, 5, 11, requires_grad=True)  # an odd element count: the last 64-bit draw is cut
    torch.manual_seed(1)
    y = dropout(x, 0.3)
    torch.manual_seed(1)
    keep, scale = keep_mask(x.shape, 0.3)
    assert torch.equal(y, x.detach() * keep * scale)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g * keep * scale)
    assert torch.equal(dropout(x, 0.3, training=False), x) and torch.equal(dropout(x, 0.0), x)


def test_dropout_module_is_nn_dropout_with_the_cpu_mask():
    layer = Dropout(0.5)
    assert isinstance(layer, torch.nn.Dropout) and layer.state_dict() == {}
    x = torch.randn(64, 64)
    torch.manual_seed(2)
    y = layer(x)
    torch.manual_seed(2)
    keep, scale = keep_mask(x.shape, 0.5)
    assert torch.equal(y, x * keep * scale)
    assert torch.equal(layer.eval()(x), x)


def test_causal_attention_with_dropout_equals_brute_force_forward_and_backward():
    B, nh, T, hs, p = 2, 3, 9, 8, 0.25
    q, k, v = (torch.randn(B, nh, T, hs, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(3)
    y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))

    torch.manual_seed(3)
    keep, scale = keep_mask(torch.Size([B, nh, T, T]), p)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    reference = (F.softmax(scores, dim=-1) * keep * scale) @ v
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(reference, (q, k, v), torch.ones_like(reference))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_attention_without_dropout_or_with_a_mask_is_sdpa_itself():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(
        scaled_dot_product_attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    assert torch.equal(
        scaled_dot_product_attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_a_cpu_training_step_never_draws_torch_float_dropout_masks(monkeypatch):
    """The model's embedding, attention, residual and MLP dropout all take the fast path on the CPU (SDPA
    with dropout would draw a float per attention weight), and still drop: two forwards differ."""

    def refuse(*args, **kwargs):
        raise AssertionError("float dropout mask drawn on the CPU")

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "dropout", refuse)
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, dropout_p=0.0, **kw: refuse() if dropout_p else sdpa(*a, **kw)
    )
    drawn = []
    monkeypatch.setattr(dropout_module, "keep_mask", lambda shape, p: drawn.append(shape) or keep_mask(shape, p))
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, dropout=0.1)).train()
    idx = torch.randint(0, 50, (3, 8))
    _, loss = model(idx, idx, return_logits=False)
    loss.backward()
    assert len(drawn) == 1 + 2 * 3  # embeddings, then per block attention weights, attention out, MLP out
    assert torch.Size([3, 2, 8, 8]) in drawn
    assert not torch.equal(model(idx)[0], model(idx)[0])
