"""Tokenizers: GPT-2 BPE (tiktoken) and a character vocabulary built from a corpus.

Both have the same small interface (`encode`, `decode`, `vocab_size`, `eot_id`) and serialise to a plain dict
(`to_dict`) that datasets store in meta.json and checkpoints store next to the weights, so sampling and
fine-tuning never need a tokenizer flag. `from_dict` is the inverse.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from gpt2.errors import UserError

GPT2_EOT = 50256


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int | None
    """End-of-text id that separates documents, or None (char vocabularies have none)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict: ...


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE through `tiktoken.get_encoding("gpt2")`; end-of-text is 50256.

    tiktoken downloads the vocabulary once into its cache; offline, set TIKTOKEN_CACHE_DIR to a directory that
    holds it (see README, "Offline use").
    """

    name = "gpt2"
    vocab_size = 50257
    eot_id: int | None = GPT2_EOT

    def __init__(self) -> None:
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network or cache problems surface as requests/OS errors
            raise UserError(
                "cannot load tiktoken's 'gpt2' vocabulary (no network?): set TIKTOKEN_CACHE_DIR to a directory "
                f"holding tiktoken's cached gpt2 files ({type(e).__name__}: {e})"
            ) from e

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens in the text are encoded as ordinary text, never as end-of-text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids`: streaming decoders use it to hold back incomplete UTF-8 sequences."""
        return self._enc.decode_bytes(list(ids))

    def to_dict(self) -> dict:
        return {"name": "gpt2"}


class CharTokenizer:
    """A character vocabulary: id i is `chars[i]`. Built from a corpus with `from_text`."""

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("char vocabulary has duplicate characters")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in this char vocabulary ({self.vocab_size} characters)"
            ) from None

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict:
        return {"name": "char", "chars": self.chars}


def from_dict(d: dict) -> GPT2Tokenizer | CharTokenizer:
    """Rebuild a tokenizer from `to_dict()` output (as stored in meta.json and checkpoints)."""
    name = d.get("name")
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        return CharTokenizer(d["chars"])
    raise UserError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")


def get_tokenizer(name: str) -> GPT2Tokenizer:
    """A tokenizer that needs no corpus, by name (only `gpt2`; char vocabularies come from `from_dict`)."""
    if name != "gpt2":
        raise UserError(f"unknown tokenizer {name!r}; 'gpt2' is built in, 'char' is built from a corpus")
    return GPT2Tokenizer()
