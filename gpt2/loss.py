"""Next-token cross-entropy from the last hidden states, without the (N, V) logits of the whole batch.

The LM head of GPT-2 turns each position into 50,304 logits: at batch 4 x 1024 that is 206M numbers, stored
once in bf16 for the matmul, again in fp32 for the softmax, and twice more for their gradients (~2 GB).
`linear_cross_entropy` computes the same loss and gradients chunk by chunk over positions: each chunk's logits,
softmax and logit gradient live only while that chunk is processed, and the gradients for the hidden states and
the head weight are accumulated right away (the forward computes them; the backward only scales them by the
incoming gradient), as Liger-Kernel's fused linear cross-entropy does.

What keeps it as fast as the plain path:
- chunks are as large as a memory budget allows (`CHUNK_BYTES`) and of equal size, so a fine-tuning batch is
  often one chunk and no chunk is a short remainder;
- every chunk reuses the same two logits buffers and the softmax runs in place in the fp32 one: on a CPU a
  fresh tensor of this size costs a page fault per 4 KB, more than the arithmetic on it;
- the head-weight gradient is written by the first chunk and accumulated by the others without a temporary
  of (V, C): fp32 products add into it inside the matmul, 16-bit ones a slice of the vocabulary at a time.
The matmuls are the plain path's (logits, then grad @ W and grad.T @ x) in the same dtype.
"""

from __future__ import annotations

import math

import torch

CHUNK_BYTES = 320 << 20
"""Memory for one chunk's logits (fp32, plus a 16-bit copy under autocast): about 1,100 positions of GPT-2's
vocabulary under bf16 autocast, so a batch of 4 x 256 is one chunk and 4 x 1024 is four."""

HEAD_SLICE = 4096
"""Vocabulary rows per 16-bit product of the head-weight gradient: (4096, C) temporaries, added into its fp32
buffer, rather than one (V, C) product (a mixed-dtype add of a tensor that size would copy it first)."""


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """mean over targets != -1 of cross_entropy(x @ weight[:vocab_size].T, targets), for x (N, C), weight
    (Vp, C), targets (N,). Under autocast the matmuls run in its dtype and the softmax in fp32, as they do in
    `F.cross_entropy(F.linear(x, weight))`; otherwise in x's dtype. Without autograd (evaluation) only the
    loss is computed."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return _chunked_loss(x, weight, targets, vocab_size, dtype, grads=None)
        return _LinearCrossEntropy.apply(x, weight, targets, vocab_size, dtype)


def chunk_rows(rows: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Positions per chunk: as many as `CHUNK_BYTES` holds, split evenly over the chunks `rows` needs."""
    bytes_per_row = vocab_size * (4 if dtype == torch.float32 else 4 + dtype.itemsize)
    chunks = max(1, math.ceil(rows / max(1, CHUNK_BYTES // bytes_per_row)))
    return max(1, math.ceil(rows / chunks))


def _chunked_loss(x, weight, targets, vocab_size, dtype, grads):
    """The mean loss; with `grads` (a `_Gradients`), also the gradients of the summed loss, written into it."""
    w = weight[:vocab_size].to(dtype)  # (V, C)
    rows = chunk_rows(x.shape[0], vocab_size, dtype)
    logits = torch.empty(rows, vocab_size, dtype=torch.float32, device=x.device)
    low = None if dtype == torch.float32 else torch.empty(rows, vocab_size, dtype=dtype, device=x.device)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], rows):
        xs, ts = x[start : start + rows].to(dtype), targets[start : start + rows]
        chunk = logits[: len(ts)]
        if low is None:
            torch.mm(xs, w.t(), out=chunk)
        else:
            chunk.copy_(torch.mm(xs, w.t(), out=low[: len(ts)]))
        valid = ts != -1
        safe = ts.clamp(min=0)
        target_logit = chunk.gather(1, safe[:, None]).squeeze(1)
        peak = chunk.amax(dim=1, keepdim=True)
        denominator = chunk.sub_(peak).exp_().sum(dim=1)  # the chunk now holds exp(logit - peak)
        total += ((peak.squeeze(1) + denominator.log() - target_logit) * valid).sum()
        if grads is not None:
            chunk.mul_((valid / denominator)[:, None])  # softmax, zero in rows without a target
            chunk[torch.arange(len(ts), device=ts.device), safe] -= valid.to(chunk.dtype)  # - one_hot(target)
            grads.add(start, chunk if low is None else low[: len(ts)].copy_(chunk), xs, w)
    return total / (targets != -1).sum().clamp(min=1)  # (a batch without targets has loss 0)


class _Gradients:
    """d(summed loss)/d(x) (N, C) and d/d(weight) (Vp, C, fp32; None for a frozen head, as under LoRA, which
    saves a third of the head's matmuls), filled chunk by chunk."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, vocab_size: int, head_grad: bool) -> None:
        self.x = torch.empty_like(x)
        self.weight = None
        if head_grad:
            self.weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            (self.weight if len(x) == 0 else self.weight[vocab_size:]).zero_()  # the padded rows (no chunk: all)

    def add(self, start: int, grad: torch.Tensor, xs: torch.Tensor, w: torch.Tensor) -> None:
        """Add one chunk's gradients: `grad` (n, V) is d(summed loss)/d(logits) of rows start:start+n."""
        self.x[start : start + len(grad)] = grad @ w
        if self.weight is None:
            return
        head = self.weight[: len(w)]
        if grad.dtype == torch.float32:  # written, then accumulated, by the matmul itself
            torch.mm(grad.t(), xs, out=head) if start == 0 else head.addmm_(grad.t(), xs)
            return
        for rows in range(0, len(w), HEAD_SLICE):  # 16-bit products: a slice of the vocabulary at a time
            product, part = grad[:, rows : rows + HEAD_SLICE].t() @ xs, head[rows : rows + HEAD_SLICE]
            part.copy_(product) if start == 0 else part.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, dtype):  # type: ignore[override]
        grads = _Gradients(x, weight, vocab_size, head_grad=ctx.needs_input_grad[1])
        loss = _chunked_loss(x, weight, targets, vocab_size, dtype, grads)
        ctx.grads = grads  # not saved tensors: the backward scales them in place and hands them on
        ctx.count = (targets != -1).sum().clamp(min=1)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used: backward runs once")
        scale = grad_loss / ctx.count
        weight_grad = None if grads.weight is None else grads.weight.mul_(scale).to(ctx.weight_dtype)
        return grads.x.mul_(scale.to(grads.x.dtype)), weight_grad, None, None, None
