"""Dropout that is fast on the CPU too.

On CUDA, `F.dropout` is one fused kernel and `scaled_dot_product_attention` applies attention dropout inside its
flash kernel. On the CPU, `F.dropout` draws one float per element from a serial Mersenne Twister (~15 ns each)
and keeps a float mask (4 bytes an element) for backward, and attention with dropout falls back to SDPA's math
path, which does the same over every (T, T) matrix of attention weights: at nanoGPT's shakespeare_char shape
(6 x 384, context 256, batch 64, dropout 0.2) that is 17% of a CPU training step.

Here a CPU mask takes 16 random bits per element, four elements per 64-bit draw from torch's generator (so
seeding, per-rank streams and checkpointed RNG state work as before), and is kept as one byte per element. The
dropout probability is rounded to a multiple of 2^-16 (0.2 -> 0.199997) and the kept values are scaled by the
inverse of the rounded keep probability, so expectations are unchanged. Everywhere else (CUDA, torch.compile,
which generates its own random numbers in its fused kernels) these are `F.dropout` and SDPA themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 16  # a mask element is 16 random bits


def _draws_fast_mask(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and p > 0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A CPU bool tensor of `shape`, each element True (kept) with probability 1 - p', where p' is p rounded to a
    multiple of 2^-16 (at most 1 - 2^-16), and the scale 1 / (1 - p') for the kept values."""
    numel = math.prod(shape)
    dropped = min(round(p * _LEVELS), _LEVELS - 1)  # how many of the 2^16 values of a draw drop the element
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
    keep = words.view(torch.int16)[:numel].view(shape) >= dropped - _LEVELS // 2  # int16 is uniform on +-2^15
    return keep, _LEVELS / (_LEVELS - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the fast mask on the CPU."""
    if not _draws_fast_mask(x, p, training):
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p)
    return torch.where(keep, x, 0).mul_(scale)  # autograd keeps only `keep` (where's) for backward


class Dropout(nn.Dropout):
    """`nn.Dropout`, with the fast mask on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, except causal attention with dropout on the CPU: there SDPA's own math
    path (the only one with dropout) is written out with the fast mask, softmax(q k^T / sqrt(hs)) then v."""
    if not (_draws_fast_mask(q, dropout_p, True) and is_causal and attn_mask is None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    T, S = q.size(-2), k.size(-2)
    future = torch.ones(T, S, dtype=torch.bool).triu(diagonal=1)  # key after the query
    att = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, S)
    att = F.softmax(att.masked_fill_(future, float("-inf")), dim=-1)  # in place: bmm's backward needs q and k
    keep, scale = keep_mask(att.shape, dropout_p)
    return (torch.where(keep, att, 0) @ v).mul_(scale)  # scaling (T, hs) rows, not (T, S)
