"""Tokenizers: GPT-2 BPE (tiktoken) and a character vocabulary built from a corpus.

Both have the same small interface (`encode`, `decode`, `vocab_size`, `eot_id`) and serialise to a plain dict
(`to_dict`) that datasets store in meta.json and checkpoints store next to the weights, so sampling and
fine-tuning never need a tokenizer flag. `from_dict` is the inverse.
"""

from __future__ import annotations

import functools
import json
from typing import Iterable, Protocol

from gpt2.errors import UserError
from gpt2.resources import GPT2_BPE_DIR

GPT2_EOT = 50256
GPT2_EOT_TEXT = "<|endoftext|>"  # how end-of-text is written in text that templates render


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
    """OpenAI's GPT-2 BPE on tiktoken's encoder; end-of-text is 50256.

    The vocabulary is read from the BPE files shipped in the package (`gpt2.resources.GPT2_BPE_DIR`), the same
    files tiktoken's `get_encoding("gpt2")` downloads, so the tokenizer works offline and never touches the
    network or tiktoken's cache. The encoding is built once per process.
    """

    name = "gpt2"
    vocab_size = 50257
    eot_id: int | None = GPT2_EOT

    def __init__(self) -> None:
        self._enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens in the text are encoded as ordinary text, never as end-of-text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_rendered(self, text: str) -> list[int]:
        """Text a chat template rendered -> ids: there, `<|endoftext|>` is the end-of-text token (gpt2.chat)."""
        return self._enc.encode(text, allowed_special={GPT2_EOT_TEXT})

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


@functools.cache
def gpt2_encoding():
    """tiktoken's `gpt2` encoding, built from the shipped `encoder.json` (tiktoken's own pattern and special
    token). encoder.json keys are GPT-2's printable stand-ins for bytes (`bytes_to_unicode` in OpenAI's
    encoder.py): printable Latin-1 characters stand for themselves, the other 68 bytes for chr(256 + i)."""
    import tiktoken
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    encoder = json.loads((GPT2_BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(char_to_byte[c] for c in token): rank for token, rank in encoder.items() if token != ENDOFTEXT}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=GPT2Tokenizer.vocab_size,
    )


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
