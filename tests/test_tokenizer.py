"""Tokenizers: GPT-2 BPE ids (against transformers' tokenizer built from the same vocab files) and char vocabularies."""

from __future__ import annotations

import json

import pytest
from conftest import GPT2_BPE, SHAKESPEARE, TIKTOKEN_CACHE

from gpt2.errors import UserError
from gpt2.tokenizer import GPT2_EOT, CharTokenizer, GPT2Tokenizer, from_dict, get_tokenizer

UNICODE = "naïve café — 東京 😀 \u200b tabs\tand\nnewlines  double  spaces ﬁ"


def test_gpt2_known_ids_and_interface():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == GPT2_EOT == 50256
    assert tok.decode([15496, 995]) == "Hello world"
    # The end-of-text marker in user text is ordinary text, never the special id.
    assert GPT2_EOT not in tok.encode("a<|endoftext|>b")
    assert tok.encode_batch(["Hello world", "x"]) == [[15496, 995], tok.encode("x")]
    assert from_dict(tok.to_dict()).encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", ["", "Hello world", UNICODE, "ROMEO:\nBut soft!  What light?\n\n"])
def test_gpt2_round_trip(text):
    tok = GPT2Tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_gpt2_ids_equal_transformers_tokenizer_on_shakespeare():
    transformers = pytest.importorskip("transformers")
    if not (GPT2_BPE / "encoder.json").exists():
        pytest.skip(f"{GPT2_BPE} is missing")
    vocab = json.loads((GPT2_BPE / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_BPE / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    theirs = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    ours = GPT2Tokenizer()

    text_lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)[:4000]
    sample = text_lines + [UNICODE, "  leading spaces", "numbers 1234567 and 3.14159"]
    got = ours.encode_batch(sample)
    want = [theirs(line, add_special_tokens=False)["input_ids"] for line in sample]
    assert sum(map(len, got)) > 30_000
    mismatches = [line for line, g, w in zip(sample, got, want) if g != w]
    assert not mismatches, mismatches[:3]
    block = "".join(text_lines[:500])  # also as one long document, across line boundaries
    assert ours.encode(block) == theirs(block, add_special_tokens=False)["input_ids"]


def test_char_round_trip_and_serialisation():
    text = "hello, wörld! 😀\n" + UNICODE
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text)) and tok.eot_id is None
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    d = tok.to_dict()
    assert d == {"name": "char", "chars": tok.chars}
    assert json.loads(json.dumps(d)) == d  # plain JSON: goes into meta.json and checkpoints
    again = from_dict(json.loads(json.dumps(d)))
    assert isinstance(again, CharTokenizer) and again.encode(text) == ids


def test_char_unknown_character_is_a_user_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match="character 'z' is not in this char vocabulary"):
        tok.encode("abz")


def test_bad_tokenizer_names():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        from_dict({"name": "bpe"})
    with pytest.raises(UserError, match="'char' is built from a corpus"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "a"])


def test_gpt2_needs_no_network_and_no_tiktoken_cache(tmp_path, monkeypatch):
    """The shipped BPE files are the whole vocabulary: tiktoken's downloader is never called."""
    import tiktoken.load

    from gpt2.tokenizer import gpt2_encoding

    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken tried to read a remote or cached file")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    gpt2_encoding.cache_clear()
    try:
        assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    finally:
        gpt2_encoding.cache_clear()


@pytest.mark.skipif(not TIKTOKEN_CACHE.exists(), reason="no downloaded tiktoken cache to compare with")
def test_gpt2_equals_tiktokens_downloaded_encoding(monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    theirs = tiktoken.get_encoding("gpt2")
    ours = GPT2Tokenizer()._enc
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000] + UNICODE + bytes(range(256)).decode("latin-1")
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.encode("a<|endoftext|>b", allowed_special="all") == theirs.encode(
        "a<|endoftext|>b", allowed_special="all"
    )
    assert ours.n_vocab == theirs.n_vocab == 50257
