"""`python -m gpt2.export`: a run becomes a Hugging Face folder that `transformers.pipeline` uses as it is, with
our tokenizer's ids and our logits, and the same greedy text as sample.py; best.pt by path; bad input is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEXT, save_checkpoint
from omegaconf import OmegaConf

from gpt2.export import run
from gpt2.loading import load_checkpoint
from gpt2.sampling import run as sample_run
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("bpe_run"), GPT2Tokenizer(), block_size=64)


def test_hf_export_works_in_a_transformers_pipeline_with_our_text_and_logits(bpe_run, tmp_path):
    from transformers import GPT2LMHeadModel, pipeline

    out = run(OmegaConf.create({"checkpoint": str(bpe_run), "out_dir": str(tmp_path / "hf")}))
    prompt = "The meaning of life, said the café owner,"
    generator = pipeline("text-generation", model=str(out), device="cpu")
    ids = generator.tokenizer(prompt)["input_ids"]
    assert ids == GPT2Tokenizer().encode(prompt)
    text = generator(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    ours = sample_run(
        OmegaConf.create(
            {
                "checkpoint": str(bpe_run),
                "device": "cpu",
                "prompt": prompt,
                "temperature": 0.0,
                "max_new_tokens": 20,
                "ignore_eot": True,
            }
        )
    )[0]
    assert text == prompt + ours
    model = load_checkpoint(bpe_run).model
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out)(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_best_checkpoint_and_dtype(bpe_run, tmp_path):
    import shutil

    from safetensors import safe_open

    shutil.copyfile(bpe_run / "ckpt.pt", tmp_path / "best.pt")
    out = run(
        OmegaConf.create(
            {"checkpoint": str(tmp_path / "best.pt"), "out_dir": str(tmp_path / "hf"), "dtype": "bfloat16"}
        )
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16


def test_char_run_exports_weights_and_says_the_tokenizer_is_not_included(tmp_path, capsys):
    char_run = save_checkpoint(tmp_path / "char", CharTokenizer.from_text(TEXT))
    out = run(OmegaConf.create({"checkpoint": str(char_run), "out_dir": str(tmp_path / "hf")}))
    assert (out / "model.safetensors").exists() and not (out / "vocab.json").exists()
    assert "weights only: its char vocabulary has no Hugging Face tokenizer" in capsys.readouterr().out


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2.export", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.e2e
def test_bad_input_is_one_line_and_nothing_is_overwritten(bpe_run, tmp_path):
    """The command: one line on stderr, exit 2. The same checks in this process for the other bad inputs."""
    from gpt2.errors import UserError

    r = export(f"checkpoint={bpe_run}", f"out_dir={tmp_path / 'x'}", "format=onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "format='onnx' is not valid" in r.stderr, r.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for keys, message in (
        ({"out_dir": str(tmp_path / "x")}, "no run to export: pass checkpoint="),
        ({"checkpoint": str(bpe_run)}, "no out_dir"),
        ({"checkpoint": str(tmp_path / "nope"), "out_dir": str(tmp_path / "x")}, "nope"),
        ({"checkpoint": str(bpe_run), "out_dir": str(taken)}, f"out_dir={taken} is not empty"),
    ):
        with pytest.raises(UserError, match=message):
            run(OmegaConf.create(keys))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    run(OmegaConf.create({"checkpoint": str(bpe_run), "out_dir": str(taken), "overwrite": True}))
    assert (taken / "notes.txt").read_text() == "mine" and (taken / "config.json").exists()


@pytest.mark.e2e
@pytest.mark.slow  # needs llama-cpp-python, which builds llama.cpp from source (.ci/run installs it)
def test_gguf_export_gives_llama_cpp_our_tokens_logits_and_greedy_text(tmp_path):
    """A trained GPT-2 BPE run exported to GGUF: llama.cpp (through llama-cpp-python) tokenizes like us, computes
    our logits (up to ggml's fp16 GELU table) and generates our greedy text; float16 is close."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from conftest import TINY, train

    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare

    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    data = prepare(DataConfig(name="bpe", source=str(tmp_path / "corpus.txt")), data_root=tmp_path)
    run_dir = tmp_path / "run"
    train(
        [
            f"data.name={data}",
            f"out_dir={run_dir}",
            *TINY,
            "train.max_iters=300",
            "train.eval_interval=300",
            "optim.lr=1e-2",
        ],
        tmp_path,
    )
    for dtype in ("float32", "float16"):
        r = export(f"checkpoint={run_dir}", f"out_dir={tmp_path / dtype}", "format=gguf", f"dtype={dtype}")
        assert r.returncode == 0, r.stderr
    prompt = "ROMEO:\nBut soft, what"
    ids = GPT2Tokenizer().encode(prompt)
    model = load_checkpoint(run_dir).model
    V = model.config.vocab_size
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, :V]
        greedy = list(ids)  # our greedy continuation, token by token
        for _ in range(12):
            greedy.append(int(model(torch.tensor([greedy]))[0][0, -1, :V].argmax()))
    expected = greedy[len(ids) :]
    assert len(set(expected)) > 3  # a trained model's text, not one token repeated
    scale = float(ours.abs().max())
    for dtype, tolerance in (("float32", 5e-4), ("float16", 2e-3)):  # of the largest logit (ggml: fp16 GELU table)
        llm = llama_cpp.Llama(
            model_path=str(tmp_path / dtype / "model.gguf"),
            n_ctx=32,
            logits_all=True,
            type_k=0,
            type_v=0,
            verbose=False,
        )  # an fp32 KV cache (GGML_TYPE_F32)
        try:
            assert llm.tokenize(prompt.encode(), add_bos=False) == ids
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))
            torch.testing.assert_close(theirs, ours, atol=tolerance * scale, rtol=0)
            if dtype == "float32":
                theirs = []
                for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                    theirs.append(token)
                    if len(theirs) == len(expected):
                        break
                assert theirs == expected
        finally:
            llm.close()
    char_run = save_checkpoint(tmp_path / "char", CharTokenizer.from_text(TEXT))
    r = export(f"checkpoint={char_run}", f"out_dir={tmp_path / 'c'}", "format=gguf")
    assert r.returncode == 2 and "format=gguf needs a GPT-2 BPE model" in r.stderr
