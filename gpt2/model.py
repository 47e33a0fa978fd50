"""GPT-2, top to bottom as the paper and OpenAI's release define it.

References:
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
- OpenAI's TensorFlow release, github.com/openai/gpt-2 `src/model.py` (pre-LayerNorm blocks, tanh GELU).
- Hugging Face `GPT2LMHeadModel`: the module names below (`wte`, `h.N.attn.c_attn`, ...) are its names,
  so weight interop is a transposition of Conv1D weights, not a rename table (see `gpt2/hf.py`).

Notation in shape comments: B batch, T sequence length, C = n_embd, nh = n_head, hs = head size = C // nh,
V = vocab size, Vp = padded vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt2.dropout import Dropout, scaled_dot_product_attention
from gpt2.errors import UserError
from gpt2.loss import linear_cross_entropy


@dataclass
class ModelConfig:
    """The architecture a user chooses (the `model.*` config keys). Defaults are GPT-2 124M's. The vocabulary
    size is not among them: the dataset's tokenizer, or the pretrained init, decides it (`GPTConfig`)."""

    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    block_size: int = 1024
    """Context length in tokens: the number of learned positional embeddings."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual outputs (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them; False is slightly faster and as good)."""

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class GPTConfig(ModelConfig):
    """Everything that builds a GPT: the architecture and the vocabulary size."""

    vocab_size: int = 50257
    """Real vocabulary size; the embedding is padded up to a multiple of 64 (see `padded_vocab_size`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 1:
            raise UserError(f"model.vocab_size must be >= 1, got {self.vocab_size}")

    @classmethod
    def of(cls, arch: ModelConfig, vocab_size: int) -> "GPTConfig":
        return cls(**{f.name: getattr(arch, f.name) for f in fields(ModelConfig)}, vocab_size=vocab_size)

    @property
    def arch(self) -> ModelConfig:
        """The `model.*` part, without the vocabulary."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @property
    def padded_vocab_size(self) -> int:
        """`vocab_size` rounded up to a multiple of 64 (50257 -> 50304): faster matmuls on GPUs."""
        return math.ceil(self.vocab_size / 64) * 64

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


RELEASED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
"""The sizes OpenAI released weights for: the `init_from=` names, fetched from the Hugging Face hub."""

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small sizes for CPUs and tests: 0.79M and 10.6M parameters besides the embeddings (`mini` is the size of
    # nanoGPT's char-level Shakespeare).
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}
"""Every model size by name: `model=<name>` on the command line, `preset(name)` in Python."""


def preset(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a named size in PRESETS, with `overrides` (any GPTConfig field)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class KVCache:
    """Preallocated keys and values for incremental decoding, one sequence per row.

    `k` and `v` have the fixed shape (n_layer, B, nh, max_len, hs), allocated once. `lengths` (B,) holds how many
    positions each row has written, on the cache's device: rows may be at different lengths (prompts of different
    lengths; a server's requests that join and leave a running batch). A forward pass over idx (B, T) writes row
    b's keys and values at positions [lengths[b], lengths[b] + T), lets each query see the keys up to its own
    position, and advances every row by T (`begin`, `update` per layer, `advance`).

    `static=False` attends over the longest row's prefix only (host-side lengths say how long, with no device
    sync). `static=True` always attends over all `max_len` positions, masked: every decode step then has the same
    shapes and reads no host-side state, so it compiles once (and replays as a CUDA graph); the caller keeps the
    lengths on the host itself and must not write past `max_len`. `rows(i, j)` is the same cache seen as rows i..j-1.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ) -> None:
        max_len = max_len or config.block_size
        if max_len > config.block_size:
            raise ValueError(f"a KV cache of {max_len} positions exceeds the model's block_size {config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        if static:  # fixed addresses too: a compiled step that updates them in place can replay as a CUDA graph
            for tensor in (self.k, self.v, self.lengths):
                torch._dynamo.mark_static_address(tensor)
        self.host_lengths = np.zeros(batch_size, dtype=np.int64)  # `lengths` on the host, kept when not static
        self.static = static
        # Set by `begin` for one forward pass:
        self._span, self._start, self._index = max_len, None, None
        self.mask: torch.Tensor | None = None
        self.is_causal = False

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) alone, sharing this cache's storage (to prefill or reset one row of a running
        batch, or to decode only the rows in use)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.lengths = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop]
        view.host_lengths, view.static = self.host_lengths[start:stop], self.static  # numpy slice: a view
        view._span, view._start, view._index, view.mask, view.is_causal = self.max_len, None, None, None, False
        return view

    def reset(self) -> None:
        """Forget every row's positions (the tensors are reused as they are)."""
        self.lengths.zero_()
        self.host_lengths[:] = 0

    def begin(self, T: int) -> torch.Tensor:
        """Prepare a forward pass of T new positions per row; returns their positions, (B, T) or (T,) when every
        row is at the same length. Sets `mask` and `is_causal` for scaled_dot_product_attention."""
        B, nh, hs = self.k.shape[1], self.k.shape[2], self.k.shape[4]
        device = self.lengths.device
        self._start = None  # the rows' common length, when known on the host: plain slices, no per-row mask
        if not self.static:
            used = int(self.host_lengths.max())
            if used + T > self.max_len:
                raise ValueError(f"sequence of {used + T} tokens exceeds the KV cache's {self.max_len} positions")
            self._span = used + T
            if int(self.host_lengths.min()) == used:
                self._start = used
        if self._start is not None:  # one new token sees every key; a prompt from 0 is causal; a chunk after
            self.is_causal = self._start == 0 and T > 1  # a prefix sees the prefix and the causal part of itself
            self.mask = (
                None
                if T == 1 or self._start == 0
                else torch.ones(T, self._span, dtype=torch.bool, device=device).tril(diagonal=self._start)
            )
            return torch.arange(self._start, self._span, device=device)
        positions = self.lengths[:, None] + torch.arange(T, device=device)  # (B, T)
        keys = torch.arange(self._span, device=device)
        self.is_causal = False
        self.mask = (keys <= positions[:, :, None])[:, None]  # (B, 1, T, span): query sees keys up to itself
        self._index = positions[:, None, :, None].expand(B, nh, T, hs)
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at each row's new positions; return this pass's keys and values, each
        (B, nh, span, hs), to attend to with `mask` / `is_causal`."""
        if self._start is not None:
            self.k[layer, :, :, self._start : self._span] = k
            self.v[layer, :, :, self._start : self._span] = v
        else:
            self.k[layer].scatter_(2, self._index, k)
            self.v[layer].scatter_(2, self._index, v)
        return self.k[layer, :, :, : self._span], self.v[layer, :, :, : self._span]

    def advance(self, T: int) -> None:
        self.lengths += T
        if not self.static:
            self.host_lengths += T


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where each packed example begins -> (B, 1, T, T) bool attention mask:
    query t sees key s when s <= t and both lie in the same example (block-diagonal causal)."""
    T = positions.size(1)
    doc = torch.cumsum(positions == 0, dim=1)  # (B, T): which example of the row each token is in
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention through `scaled_dot_product_attention` (flash kernels on CUDA)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, doc_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, is_causal = doc_mask, doc_mask is None  # (packed rows: causal within each example)
        if kv_cache is not None:  # keys and values of the positions before these too, and which ones to see
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, span, hs)
            mask, is_causal = kv_cache.mask, kv_cache.is_causal
        y = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (tanh approximation, as OpenAI's code) -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, doc_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, doc_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model: embeddings, `n_layer` blocks, final LayerNorm, LM head tied to `wte`.

    Construction allocates parameters without setting them; call `init_weights()` for the GPT-2 init (the
    constructor does so unless built on the meta device, where loaders assign real weights instead).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.activation_checkpointing = False
        """Training memory for compute: each block keeps only its input, and recomputes the rest in backward."""
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: every Linear/Embedding weight ~ N(0, 0.02); residual projections (`attn.c_proj`,
        `mlp.c_proj`) ~ N(0, 0.02 / sqrt(2 * n_layer)); biases 0; LayerNorm weight 1, bias 0; `wte` and
        `lm_head` are one tensor. The padded vocab rows of `wte` are zero (they are never used)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.transformer.wte.weight[self.config.vocab_size :].zero_()

    def hidden_states(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx (B, T) token ids -> the final LayerNorm's output (B, T, C): everything but the LM head.
        With `kv_cache`, idx holds each row's positions after `kv_cache.lengths`, and the cache advances by T.
        With `positions` (B, T), each row is several examples packed end to end (training on packed instruction
        data): positions restart at 0 where an example begins, and a token attends only to its own example's
        tokens up to itself, so that each example's outputs are those it has alone."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the model's block_size {self.config.block_size}")
        doc_mask = None
        if positions is not None:
            pos, doc_mask = positions, document_mask(positions)
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device) if kv_cache is None else kv_cache.begin(T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:  # keep only x; recompute inside in backward
                x = torch.utils.checkpoint.checkpoint(block, x, kv_cache, doc_mask, use_reentrant=False)
            else:
                x = block(x, kv_cache, doc_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool = True,
        positions: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), loss).

        Logits cover the real vocabulary only (a view that drops the padded columns, so padding is never
        sampled). `loss` is the mean next-token cross-entropy over positions whose target is not -1, or None
        without targets. Training passes `return_logits=False`: the loss is then computed chunk by chunk from
        the hidden states (`gpt2.loss`) and the whole batch's logits never exist (logits is None).
        `reduction="none"` gives each position's loss instead, (B, T) fp32 and 0 where the target is -1, from
        the LM head applied at the targeted positions only (logits is None): per-sequence log-likelihoods (DPO).
        Selecting those positions is data-dependent, so on CUDA this path waits for the device once.
        `kv_cache` and `positions` (packed rows): see `hidden_states`.
        """
        x = self.hidden_states(idx, kv_cache, positions)
        if targets is not None and reduction == "none":
            keep = targets != -1
            logits = self.lm_head(x[keep])[:, : self.config.vocab_size]  # (targets, V)
            losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
            return None, torch.zeros(targets.shape, dtype=losses.dtype, device=x.device).masked_scatter(keep, losses)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.config.vocab_size
            )
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V), a view of (B, T, Vp)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def last_logits(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The next-token logits (B, V) in fp32 after idx (B, T): the LM head on the last position only, which
        saves the (B, T, Vp) logits of a prompt (200 MB for a 1024-token GPT-2 prompt). For generation."""
        x = self.hidden_states(idx, kv_cache)[:, -1]  # (B, C)
        return self.lm_head(x)[:, : self.config.vocab_size].float()

    @torch.no_grad()
    def crop_block_size(self, block_size: int) -> None:
        """Keep the first `block_size` positions (model surgery, as nanoGPT's): a smaller context for fine-tuning
        a pretrained model. A larger one cannot be made up: ValueError."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size {self.config.block_size} to {block_size}")
        if block_size == self.config.block_size:
            return
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].clone())

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state: dict[str, torch.Tensor]) -> "GPT":
        """A GPT holding `state`'s tensors as its parameters (no init, no copy): built on the meta device, then
        assigned. Raises RuntimeError when keys or shapes do not match `config`."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied tensor; tie again
        return model

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). `non_embedding` drops the positional embedding, as in the
        scaling-law papers; the token embedding stays since it is also the LM head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), for MFU.

        PaLM appendix B (also nanoGPT's `estimate_mfu`): 6 * N for the matmuls over N non-embedding parameters
        (2 forward, 4 backward), plus 12 * n_layer * n_embd * T for attention scores and weighted values,
        where T is the sequence length (default block_size).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T
