"""Sampling, bottom to top:

- `gpt2.sampling.logits`: pure functions over (B, V) logits (temperature, top-k, top-p, repetition penalty,
  drawing the next token) and `Penalties` (repetition, presence and frequency penalties' context).
- `gpt2.sampling.engine`: `Batch`, `decode_step` and `generate` (KV-cached, token ids out).
- `gpt2.sampling.text`: `TextStream`, token ids -> text pieces with stop strings.
- `gpt2.sampling.sampler`: `Sampler`, the notebook API (`generate`, `stream`).
- `gpt2.sampling.conversation`: `chat`, the terminal chat of `sample.py mode=chat` / `gpt2-chat`.
- `gpt2.sampling.cli`: the `sample.py` / `gpt2-sample` command (`run`).
"""

from gpt2.config import GenerationSettings, SamplingParams
from gpt2.sampling.cli import run, unescape
from gpt2.sampling.engine import Batch, decode_step, generate, use_decode_linears, window_size
from gpt2.sampling.logits import (
    Penalties,
    apply_repetition_penalty,
    apply_temperature,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from gpt2.sampling.sampler import Sampler
from gpt2.sampling.text import TextStream

__all__ = [
    "Batch",
    "GenerationSettings",
    "Penalties",
    "Sampler",
    "SamplingParams",
    "TextStream",
    "apply_repetition_penalty",
    "apply_temperature",
    "decode_step",
    "generate",
    "run",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
    "unescape",
    "use_decode_linears",
    "window_size",
]
