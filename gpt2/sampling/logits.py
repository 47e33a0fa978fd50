"""Pure functions over a (B, V) logits tensor: temperature, top-k, top-p, repetition penalty, and drawing the
next token; and `Penalties`, the context each row's penalties read. The math runs in fp32; temperature 0 is
argmax; randomness only from an explicit `torch.Generator`. They never modify their input.

References: nanochat `engine.py` (sample_next_token), Holtzman et al. 2019 (top-p), Keskar et al. 2019 (CTRL),
OpenAI's API reference (presence and frequency penalties).
"""

from __future__ import annotations

from typing import Sequence

import torch

from gpt2.config import SamplingParams


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, for temperature > 0 (0 means greedy and is handled by `sample_next_token`)."""
    assert temperature > 0, "temperature 0 is argmax; sample_next_token handles it"
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too); the rest become -inf.
    k = 0 or k >= V is a no-op."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probability
    mass is >= p; the rest become -inf. The most likely token is always kept; p = 1 is a no-op."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: for tokens already in the
    context (`seen`, a (B, V) bool mask), positive logits are divided by `penalty` and negative ones
    multiplied, so penalty > 1 makes them less likely. penalty = 1 is a no-op."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class Penalties:
    """What the context-dependent penalties of B rows read, on the logits' device: the tokens of each row's
    prompt and output (CTRL's repetition penalty) and how often each token was generated (OpenAI's presence and
    frequency penalties: logit - presence * [count > 0] - frequency * count). `update` after every step."""

    def __init__(self, params: SamplingParams, prompts: Sequence[Sequence[int]], vocab_size: int, device) -> None:
        self.params = params
        self.counts = torch.zeros(len(prompts), vocab_size, device=device)
        self.in_prompt = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            self.in_prompt[row, torch.as_tensor(ids, dtype=torch.long, device=device)] = True

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        return params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        p, logits = self.params, logits.float()
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.in_prompt | (self.counts > 0), p.repetition_penalty)
        if p.presence_penalty:
            logits = logits - p.presence_penalty * (self.counts > 0)
        if p.frequency_penalty:
            logits = logits - p.frequency_penalty * self.counts
        return logits

    def update(self, tokens: torch.Tensor) -> None:
        """Count tokens (B,), one per row, as generated."""
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from logits (B, V) -> ids (B,) int64, on the logits' device.

    The math runs in fp32. temperature 0 is argmax (top_k/top_p do not matter then). Sampling uses the
    exponential-race form of the Gumbel-max trick (argmax of p / Exp(1) noise), which needs no host sync,
    unlike `torch.multinomial` on CUDA; `generator` makes it reproducible.
    """
    logits = logits.float()
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    ids = None
    if 0 < top_k < logits.size(-1):
        # Work on the k best only: the same distribution as top_k_filter (up to ties at the k-th value) for
        # the price of a (B, k) softmax, noise draw and top_p sort instead of (B, V) ones.
        logits, ids = torch.topk(logits, top_k, dim=-1)  # (B, k) each
    logits = top_p_filter(apply_temperature(logits, temperature), top_p)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = torch.argmax(probs / noise, dim=-1)  # (B,)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
