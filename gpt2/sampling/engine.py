"""The engine: `Batch` (rows of a KV cache that start, decode and slide on their own), `decode_step`, and
`generate` -> token ids.

`generate` prefills each prompt once into a KV cache allocated once per call, then yields one (B,) tensor of
token ids per step. Prompts may differ in length: each row has its own positions. Rows that emitted end-of-text
stop (their later entries are -1) and generation ends when every row has; past `block_size` a row's context
window slides (the last half of it is re-prefilled) instead of failing. Every step is the model's own
`last_logits`: there is no second copy of the forward. The server (`gpt2.serve`) drives a `Batch` itself.

References: gpt-fast `generate.py` (prefill/decode split, sampling without a host sync).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2.config import SamplingParams
from gpt2.model import GPT, KVCache
from gpt2.sampling.logits import Penalties, sample_next_token

DEFAULT_PARAMS = SamplingParams()


@torch.no_grad()
def use_decode_linears(model: GPT, rows: int = 1) -> GPT:
    """Make every Linear of `model` (the LM head too) the fast kind for decoding `rows` sequences at once on this
    CPU, in place. On CPUs with native bf16: a `PackedLinear` (a copy of its weight prepacked for oneDNN, made
    once: this costs the weights' size again). Elsewhere: a `RowBlockLinear`, its weight in nn.Linear's (out,
    in) layout; but for one row of an fp32 model every weight (the tied `wte`/`lm_head` matrix too) is stored as
    the transpose of a contiguous (in, out) tensor instead: same shapes and values, other strides; one weight is
    copied at a time and nothing is kept twice. Either way parameters, state dict and training stay
    nn.Linear's. Returns `model` (a no-op when it is already so).

    Why: on CPU, decoding is a chain of matrix products of few rows, bound by memory bandwidth, and PyTorch's
    usual kernels leave cores idle on them: split into one block per thread, they use every core. MKL streams
    one fp32 row fastest through the (in, out) layout, more rows through (out, in). Where the CPU has native
    bf16, oneDNN's products against a prepacked weight are the fast ones, in bf16 and fp32 (bench/sample.py and
    BENCHMARKS.md have the figures). The sampler uses this on CPU.
    """
    if prepacking_pays():
        for module in model.modules():
            if type(module) in (nn.Linear, PackedLinear):  # not LoRA's layers, whose forward is their own
                PackedLinear.adopt(module)
        return model
    linears = [m for m in model.modules() if type(m) in (nn.Linear, RowBlockLinear) and m is not model.lm_head]
    transposed = rows == 1 and model.lm_head.weight.dtype == torch.float32
    wte = model.transformer.wte
    if wte.weight.is_contiguous() == transposed:  # not stored that way yet
        for module in [*linears, wte]:
            data = module.weight.t().contiguous().t() if transposed else module.weight.contiguous()
            module.weight = nn.Parameter(data, requires_grad=False)
        model.lm_head.weight = wte.weight  # keep the tie
    for module in [*linears, model.lm_head]:
        RowBlockLinear.adopt(module)
    return model


def prepacking_pays() -> bool:
    """Whether oneDNN's prepacked products are the fast ones for decoding here: CPUs with native bf16 (AVX512-BF16
    or AMX), where they were measured; elsewhere MKL's and PyTorch's own kernels were."""
    has = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(check() for check in has)  # (private: looked up with care)


class PackedLinear(nn.Linear):
    """An nn.Linear that also holds its weight reordered for oneDNN (`packed`), used when nothing needs gradients
    and torch.compile is not tracing (inductor lays out weights itself): parameters, state dict and training are
    nn.Linear's. The packed copy costs the weight's size again."""

    packed: torch.Tensor
    packed_from: tuple  # where and how the weight `packed` was made from lies: a new layout packs again

    @staticmethod
    def adopt(module: nn.Linear) -> None:
        if isinstance(module, PackedLinear) and module.is_current():
            return
        module.__class__ = PackedLinear
        module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1)
        module.packed_from = (module.weight.data_ptr(), module.weight.stride(), module.weight.dtype)

    def is_current(self) -> bool:
        return self.packed_from == (self.weight.data_ptr(), self.weight.stride(), self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.compiler.is_compiling()
            or not self.is_current()
            or x.dtype != self.weight.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


class RowBlockLinear(nn.Linear):
    """An nn.Linear whose fp32 products of at most `MAX_ROWS` rows (decoding) with a weight of at least
    `MIN_WEIGHT` elements, when nothing needs gradients and torch.compile is not tracing, split the weight's
    storage into one block of rows per thread: one batched product over the blocks, each block on a core of its
    own, as llama.cpp shares a matrix-vector product among its threads. Stored (out, in), a block is a slice of
    the outputs; stored (in, out) (see `use_decode_linears`), a slice of the inputs, whose partial products are
    summed. Such products are bound by memory bandwidth, which one core does not reach, and MKL's products of
    few rows were measured keeping to one core. A block is a view: nothing is copied. Parameters, state dict
    and training are nn.Linear's."""

    MAX_ROWS = 64  # measured against MKL's own product: faster up to 64 rows, even at 128, slower at 512
    MIN_WEIGHT = 1 << 17  # elements (512 KB in fp32): a smaller product does not repay waking the other threads

    @staticmethod
    def adopt(module: nn.Linear) -> None:
        module.__class__ = RowBlockLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            x.dtype != torch.float32
            or weight.dtype != torch.float32
            or weight.numel() < self.MIN_WEIGHT
            or x.numel() > self.MAX_ROWS * self.in_features
            or torch.compiler.is_compiling()  # inductor plans its own products
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        if weight.is_contiguous():  # stored (out, in): blocks of outputs, side by side
            blocks = _divisor_at_most(self.out_features, torch.get_num_threads())
            if blocks == 1:
                return super().forward(x)
            blocked = weight.view(blocks, -1, self.in_features)  # (blocks, out / blocks, in)
            columns = rows.t().expand(blocks, -1, -1)  # (blocks, in, rows)
            if self.bias is None:
                y = torch.bmm(blocked, columns)
            else:
                y = torch.baddbmm(self.bias.view(blocks, -1, 1), blocked, columns)
            y = y.permute(2, 0, 1).contiguous()  # (rows, blocks, out / blocks): a copy unless one row
        elif weight.t().is_contiguous():  # stored (in, out): blocks of inputs, their partial products summed
            blocks = _divisor_at_most(self.in_features, torch.get_num_threads())
            if blocks == 1:
                return super().forward(x)
            blocked = weight.t().view(blocks, -1, self.out_features)  # (blocks, in / blocks, out)
            parts = rows.view(-1, blocks, self.in_features // blocks).transpose(0, 1)  # (blocks, rows, in / blocks)
            y = torch.bmm(parts, blocked).sum(0)
            if self.bias is not None:
                y += self.bias
        else:
            return super().forward(x)
        return y.view(*x.shape[:-1], self.out_features)


@functools.cache
def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def decode_step(model: GPT, token: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Feed one token per row, token (B, 1), at each row's next position. Returns next-token logits (B, V) fp32.
    This is the unit `torch.compile` compiles: with a static cache its shapes never change."""
    return model.last_logits(token, kv_cache)


def cached_attention(shapes_vary: bool = True) -> contextlib.AbstractContextManager:
    """The attention kernels for passes over a KV cache whose shapes vary from pass to pass (the key length grows
    every decode step; prompts differ): any but cuDNN's, which builds an execution plan for each new shape, and so
    makes eager decoding several times slower than flash or memory-efficient attention (BENCHMARKS.md, GPU
    check). With fixed shapes (a static cache's decode step, compiled once and replayed as a CUDA graph) a plan is
    built once and the default choice stands."""
    if not shapes_vary:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


DecodeFn = Callable[[GPT, torch.Tensor, KVCache], torch.Tensor]


def window_size(block_size: int) -> int:
    """Tokens kept when a row's context slides past block_size: the last half, so each re-prefill buys
    block_size // 2 cached steps."""
    return max(1, block_size // 2)


class Batch:
    """The rows of one KV cache, each continuing its own sequence: a row starts on its own (`start`, a prefill
    of its prompt, at once or in chunks), all rows decode together one token per `step`, and a row whose context
    reaches block_size slides it (its last `window_size` tokens are re-prefilled) instead of failing. A `free`
    row idles at position 0 until it starts again, so a server's requests can join and leave a running batch.

    `static=True` makes every decode step the same shapes (see `KVCache`): compile `decode` once and it never
    recompiles, token after token. Lengths live on the host here, so no step needs a device sync.
    """

    def __init__(
        self, model: GPT, rows: int, max_len: int, *, decode: DecodeFn = decode_step, static: bool = False
    ) -> None:
        device, config = model.lm_head.weight.device, model.config
        self.model, self.decode, self.block_size = model, decode, config.block_size
        self.cache = KVCache(config, rows, max_len, device=device, dtype=model.lm_head.weight.dtype, static=static)
        self.tokens = torch.zeros(rows, max_len, dtype=torch.long)  # each row's context, on the host
        self.lengths = [0] * rows
        self.active = [False] * rows  # decoding: takes part in `step`
        self.held = [False] * rows  # prefilling a prompt in chunks: keeps its positions, skips `step`

    def start(self, row: int, ids: torch.Tensor, every_position: bool = False, complete: bool = True) -> torch.Tensor:
        """Make `row` continue prompt ids (T,) (T <= the cache's max_len); returns its next-token logits (1, V),
        or with `every_position` the logits after each prompt token (T, V), fp32 (to score the prompt). With
        `complete=False` the prompt goes on in `extend` calls (a long prompt prefilled in chunks, between other
        rows' steps): until the call that completes it, the row keeps its positions but takes no part in `step`."""
        self._set_length(row, 0)
        return self.extend(row, ids, every_position, complete)

    def extend(self, row: int, ids: torch.Tensor, every_position: bool = False, complete: bool = True) -> torch.Tensor:
        """Prefill ids (T,) after what `row` holds: the next chunk of its prompt (see `start`)."""
        begin, T = self.lengths[row], ids.size(0)
        if not 1 <= T <= self.cache.max_len - begin:
            raise ValueError(f"prompt length {begin + T} must be in [1, {self.cache.max_len}] (the KV cache's length)")
        self.tokens[row, begin : begin + T] = ids.cpu()
        self.lengths[row], self.active[row], self.held[row] = begin + T, complete, not complete
        return self._forward(ids[None], self.cache.rows(row, row + 1), every_position)

    def start_all(self, idx: torch.Tensor) -> torch.Tensor:
        """Start every row at once on prompts of one length, idx (B, T); returns logits (B, V)."""
        T = idx.size(1)
        if not 1 <= T <= self.cache.max_len:
            raise ValueError(f"prompt length {T} must be in [1, {self.cache.max_len}] (the KV cache's length)")
        self.cache.reset()
        self.tokens[:, :T] = idx.cpu()
        self.lengths, self.active = [T] * len(self.lengths), [True] * len(self.lengths)
        return self._forward(idx, self.cache)

    def free(self, row: int) -> None:
        self.active[row] = self.held[row] = False

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append token (B,) to every active row (free and held rows ignore theirs) and return the logits after
        it, (B', V) for the first B' rows, which hold every active one (B' = B with a static cache)."""
        for row, length in enumerate(self.lengths):
            if self.active[row] and length == self.cache.max_len:
                self._slide(row)
            elif not self.active[row] and not self.held[row]:
                self._set_length(row, 0)  # an idle row attends to its one position, whatever it holds
        rows = torch.arange(len(self.lengths))
        # A held row gets a placeholder at its next position (below max_len: more prompt follows), which the next
        # chunk of its prompt overwrites.
        self.tokens[rows, torch.tensor(self.lengths)] = token.cpu()
        self.lengths = [
            n + 1 if active else n if held else 0 for n, active, held in zip(self.lengths, self.active, self.held)
        ]
        # Decode the rows up to the last active one only (rows start lowest-first), unless shapes must not change.
        used = len(rows) if self.cache.static else 1 + max((r for r, a in enumerate(self.active) if a), default=0)
        cache = self.cache if used == len(rows) else self.cache.rows(0, used)
        with cached_attention(shapes_vary=not self.cache.static):
            logits = self.decode(self.model, token[:used, None], cache)
        if any(self.held):  # (a server's long prompt, prefilled in chunks; never in `generate`)
            for row in range(used):
                if self.held[row]:
                    self._set_length(row, self.lengths[row])  # the placeholder is not part of the row
        return logits

    def _forward(self, idx: torch.Tensor, cache: KVCache, every_position: bool = False) -> torch.Tensor:
        with cached_attention():
            if every_position:
                return self.model(idx.to(self.cache.k.device), kv_cache=cache)[0][0].float()
            return self.model.last_logits(idx.to(self.cache.k.device), cache)

    def _slide(self, row: int) -> None:
        """Keep the last `window_size` - 1 tokens of a full row (the next one makes `window_size`)."""
        assert self.cache.max_len == self.block_size, "only a cache of block_size positions fills up"
        keep = window_size(self.block_size) - 1
        self._set_length(row, 0)
        if keep:
            window = self.tokens[row, self.cache.max_len - keep :].clone()
            self.tokens[row, :keep] = window
            with cached_attention():
                self.model.hidden_states(window[None].to(self.cache.k.device), self.cache.rows(row, row + 1))
            self.lengths[row] = keep

    def _set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length
        self.cache.lengths[row] = length
        self.cache.host_lengths[row] = length


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = DEFAULT_PARAMS,
    *,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    decode: DecodeFn = decode_step,
    static: bool = False,
) -> Iterator[torch.Tensor]:
    """Continue prompts by up to `max_new_tokens`: a (B, T) tensor, or B lists of token ids of any lengths
    (each row then has its own positions: what a row generates does not depend on the others).

    Yields one (B,) int64 CPU tensor per step: the new token of each row. When `eot_id` is given, a row that
    emits it has finished: later steps hold -1 in its place, and the generator returns once every row has
    finished. Moving the sampled ids to the CPU is the only host sync per step.

    The KV cache is allocated once, for min(longest prompt + max_new_tokens, block_size) positions; past it a
    row's context slides (see `Batch`). `decode` is the decode-step function (e.g. a torch.compile'd
    `decode_step`); `static` gives it fixed shapes.
    """
    rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    B, longest = len(rows), max(len(r) for r in rows)
    if not 1 <= min(len(r) for r in rows) <= longest <= model.config.block_size:
        raise ValueError(f"prompt lengths must be in [1, block_size={model.config.block_size}]")
    batch = Batch(model, B, min(longest + max_new_tokens, model.config.block_size), decode=decode, static=static)
    if all(len(r) == longest for r in rows):
        logits = batch.start_all(torch.stack(rows).to(batch.cache.k.device))
    else:
        logits = torch.cat([batch.start(b, r) for b, r in enumerate(rows)])
    penalties = Penalties(params, rows, model.config.vocab_size, logits.device) if Penalties.needed(params) else None
    finished = torch.zeros(B, dtype=torch.bool)  # on the CPU, next to the yielded tokens

    for step in range(max_new_tokens):
        if penalties is not None:
            logits = penalties.apply(logits)
        token = sample_next_token(
            logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator
        )  # (B,) on device
        out = token.cpu().masked_fill(finished, -1)  # not in place: on a CPU device .cpu() is `token` itself
        yield out
        if eot_id is not None:
            finished |= out == eot_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        if penalties is not None:
            penalties.update(token)
        logits = batch.step(token)
