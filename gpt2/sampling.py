"""Sampling: pure functions over logits, a KV-cached generator of token ids, and the text layer on top.

Layers, bottom to top:
- `apply_temperature`, `top_k_filter`, `top_p_filter`, `apply_repetition_penalty`, `sample_next_token`: pure
  functions over a (B, V) logits tensor, in fp32; temperature 0 is argmax; randomness only from an explicit
  `torch.Generator`.
- `prefill`, `decode_step`, `generate`: the engine. `generate` prefills the prompt once into a KV cache
  allocated once per call, then yields one (B,) tensor of token ids per step. Rows that emitted end-of-text
  stop (their later entries are -1) and generation ends when every row has; past `block_size` the context
  window slides (the last half of the context is re-prefilled) instead of failing.
- `TextStream`: turns a row's token ids into text pieces, holding back incomplete UTF-8 and any tail that could
  still become a stop string.
- `Sampler`: model + tokenizer + device policy, the notebook API (`generate` -> list of texts, `stream` ->
  iterator of text pieces). `run(cfg)` is the `sample.py` command on top of it.

References: nanochat `engine.py` (sample_next_token), gpt-fast `generate.py` (prefill/decode split, sampling
without a host sync), litgpt `generate/base.py` (stop handling).
"""

from __future__ import annotations

import codecs
import json
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import hydra
import torch
import torch.nn as nn

from gpt2.config import SampleConfig, check_sampling, to_object  # importing gpt2.config registers `sample_schema` with Hydra
from gpt2.errors import UserError, exit_on_user_error
from gpt2.model import GPT, KVCache
from gpt2.resources import CONFIG_DIR

# ----------------------------------------------------------------------------------------------------------
# Pure functions over logits (B, V). They never modify their input.


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


# ----------------------------------------------------------------------------------------------------------
# The engine: prefill, decode_step, generate.


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. See `sample_next_token` and `apply_repetition_penalty`."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def _last_logits(model: GPT, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """The model's forward pass with the LM head applied to the last position only -> logits (B, V) fp32.

    Same math as `GPT.forward` (the cached-vs-uncached test compares them); skipping the LM head on the other
    positions saves a (B, T, Vp) tensor that is 200 MB for a 1024-token GPT-2 prompt.
    """
    tr = model.transformer
    start = kv_cache.pos
    pos = torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
    x = tr.wte(idx) + tr.wpe(pos)  # (B, T, C); dropout is off at inference
    for block in tr.h:
        x = block(x, kv_cache)
    kv_cache.advance(idx.size(1))
    x = tr.ln_f(x[:, -1])  # (B, C)
    return model.lm_head(x)[:, : model.config.vocab_size].float()  # (B, V)


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
    return _last_logits(model, idx, kv_cache)


def decode_step(model: GPT, token: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Feed one token per row, token (B, 1), at the cache's position. Returns next-token logits (B, V) fp32."""
    return _last_logits(model, token, kv_cache)


DecodeFn = Callable[[GPT, torch.Tensor, KVCache], torch.Tensor]


def window_size(block_size: int) -> int:
    """Tokens kept when the context slides past block_size: the last half, so each re-prefill buys
    block_size // 2 cached steps."""
    return max(1, block_size // 2)


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

    The KV cache is allocated once, for min(T + max_new_tokens, block_size) positions. When it is full (only
    when T + max_new_tokens > block_size), the context slides: the last `window_size(block_size)` tokens (the
    new one included) are prefilled again and decoding goes on.
    `decode` is the decode-step function (e.g. a torch.compile'd `decode_step`).
    """
    B, T = idx.shape
    block_size = model.config.block_size
    if not 1 <= T <= block_size:
        raise ValueError(f"prompt length {T} must be in [1, block_size={block_size}]")
    device = idx.device
    dtype = model.lm_head.weight.dtype
    cache = KVCache(model.config, B, min(T + max_new_tokens, block_size), device=device, dtype=dtype)
    context = torch.empty(B, block_size, dtype=torch.long, device=device)  # the tokens the cache holds
    context[:, :T] = idx
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, True)
    finished = torch.zeros(B, dtype=torch.bool)  # on the CPU, next to the yielded tokens
    keep = window_size(block_size)

    logits = prefill(model, idx, cache)
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
            if bool(finished.all()):
                return
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if cache.pos < cache.max_len:
            context[:, cache.pos] = token
            logits = decode(model, token[:, None], cache)
        else:  # the cache is full: slide the window and re-prefill
            window = torch.cat([context[:, block_size - keep + 1 :], token[:, None]], dim=1)  # (B, keep)
            context[:, :keep] = window
            logits = prefill(model, window, cache)


# ----------------------------------------------------------------------------------------------------------
# Text: stop strings and incremental decoding.


class TextStream:
    """One sample's text, fed token by token; `push` returns the text that is now safe to show.

    Text is held back while it ends in an incomplete UTF-8 sequence (a BPE token can hold part of a
    character) or in a prefix of a stop string. When a stop string appears, the text before it is final and
    `stopped` becomes True; the stop string itself is not part of the output.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (stop string cut off once found)
        self.shown = 0  # characters of `text` already returned
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        new = self._utf8.decode(self.tokenizer.decode_bytes([token]))
        if self.stop and new:
            # A stop string can only newly appear in the part that overlaps the new text.
            lookback = max(len(s) for s in self.stop) - 1
            begin = max(0, len(self.text) - lookback)
            self.text += new
            hits = [i for s in self.stop if (i := self.text.find(s, begin)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held())
        self.text += new
        return self._release(len(self.text))

    def finish(self) -> str:
        """Flush everything held back (the sample ended without completing a stop string)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return piece


# ----------------------------------------------------------------------------------------------------------
# The notebook API.


@dataclass
class GenerationSettings:
    """Everything that shapes a sample besides the prompt (also what `output=` records per line). Defaults and
    meanings are SampleConfig's, except `seed`: None (a fresh random seed) for the Python API."""

    max_new_tokens: int = SampleConfig.max_new_tokens
    temperature: float = SampleConfig.temperature
    top_k: int = SampleConfig.top_k
    top_p: float = SampleConfig.top_p
    repetition_penalty: float = SampleConfig.repetition_penalty
    stop: list[str] = field(default_factory=list)
    ignore_eot: bool = SampleConfig.ignore_eot
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


class Sampler:
    """A model and its tokenizer, ready to sample text.

        s = Sampler.from_checkpoint("out/shakespeare_char")      # or Sampler.from_pretrained("gpt2")
        texts = s.generate("ROMEO:", num_samples=3, max_new_tokens=100, temperature=0.8, seed=1)
        for piece in s.stream("ROMEO:", max_new_tokens=100): print(piece, end="", flush=True)

    `generate` returns the continuations (the prompt not included). Keyword arguments are the fields of
    `GenerationSettings`. The Sampler takes over `model`: it is moved, cast and (on CPU) re-laid out in place.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        *,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        compile: bool = False,
    ) -> None:
        from gpt2.device import resolve_device, resolve_dtype

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device)  # weights and KV cache: no fp32 master copy
        self.model = model.eval().to(device=self.device, dtype=self.dtype)
        if self.device.type == "cpu":
            use_decode_layout(self.model)
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        # The compiled decode step lives on this object (never rebinding module globals). Its sequence
        # length changes every step, so it is compiled with dynamic shapes.
        self.decode: DecodeFn = torch.compile(decode_step, dynamic=True) if compile else decode_step

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> "Sampler":
        """From one of our checkpoints: a run's out_dir or a .pt file (model config and tokenizer inside)."""
        from gpt2.checkpoint import load_model

        model, tokenizer, _ = load_model(path, "cpu")
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs: Any) -> "Sampler":
        """From OpenAI's weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face-layout directory,
        with the GPT-2 tokenizer."""
        from gpt2.tokenizer import GPT2Tokenizer

        return cls(GPT.from_pretrained(name_or_dir), GPT2Tokenizer(), **kwargs)

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Prompt text -> ids. Empty starts from end-of-text (gpt2) or a newline (char). A prompt longer than
        the context keeps its last max(block_size - max_new_tokens, block_size // 2) tokens, with a warning."""
        tok = self.tokenizer
        if prompt:
            ids = tok.encode(prompt)
        elif tok.eot_id is not None:
            ids = [tok.eot_id]
        else:
            ids = tok.encode("\n") if "\n" in getattr(tok, "chars", []) else [0]
        block_size = self.model.config.block_size
        if len(ids) > block_size:
            keep = max(block_size - max_new_tokens, window_size(block_size))
            warnings.warn(
                f"the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
                f"keeping its last {keep}",
                stacklevel=3,
            )
            ids = ids[-keep:]
        return ids

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def stream_batch(
        self, prompt: str, num_samples: int = 1, *, generator: torch.Generator | None = None, **settings: Any
    ) -> Iterator[tuple[int, str]]:
        """Generate `num_samples` continuations of `prompt` as one batch; yield (row, text piece) as text
        becomes safe to show (see TextStream). Every row ends with a (possibly empty) final piece."""
        gs = GenerationSettings(**settings)
        ids = self.encode_prompt(prompt, gs.max_new_tokens)
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)  # (B, T)
        generator = generator or self._generator(gs.seed)
        eot = None if gs.ignore_eot else self.tokenizer.eot_id
        streams = [TextStream(self.tokenizer, gs.stop) for _ in range(num_samples)]
        done = [False] * num_samples
        for tokens in generate(self.model, idx, gs.max_new_tokens, gs.params, eot_id=eot, generator=generator,
                               decode=self.decode):
            for row, t in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if t == eot:
                    done[row] = True
                    yield row, streams[row].finish()
                    continue
                piece = streams[row].push(t)
                if piece:
                    yield row, piece
                if streams[row].stopped:
                    done[row] = True
                    yield row, ""
            if all(done):
                return
        for row in range(num_samples):
            if not done[row]:
                yield row, streams[row].finish()

    def generate(self, prompt: str, num_samples: int = 1, *, batch_size: int = 8, **settings: Any) -> list[str]:
        """`num_samples` continuations of `prompt`, generated in batches of up to `batch_size`."""
        return [text for batch in self.generate_batches(prompt, num_samples, batch_size=batch_size, **settings)
                for text in batch]  # fmt: skip

    def generate_batches(
        self, prompt: str, num_samples: int = 1, *, batch_size: int = 8, on_piece: Callable[[], Any] | None = None,
        **settings: Any,
    ) -> Iterator[list[str]]:
        """`generate`, yielding each batch's continuations as soon as the batch is done (so a long run can
        save what it has); `on_piece` is called for every text piece (roughly every token), for progress."""
        gs = GenerationSettings(**settings)
        generator = self._generator(gs.seed)
        for start in range(0, num_samples, batch_size):
            batch = [""] * min(batch_size, num_samples - start)
            for row, piece in self.stream_batch(prompt, len(batch), generator=generator, **asdict(gs)):
                batch[row] += piece
                if on_piece is not None:
                    on_piece()
            yield batch

    def stream(self, prompt: str, **settings: Any) -> Iterator[str]:
        """One continuation of `prompt`, as text pieces while they are generated."""
        for _, piece in self.stream_batch(prompt, 1, **settings):
            if piece:
                yield piece


# ----------------------------------------------------------------------------------------------------------
# The command line: `python sample.py checkpoint=out/run prompt="..."` (see configs/sample.yaml).


def unescape(text: str) -> str:
    r"""Command-line text with `\n`, `\t` and `\\` turned into newline, tab and backslash (Hydra passes them
    through literally, and a stop string of two newlines is common)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt text: `prompt_file` or `prompt=FILE:path` reads a file, `prompt=-` reads stdin; a prompt
    typed on the command line goes through `unescape`."""
    if prompt_file and prompt:
        raise UserError("give either prompt=... or prompt_file=..., not both")
    if prompt.startswith("FILE:"):
        prompt_file = prompt[len("FILE:") :]
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {prompt_file} does not exist; check the path")
        return path.read_text(encoding="utf-8")
    if prompt == "-":
        return sys.stdin.read()
    return unescape(prompt)


def run(cfg: Any) -> list[str]:
    """Sample as `cfg` (a SampleConfig or Hydra DictConfig) says; print the samples; return them."""
    c = cfg if isinstance(cfg, SampleConfig) else to_object(cfg, SampleConfig)
    if c.output:  # before any work: a path that cannot be written would lose every sample at the end
        _append_samples(c.output, [], {})
    prompt = read_prompt(c.prompt, c.prompt_file)
    greedy_fp32 = c.dtype == "auto" and c.temperature == 0  # greedy text must equal other tools' (fp32) text
    kwargs = dict(device=c.device, dtype="float32" if greedy_fp32 else c.dtype, compile=c.compile)
    if c.checkpoint:
        sampler = Sampler.from_checkpoint(c.checkpoint, **kwargs)
    else:
        sampler = Sampler.from_pretrained(str(c.init_from), **kwargs)
    settings = GenerationSettings(
        max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
        repetition_penalty=c.repetition_penalty, stop=[unescape(x) for x in c.stop], ignore_eot=c.ignore_eot, seed=c.seed,
    )
    sampler.encode_prompt(prompt, c.max_new_tokens)  # bad prompt characters fail before any work
    stream = c.stream if c.stream is not None else (c.num_samples == 1 and sys.stdout.isatty())

    source = {"checkpoint": c.checkpoint} if c.checkpoint else {"init_from": c.init_from}
    record = {"prompt": prompt, "settings": {**source, **asdict(settings), "device": str(sampler.device),
                                             "dtype": str(sampler.dtype).removeprefix("torch.")}}  # fmt: skip
    samples: list[str] = []
    # Each sample is printed, and appended to `output`, as soon as it is done: an interrupt loses none.
    for texts in (_stream_one_by_one if stream else _in_batches)(sampler, prompt, c, settings):
        if c.output:
            _append_samples(c.output, texts, record)
        samples += texts
    return samples


def _stream_one_by_one(sampler: Sampler, prompt: str, c: SampleConfig, settings: GenerationSettings
                       ) -> Iterator[list[str]]:
    """Samples one at a time, each printed token by token as it comes."""
    generator = sampler._generator(settings.seed)
    for _ in range(c.num_samples):
        print(prompt, end="", flush=True)
        text = ""
        for _, piece in sampler.stream_batch(prompt, 1, generator=generator, **asdict(settings)):
            text += piece
            print(piece, end="", flush=True)
        print("\n" + "-" * 40, flush=True)
        yield [text]


def _in_batches(sampler: Sampler, prompt: str, c: SampleConfig, settings: GenerationSettings
                ) -> Iterator[list[str]]:
    """Samples a batch at a time, printed when the batch is done, with a progress bar on stderr meanwhile."""
    from gpt2.progress import progress_bar

    with progress_bar(total=c.num_samples * c.max_new_tokens, unit="tok", desc="sampling") as bar:
        for texts in sampler.generate_batches(prompt, c.num_samples, batch_size=c.batch_size, on_piece=bar.update,
                                              **asdict(settings)):  # fmt: skip
            for text in texts:
                bar.write(prompt + text + "\n" + "-" * 40, file=sys.stdout)
            yield texts


def _append_samples(path: str, texts: list[str], record: dict) -> None:
    """One JSON line per sample ({prompt, sample, settings}) appended to `path`; UserError if it cannot be."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"prompt": record["prompt"], "sample": text, "settings": record["settings"]}) + "\n")
    except OSError as e:
        raise UserError(f"output={path} cannot be written ({e.strerror}); choose a writable path") from None


def main() -> None:
    """Console script `gpt2-sample`: the same command as `python sample.py`."""
    from gpt2.cli import quote_free_text

    sys.argv = quote_free_text(sys.argv)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")(exit_on_user_error(run))()
