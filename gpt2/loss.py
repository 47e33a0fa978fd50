"""Next-token cross-entropy from the last hidden states, without the (N, V) logits of the whole batch.

The LM head of GPT-2 turns each position into 50,304 logits: at batch 4 x 1024 that is 206M numbers, stored
once in bf16 for the matmul, again in fp32 for the softmax, and twice more for their gradients (~2 GB).
`linear_cross_entropy` computes the same loss and gradients chunk by chunk over positions: each chunk's logits,
softmax and logit gradient live only while that chunk is processed, and the gradients for the hidden states and
the head weight are accumulated right away (the forward computes them; the backward only scales them by the
incoming gradient), as Liger-Kernel's fused linear cross-entropy does. Peak memory for the loss is one chunk's
logits; the matmuls are the same as the plain path's (logits, then grad @ W and grad.T @ x), in the same dtype.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (16M: 64 MB in fp32, about 330 positions of GPT-2's vocabulary: still large matmuls)."""


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int
                         ) -> torch.Tensor:
    """mean over targets != -1 of cross_entropy(x @ weight[:vocab_size].T, targets), for x (N, C), weight
    (Vp, C), targets (N,). Under autocast the matmuls run in its dtype and the softmax in fp32, as they do in
    `F.cross_entropy(F.linear(x, weight))`; otherwise in x's dtype. Without autograd (evaluation) only the
    loss is computed."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    with torch.autocast(device_type, enabled=False):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return _chunked_loss(x, weight, targets, vocab_size, chunk, dtype, grads=None)
        return _LinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk, dtype)


def _chunked_loss(x, weight, targets, vocab_size, chunk, dtype, grads):
    """The mean loss; with `grads` = (grad_x, grad_w) buffers, also the gradients of the summed loss, added in."""
    w = weight[:vocab_size].to(dtype)  # (V, C)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xs, ts = x[start : start + chunk].to(dtype), targets[start : start + chunk]
        logits = (xs @ w.t()).float()  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        valid = ts != -1
        safe = ts.clamp(min=0)
        total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
        if grads is not None:
            grad_x, grad_w = grads
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(ts), device=ts.device), safe] -= 1.0  # d(sum of losses) / d(logits)
            grad = (grad * valid[:, None]).to(dtype)
            grad_x[start : start + chunk] = grad @ w
            if grad_w is not None:  # (None: a frozen head, as under LoRA: a third of the head's matmuls saved)
                grad_w[:vocab_size] += (grad.t() @ xs).float()
    return total / (targets != -1).sum().clamp(min=1)  # (a batch without targets has loss 0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk, dtype):  # type: ignore[override]
        grad_x = torch.empty_like(x)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # padded rows stay 0
        loss = _chunked_loss(x, weight, targets, vocab_size, chunk, dtype, grads=(grad_x, grad_w))
        ctx.save_for_backward(grad_x, grad_w, (targets != -1).sum().clamp(min=1))
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        weight_grad = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return grad_x * scale.to(grad_x.dtype), weight_grad, None, None, None, None
