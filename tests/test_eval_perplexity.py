"""Perplexity: sliding windows score each token once with the context they promise, equal the plain mean loss
when windows do not overlap, give exact bits per byte, and the CLI reports bad input in one line."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, model_entries, tiny_gpt

from gpt2 import checkpoint
from gpt2.errors import UserError
from gpt2.eval import perplexity
from gpt2.model import GPT
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer


def save_checkpoint(path, model: GPT, tokenizer) -> None:
    checkpoint.save(path, {**model_entries(model), "tokenizer": tokenizer.to_dict(), "config": {}})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2.eval", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def cli_error(capsys, *args: str) -> str:
    """Run the CLI in-process (a subprocess per case costs seconds of imports); expect exit 2, return stderr."""
    from gpt2.eval.__main__ import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


@torch.no_grad()
def token_nll(model: GPT, tokens: torch.Tensor, j: int, start: int) -> float:
    """Loss of tokens[j] given exactly tokens[start:j], from one forward pass of its own."""
    logits, _ = model(tokens[start:j][None])
    return -torch.log_softmax(logits[0, -1].double(), dim=-1)[tokens[j]].item()


@pytest.mark.parametrize("n, window, stride", [(50, 16, 16), (50, 16, 5), (37, 16, 1), (10, 16, 8), (34, 16, 16)])
def test_windows_score_every_token_once_with_promised_context(n, window, stride):
    plan = perplexity.windows(n - 1, window, stride)
    w = min(window, n - 1)
    assert plan[0] == (0, w)  # the first window scores all its tokens
    scored = []
    for start, n_scored in plan:
        assert 0 <= start and start + w <= n - 1
        targets = range(start + w - n_scored + 1, start + w + 1)  # token indices this window scores
        scored += targets
        for j in targets:
            if start > 0:
                assert j - start >= window - stride  # context promised by the stride
    assert scored == list(range(1, n))


def test_stride_equal_window_is_the_plain_mean_loss_of_consecutive_chunks():
    model = tiny_gpt(vocab_size=40, block_size=16).eval()
    tokens = torch.randint(0, 40, (5 * 16 + 1,), generator=torch.Generator().manual_seed(1))
    x = tokens[:-1].view(5, 16)  # (chunks, T), as the trainer's val batches
    y = tokens[1:].view(5, 16)
    with torch.no_grad():
        _, reference = model(x, y)
    result = perplexity.evaluate(model, tokens.numpy(), window=16, stride=16, batch_size=2)
    assert result.tokens == 80
    assert result.loss == pytest.approx(reference.item(), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(reference.item()), rel=1e-6)


@pytest.mark.parametrize("n, stride", [(45, 1), (45, 5), (45, 12), (12, 4)])
def test_sliding_window_equals_brute_force_per_token(n, stride):
    window = 16
    model = tiny_gpt(vocab_size=40, block_size=window, seed=2).eval()
    tokens = torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n + stride))
    w = min(window, n - 1)
    starts = [0]  # window starts, rebuilt here from the documented rule
    while starts[-1] + w < n - 1:
        starts.append(min(starts[-1] + stride, n - 1 - w))
    nll = []
    for j in range(1, n):  # token j is scored by the first window that predicts it
        start = min(s for s in starts if s + w >= j)
        if stride == 1:
            assert start == max(0, j - window)  # stride 1: every token gets the full window of context
        nll.append(token_nll(model, tokens, j, start))
    result = perplexity.evaluate(model, tokens, window=window, stride=stride, batch_size=3)
    assert result.tokens == n - 1
    assert result.loss == pytest.approx(float(np.mean(nll)), rel=1e-5)


def test_bits_per_byte_counts_utf8_bytes_of_char_text(tmp_path):
    text = "héllo wörld ✓\nnaïve café\n" * 3
    tok = CharTokenizer.from_text(text)
    model = tiny_gpt(vocab_size=tok.vocab_size).eval()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    tokens = perplexity.text_tokens(path, tok)
    assert len(tokens) == len(text)  # no end-of-text for char vocabularies: the first char is context
    r = perplexity.evaluate(model, tokens, stride=8, byte_lengths=perplexity.token_byte_lengths(tok))
    assert r.bytes == len(text[1:].encode("utf-8"))
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / (math.log(2) * r.bytes))
    assert perplexity.bits_per_byte(math.log(2), 10, 5) == pytest.approx(2.0)  # 10 bits over 5 bytes


def test_gpt2_text_scores_every_token_and_every_byte(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ — 日本語.\n"
    tok = GPT2Tokenizer()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    tokens = perplexity.text_tokens(path, tok)
    assert tokens[0] == tok.eot_id and list(tokens[1:]) == tok.encode(text)
    model = tiny_gpt(vocab_size=tok.vocab_size, block_size=8).eval()
    r = perplexity.evaluate(model, tokens, stride=4, byte_lengths=perplexity.token_byte_lengths(tok))
    assert r.tokens == len(tok.encode(text))
    assert r.bytes == len(text.encode("utf-8"))


@pytest.mark.e2e
def test_cli_on_text_matches_library(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 4
    tok = CharTokenizer.from_text(text)
    model = tiny_gpt(vocab_size=tok.vocab_size).eval()
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, tok)
    (tmp_path / "t.txt").write_text(text)
    proc = run_cli(
        "perplexity",
        f"checkpoint={tmp_path / 'run'}",
        f"text={tmp_path / 't.txt'}",
        "stride=4",
        "device=cpu",
        "dtype=float32",
        "batch_size=3",
    )
    assert proc.returncode == 0, proc.stderr
    expected = perplexity.evaluate(model, np.array(tok.encode(text)), stride=4)
    assert f"loss {expected.loss:.4f} nats/token" in proc.stdout
    assert f"perplexity {expected.perplexity:.3f}" in proc.stdout
    assert "bits/byte" in proc.stdout


@pytest.mark.e2e
def test_bad_input_is_one_line(tmp_path, capsys):
    tok = CharTokenizer.from_text("abc \n")
    save_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_gpt(vocab_size=tok.vocab_size).eval(), tok)
    (tmp_path / "empty.txt").write_text("  \n")
    ckpt = f"checkpoint={tmp_path / 'run'}"
    cases = {
        ("perplexity", ckpt, f"text={tmp_path / 'empty.txt'}"): "is empty",
        ("perplexity", ckpt, f"text={tmp_path / 'missing.txt'}"): "does not exist",
        ("perplexity", ckpt, f"text={tmp_path / 'empty.txt'}", "windw=8"): "unknown key 'windw'",
        ("perplexity", ckpt): "give exactly one of data=",
        ("perplexity", f"checkpoint={tmp_path / 'nope'}", "text=x"): "does not exist",
        ("perplexity", ckpt, "text=x", "window=8", "stride=9"): "stride=9 is larger than window=8",
        ("bogus",): "unknown command",
    }
    for args, message in cases.items():
        assert message in cli_error(capsys, *args), args
    proc = run_cli("perplexity", ckpt, f"text={tmp_path / 'empty.txt'}")  # the real exit path, once
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "is empty" in proc.stderr, proc.stderr


def test_window_above_block_size_and_too_short_text_are_user_errors():
    model = tiny_gpt(vocab_size=10, block_size=8).eval()
    with pytest.raises(UserError, match="exceeds the model's block_size 8"):
        perplexity.evaluate(model, np.arange(20) % 10, window=9)
    with pytest.raises(UserError, match="at least 2 tokens"):
        perplexity.evaluate(model, np.array([1]))


def prepare_char_dataset(tmp_path, text: str, name: str = "tiny"):
    from gpt2.config import DataConfig
    from gpt2.data import open_dataset
    from gpt2.data.prepare import prepare

    (tmp_path / f"{name}.txt").write_text(text)
    prepare(
        DataConfig(name=name, tokenizer="char", source=str(tmp_path / f"{name}.txt"), val_fraction=0.2),
        data_root=tmp_path / "data",
    )
    return open_dataset(name, data_root=tmp_path / "data")


def test_prepared_val_split_equals_the_trainers_mean_loss_over_chunks(tmp_path, capsys):
    from gpt2.eval.__main__ import main

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))
    ds = prepare_char_dataset(tmp_path, text)
    model = tiny_gpt(vocab_size=ds.vocab_size, block_size=16, seed=3).eval()
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, ds.tokenizer)
    val = np.concatenate([ds.tokens(s) for s in ds.shards("val")]).astype(np.int64)
    n_chunks = (len(val) - 1) // 16
    x = torch.from_numpy(val[: n_chunks * 16]).view(n_chunks, 16)  # (chunks, T): the trainer's val windows
    y = torch.from_numpy(val[1 : n_chunks * 16 + 1]).view(n_chunks, 16)
    with torch.no_grad():
        _, reference = model(x, y)
    result = main(
        [
            "perplexity",
            f"checkpoint={tmp_path / 'run'}",
            "data=tiny",
            f"data_root={tmp_path / 'data'}",
            "split=val",
            "window=16",
            "stride=16",
            f"max_tokens={n_chunks * 16 + 1}",
            "device=cpu",
            "dtype=float32",
        ]
    )
    assert result["tokens"] == n_chunks * 16
    assert result["loss"] == pytest.approx(reference.item(), rel=1e-6)
    assert result["bytes"] == n_chunks * 16  # ASCII: one byte per character
    assert "tiny/val" in capsys.readouterr().out


def test_checkpoint_tokenizer_must_match_the_prepared_data(tmp_path, capsys):
    text = "".join(f"line {i}: the quick brown fox.\n" for i in range(40))
    prepare_char_dataset(tmp_path, text)
    root = f"data_root={tmp_path / 'data'}"
    bpe = GPT2Tokenizer()
    save_checkpoint(tmp_path / "bpe" / "ckpt.pt", tiny_gpt(vocab_size=bpe.vocab_size).eval(), bpe)
    err = cli_error(capsys, "perplexity", f"checkpoint={tmp_path / 'bpe'}", "data=tiny", root)
    assert "prepared with tokenizer char but the model uses gpt2" in err
    other = CharTokenizer.from_text("xyz\n")
    save_checkpoint(tmp_path / "char" / "ckpt.pt", tiny_gpt(vocab_size=other.vocab_size).eval(), other)
    err = cli_error(capsys, "perplexity", f"checkpoint={tmp_path / 'char'}", "data=tiny", root)
    assert "different" in err
    err = cli_error(capsys, "perplexity", f"checkpoint={tmp_path / 'char'}", "data=nothere", root)
    assert "is not prepared" in err


def test_init_from_a_hugging_face_dir_scores_like_the_same_checkpoint(tmp_path, capsys):
    from gpt2.eval.__main__ import main
    from gpt2.hf import save_pretrained

    tok = GPT2Tokenizer()
    model = tiny_gpt(vocab_size=tok.vocab_size, block_size=16, seed=4).eval()
    save_pretrained(model, tmp_path / "hf")
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, tok)
    (tmp_path / "t.txt").write_text("It was the best of times, it was the worst of times, it was the age of wisdom.")
    common = [f"text={tmp_path / 't.txt'}", "stride=8", "device=cpu", "dtype=float32"]
    from_hf = main(["perplexity", f"init_from={tmp_path / 'hf'}", *common])
    from_ckpt = main(["perplexity", f"checkpoint={tmp_path / 'run'}", *common])
    assert from_hf["tokens"] == from_ckpt["tokens"] == len(tok.encode((tmp_path / "t.txt").read_text()))
    assert from_hf["loss"] == pytest.approx(from_ckpt["loss"], rel=1e-5)
    assert "(Hugging Face GPT-2 weights)" in capsys.readouterr().out


def test_scores_default_to_fp32_so_they_compare_across_tools():
    from gpt2.eval.config import HellaSwagConfig, PerplexityConfig, parse

    assert parse(PerplexityConfig, ["init_from=gpt2", "text=x.txt"]).dtype == "float32"
    assert parse(HellaSwagConfig, ["init_from=gpt2"]).dtype == "float32"
