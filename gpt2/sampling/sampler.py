"""`Sampler`: a model, its tokenizer and a device policy, ready to sample text (the notebook API, and what
`sample.py` and the server build on). `generate` -> list of texts, `stream` -> iterator of text pieces."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gpt2 import chat, loading
from gpt2.config import GenerationSettings
from gpt2.device import resolve_device, resolve_dtype
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.sampling.engine import DecodeFn, decode_step, generate, use_decode_linears, window_size
from gpt2.sampling.text import TextStream

NO_CHAT_TEMPLATE = (
    "this model has no chat template: it was not fine-tuned on chats (data=instructions with messages rows); "
    "fine-tune it on chats, or give it a plain text prompt"
)


class Sampler:
    """A model and its tokenizer, ready to sample text.

        s = Sampler.from_checkpoint("out/shakespeare_char")      # or Sampler.from_pretrained("gpt2")
        texts = s.generate("ROMEO:", num_samples=3, max_new_tokens=100, temperature=0.8, seed=1)
        for piece in s.stream("ROMEO:", max_new_tokens=100): print(piece, end="", flush=True)

    `generate` returns the continuations (the prompt not included). Keyword arguments are the fields of
    `GenerationSettings`. The Sampler takes over `model`: it is moved, cast and (on CPU) given the Linears
    that decode fastest there for each call's number of rows (`use_decode_linears`), in place.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        *,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        compile: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device)  # weights and KV cache: no fp32 master copy
        self.model = model.eval().to(device=self.device, dtype=self.dtype)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        """The model's chat template (gpt2.chat), None for a model never tuned on chats."""
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        # The compiled decode step lives on this object (never rebinding module globals). It runs on static KV
        # caches, whose shapes and addresses never change from token to token: one compilation per cache size,
        # replayed as a CUDA graph on GPUs. (On CPU the compiled step is no faster than eager: BENCHMARKS.md.)
        self.static = compile
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.decode: DecodeFn = torch.compile(decode_step, mode=mode) if compile else decode_step

    @classmethod
    def load(cls, checkpoint: str | None, init_from: str | None, **kwargs: Any) -> "Sampler":
        """From a checkpoint if given, else from `init_from` (the `checkpoint=` / `init_from=` keys)."""
        loaded = loading.load_either(checkpoint, init_from)
        return cls(loaded.model, loaded.tokenizer, chat_template=loaded.chat_template, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> "Sampler":
        """From one of our checkpoints: a run's out_dir or a .pt file (model config and tokenizer inside)."""
        return cls.load(str(path), None, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs: Any) -> "Sampler":
        """From OpenAI's weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face-layout directory,
        with the GPT-2 tokenizer."""
        return cls.load(None, name_or_dir, **kwargs)

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

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation ({role, content} messages) -> the ids of its prompt under the model's chat template,
        generation prompt included; UserError for a model without one."""
        if not self.chat_template:
            raise UserError(NO_CHAT_TEMPLATE)
        return self.tokenizer.encode_rendered(chat.render(self.chat_template, messages))

    def prepare_for(self, rows: int) -> None:
        """Give the model the Linears that decode `rows` sequences at once fastest (CPU only; see
        `use_decode_linears`)."""
        if self.device.type == "cpu":
            use_decode_linears(self.model, rows)

    def new_generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def stream_rows(
        self, prompts: list[str | list[int]], *, generator: torch.Generator | None = None, **settings: Any
    ) -> Iterator[tuple[int, str]]:
        """Continue each of `prompts` (text or token ids; any lengths, repeats allowed) as one batch, a row each;
        yield (row, text piece) as text becomes safe to show (see TextStream). Every row ends with a (possibly
        empty) final piece."""
        generation = GenerationSettings(**settings)
        rows = [p if isinstance(p, list) else self.encode_prompt(p, generation.max_new_tokens) for p in prompts]
        self.prepare_for(len(rows))
        generator = generator or self.new_generator(generation.seed)
        eot = None if generation.ignore_eot else self.tokenizer.eot_id
        streams = [TextStream(self.tokenizer, generation.stop) for _ in rows]
        done = [False] * len(rows)
        steps = generate(
            self.model,
            rows,
            generation.max_new_tokens,
            generation.params,
            eot_id=eot,
            generator=generator,
            decode=self.decode,
            static=self.static,
        )
        for tokens in steps:
            yield from _text_pieces(tokens.tolist(), streams, done, eot)
            if all(done):
                return
        for row in range(len(rows)):
            if not done[row]:
                yield row, streams[row].finish()

    def generate(
        self, prompts: str | list[str], num_samples: int = 1, *, batch_size: int = 8, **settings: Any
    ) -> list[str]:
        """`num_samples` continuations of each prompt (a string or a list of them), in input order, generated
        in batches of up to `batch_size` rows whatever the prompts' lengths."""
        return [
            text
            for batch in self.generate_batches(prompts, num_samples, batch_size=batch_size, **settings)
            for text in batch
        ]

    def generate_batches(
        self,
        prompts: str | list[str],
        num_samples: int = 1,
        *,
        batch_size: int = 8,
        on_piece: Callable[[], Any] | None = None,
        **settings: Any,
    ) -> Iterator[list[str]]:
        """`generate`, yielding each batch's continuations as soon as the batch is done (so a long run can
        save what it has); `on_piece` is called for every text piece (roughly every token), for progress."""
        generation = GenerationSettings(**settings)
        generator = self.new_generator(generation.seed)
        rows = [p for p in ([prompts] if isinstance(prompts, str) else prompts) for _ in range(num_samples)]
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            texts = [""] * len(batch)
            for row, piece in self.stream_rows(batch, generator=generator, **asdict(generation)):
                texts[row] += piece
                if on_piece is not None:
                    on_piece()
            yield texts

    def stream(self, prompt: str, **settings: Any) -> Iterator[str]:
        """One continuation of `prompt`, as text pieces while they are generated."""
        for _, piece in self.stream_rows([prompt], **settings):
            if piece:
                yield piece


def _text_pieces(
    tokens: list[int], streams: list[TextStream], done: list[bool], eot: int | None
) -> Iterator[tuple[int, str]]:
    """The (row, text piece) pairs that one step's tokens release. A row ends (`done`) at end-of-text or a stop
    string, with a final (possibly empty) piece."""
    for row, token in enumerate(tokens):
        if done[row]:
            continue
        if token == eot:
            done[row] = True
            yield row, streams[row].finish()
            continue
        piece = streams[row].push(token)
        if piece:
            yield row, piece
        if streams[row].stopped:
            done[row] = True
            yield row, ""
