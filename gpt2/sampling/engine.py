"""The engine: `prefill`, `decode_step`, `generate` -> token ids.

`generate` prefills the prompt once into a KV cache allocated once per call, then yields one (B,) tensor of
token ids per step. Rows that emitted end-of-text stop (their later entries are -1) and generation ends when
every row has; past `block_size` the context window slides (the last half of the context is re-prefilled)
instead of failing. Both steps are the model's own `last_logits`: there is no second copy of the forward.

References: gpt-fast `generate.py` (prefill/decode split, sampling without a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from gpt2.model import GPT, KVCache
from gpt2.sampling.logits import apply_repetition_penalty, sample_next_token


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. See `sample_next_token` and `apply_repetition_penalty`."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@torch.no_grad()
def use_decode_layout(model: GPT) -> GPT:
    """Store each Linear weight, and the tied `wte`/`lm_head` matrix, as the transpose of a contiguous
    (in, out) tensor: same shapes and values, other strides, no extra memory. Returns `model` (changed in place).

    Why: on CPU, one-token decoding is a chain of matrix-vector products bound by memory bandwidth, and MKL
    streams the (in, out) layout faster than nn.Linear's (out, in): about 1.25x for the blocks and 2x for the
    50304-row LM head of GPT-2 124M on the 2-core x86 sandbox (bench/sample.py, BENCHMARKS.md). Embedding
    lookups read a few strided rows, which costs nothing noticeable. The sampler uses it on CPU only.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.lm_head:
            module.weight = nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
    wte = model.transformer.wte
    wte.weight = nn.Parameter(wte.weight.t().contiguous().t(), requires_grad=False)
    model.lm_head.weight = wte.weight  # keep the tie
    return model


def prefill(model: GPT, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Run a whole prompt idx (B, T) through the model in one pass, filling the cache from position 0.
    Returns the next-token logits (B, V) in fp32."""
    kv_cache.reset()
    return model.last_logits(idx, kv_cache)


def decode_step(model: GPT, token: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Feed one token per row, token (B, 1), at the cache's position. Returns next-token logits (B, V) fp32."""
    return model.last_logits(token, kv_cache)


DecodeFn = Callable[[GPT, torch.Tensor, KVCache], torch.Tensor]


def window_size(block_size: int) -> int:
    """Tokens kept when the context slides past block_size: the last half, so each re-prefill buys
    block_size // 2 cached steps."""
    return max(1, block_size // 2)


class _Context:
    """The tokens a generation's KV cache holds, so that the window can slide when the cache is full."""

    def __init__(self, model: GPT, idx: torch.Tensor, max_new_tokens: int, decode: DecodeFn) -> None:
        B, T = idx.shape
        self.model, self.decode = model, decode
        self.block_size = model.config.block_size
        max_len = min(T + max_new_tokens, self.block_size)
        self.cache = KVCache(model.config, B, max_len, device=idx.device, dtype=model.lm_head.weight.dtype)
        self.tokens = torch.empty(B, self.block_size, dtype=torch.long, device=idx.device)
        self.tokens[:, :T] = idx

    def next_logits(self, token: torch.Tensor) -> torch.Tensor:
        """Append token (B,) and return the logits after it: one decode step, or, when the cache is full
        (only when prompt + new tokens exceed block_size), a re-prefill of the last `window_size` tokens."""
        cache = self.cache
        if cache.pos < cache.max_len:
            self.tokens[:, cache.pos] = token
            return self.decode(self.model, token[:, None], cache)
        keep = window_size(self.block_size)
        window = torch.cat([self.tokens[:, self.block_size - keep + 1 :], token[:, None]], dim=1)  # (B, keep)
        self.tokens[:, :keep] = window
        return prefill(self.model, window, cache)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    *,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    decode: DecodeFn = decode_step,
) -> Iterator[torch.Tensor]:
    """Continue prompts idx (B, T) (T <= block_size, one length for all rows) by up to `max_new_tokens`.

    Yields one (B,) int64 CPU tensor per step: the new token of each row. When `eot_id` is given, a row that
    emits it has finished: later steps hold -1 in its place, and the generator returns once every row has
    finished. Moving the sampled ids to the CPU is the only host sync per step.

    The KV cache is allocated once, for min(T + max_new_tokens, block_size) positions; past it the context
    slides (see `_Context`). `decode` is the decode-step function (e.g. a torch.compile'd `decode_step`).
    """
    B, T = idx.shape
    if not 1 <= T <= model.config.block_size:
        raise ValueError(f"prompt length {T} must be in [1, block_size={model.config.block_size}]")
    context = _Context(model, idx, max_new_tokens, decode)
    seen = None  # (B, V) tokens in the context, for the repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
    finished = torch.zeros(B, dtype=torch.bool)  # on the CPU, next to the yielded tokens

    logits = prefill(model, idx, context.cache)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = sample_next_token(
            logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator
        )  # (B,) on device
        out = token.cpu().masked_fill(finished, -1)  # not in place: on a CPU device .cpu() is `token` itself
        yield out
        if eot_id is not None:
            finished |= out == eot_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = context.next_logits(token)
