"""Perplexity of a model on a whole text: mean loss (nats/token), perplexity and bits per byte.

Sliding window, as GPT-2's paper and Hugging Face's perplexity guide evaluate: windows of `window` tokens start
every `stride` tokens; each token is scored exactly once, by the first window that reaches it, so every token
but those of the first window sees at least `window - stride` tokens of context. The first window scores all
its tokens; the last window is right-aligned with the end of the text (full length, so batches stay
rectangular) and scores only the tokens no window scored yet. `stride == window` gives non-overlapping windows:
the plain mean loss the trainer's val loss computes over consecutive chunks.

Bits per byte divides the total loss (in bits) by the UTF-8 bytes of the scored tokens, which makes numbers
comparable across tokenizers (a char model and a BPE model on the same text). End-of-text separators count
0 bytes: they are document boundaries, not text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gpt2 import loading
from gpt2.data import open_dataset
from gpt2.device import autocast, resolve_device, resolve_dtype
from gpt2.errors import UserError, exit_on_user_error
from gpt2.eval.config import PerplexityConfig, parse
from gpt2.model import GPT
from gpt2.progress import progress_bar


@dataclass
class PerplexityResult:
    tokens: int
    """Tokens scored (every token of the text but the first, which has no context)."""
    loss: float
    """Mean next-token cross-entropy, nats per token."""
    perplexity: float
    """exp(loss)."""
    bytes: Optional[int]
    """UTF-8 bytes of the scored tokens (None when unknown)."""
    bits_per_byte: Optional[float]
    """loss * tokens / (ln 2 * bytes)."""
    window: int
    stride: int

    def summary(self) -> str:
        bpb = f" | bits/byte {self.bits_per_byte:.4f}" if self.bits_per_byte is not None else ""
        return f"loss {self.loss:.4f} nats/token | perplexity {self.perplexity:.3f}{bpb}"


def windows(num_targets: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, n_scored) of each window over a text of `num_targets + 1` tokens.

    Window k feeds tokens [start, start + w) and predicts tokens [start + 1, start + w + 1), w = min(window,
    num_targets); it scores its last `n_scored` predictions. The n_scored sum to num_targets.
    """
    assert 1 <= stride <= window and num_targets >= 1
    w = min(window, num_targets)
    starts = [0]
    while starts[-1] + w < num_targets:
        starts.append(min(starts[-1] + stride, num_targets - w))  # the last window is right-aligned
    out, scored_until = [], 0  # targets [0, scored_until) are scored
    for s in starts:
        out.append((s, s + w - scored_until))
        scored_until = s + w
    return out


def bits_per_byte(loss: float, tokens: int, num_bytes: int) -> float:
    """Total loss in bits over the bytes it covers: loss (nats/token) * tokens / (ln 2 * bytes)."""
    return loss * tokens / (math.log(2) * num_bytes)


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 length of each token id of `tokenizer` (end-of-text: 0), for counting the bytes of a token array.

    The bytes of a token sequence are the concatenation of each token's bytes, so a lookup table gives exact
    byte counts of any split without decoding it.
    """
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    if tokenizer.eot_id is not None:
        lengths[tokenizer.eot_id] = 0
    return lengths


def count_bytes(tokens: np.ndarray, byte_lengths: np.ndarray, chunk: int = 1 << 22) -> int:
    """UTF-8 bytes of a token array, in chunks so a 100M-token split needs no int64 copy of itself."""
    return sum(int(byte_lengths[tokens[i : i + chunk]].sum()) for i in range(0, len(tokens), chunk))


def _batches(plan: Sequence[tuple[int, int]], batch_size: int) -> Iterator[Sequence[tuple[int, int]]]:
    for i in range(0, len(plan), batch_size):
        yield plan[i : i + batch_size]


@torch.no_grad()
def _check_windows(
    tokens: np.ndarray, block_size: int, window: Optional[int], stride: Optional[int]
) -> tuple[int, int]:
    """The window (default block_size) and stride (default window // 2), checked against the text and model."""
    if tokens.ndim != 1 or tokens.size < 2:
        raise UserError(f"need at least 2 tokens to score a text, got {tokens.size}")
    window = window or block_size
    if window > block_size:
        raise UserError(f"window={window} exceeds the model's block_size {block_size}; lower it")
    stride = stride or max(1, window // 2)
    if stride > window:
        raise UserError(f"stride={stride} is larger than window={window}: tokens would be skipped")
    return window, stride


def _scored_nll(
    model: GPT, tokens: np.ndarray, batch: list[tuple[int, int]], w: int, device: torch.device, dtype: torch.dtype
) -> float:
    """The summed negative log-likelihood of the scored targets of one batch of (start, n_scored) windows of
    `w` tokens: the last n_scored positions of each (the others are context)."""
    idx = np.array([s for s, _ in batch])[:, None] + np.arange(w)  # (B, w) positions of the inputs
    x = torch.from_numpy(tokens[idx].astype(np.int64)).to(device, non_blocking=True)  # (B, w)
    y = torch.from_numpy(tokens[idx + 1].astype(np.int64)).to(device, non_blocking=True)  # (B, w)
    with autocast(device, dtype):
        logits, _ = model(x)  # (B, w, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(len(batch), w)
    n_scored = torch.tensor([n for _, n in batch], device=device)
    scored = torch.arange(w, device=device)[None, :] >= (w - n_scored)[:, None]  # (B, w)
    return nll[scored].double().sum().item()


def evaluate(
    model: GPT,
    tokens: np.ndarray | torch.Tensor,
    *,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    byte_lengths: Optional[np.ndarray] = None,
    progress: bool = False,
) -> PerplexityResult:
    """Score a 1-D token sequence with sliding windows (see the module docstring).

    `window` defaults to the model's block_size, `stride` to window // 2. `byte_lengths` (from
    `token_byte_lengths`) enables bits per byte. Losses are accumulated in float64; logits are upcast to fp32
    before the cross-entropy, so bf16 autocast only affects the matmuls.
    """
    device = torch.device(device)
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)  # stays uint16
    window, stride = _check_windows(tokens, model.config.block_size, window, stride)
    num_targets = tokens.size - 1
    model.eval()
    total = 0.0
    bar = progress_bar(total=num_targets, unit="tok", desc="perplexity", disable=not progress, dynamic_ncols=True)
    for batch in _batches(windows(num_targets, window, stride), batch_size):
        total += _scored_nll(model, tokens, batch, min(window, num_targets), device, dtype)
        bar.update(sum(n for _, n in batch))
    bar.close()

    loss = total / num_targets
    num_bytes = count_bytes(tokens[1:], byte_lengths) if byte_lengths is not None else None
    bpb = bits_per_byte(loss, num_targets, num_bytes) if num_bytes else None
    return PerplexityResult(
        tokens=num_targets,
        loss=loss,
        perplexity=math.exp(loss),
        bytes=num_bytes,
        bits_per_byte=bpb,
        window=window,
        stride=stride,
    )


def text_tokens(path: str | Path, tokenizer: Any) -> np.ndarray:
    """A UTF-8 text file as tokens. With an end-of-text token (GPT-2) it is prepended as the context of the
    first token, as OpenAI and the Eleuther harness do, so every token of the text is scored and the byte
    count is exactly the file's."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {path} does not exist; pass text=<path to a UTF-8 text file>") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"text file {path} is empty; give a file with some text in it")
    ids = tokenizer.encode(text)
    if tokenizer.eot_id is not None:
        ids = [tokenizer.eot_id] + ids
    if len(ids) < 2:
        raise UserError(f"text file {path} is a single token long; need at least 2 tokens to score")
    return np.asarray(ids, dtype=np.int64)


def split_tokens(data: str, data_root: str, split: str, tokenizer: Any) -> np.ndarray:
    """All tokens of a prepared dataset's split (its shards in order, memory-mapped and concatenated).

    The dataset's tokenizer must be the model's: ids of one vocabulary mean nothing to another.
    """
    ds = open_dataset(data, data_root=data_root)
    ds.check_tokenizer(tokenizer.to_dict(), what="the model")
    parts = [ds.tokens(shard) for shard in ds.shards(split)]
    if not parts or sum(len(p) for p in parts) < 2:
        raise UserError(f"dataset {data} has no {split} tokens in {ds.dir}; prepare it with a {split} split")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def run(cfg: PerplexityConfig) -> PerplexityResult:
    """The `perplexity` command: load the model and the text, score it, print and return the result."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = loading.load_either(cfg.checkpoint, cfg.init_from, device)
    model, tokenizer, what = loaded.model, loaded.tokenizer, loaded.description
    if cfg.text:
        tokens, where = text_tokens(cfg.text, tokenizer), cfg.text
    else:
        tokens, where = split_tokens(cfg.data, cfg.data_root, cfg.split, tokenizer), f"{cfg.data}/{cfg.split}"
    if cfg.max_tokens is not None:
        tokens = tokens[: cfg.max_tokens]
    window = cfg.window or model.config.block_size
    stride = cfg.stride or max(1, window // 2)
    print(f"perplexity of {what} on {where}: {len(tokens):,} tokens, window {window}, stride {stride}, {dtype}")
    result = evaluate(
        model,
        tokens,
        window=window,
        stride=stride,
        batch_size=cfg.batch_size,
        device=device,
        dtype=dtype,
        byte_lengths=token_byte_lengths(tokenizer),
        progress=True,
    )
    print(result.summary(), flush=True)
    return result


@exit_on_user_error
def main(argv: Sequence[str]) -> dict:
    """`python -m gpt2.eval perplexity key=value ...`."""
    return asdict(run(parse(PerplexityConfig, argv, prefix="perplexity")))
