"""`sample.py` end to end: checkpoints built here (char and gpt2 tokenizers), a Hugging Face-layout directory,
prompt sources, jsonl output, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TEXT, save_checkpoint
from omegaconf import OmegaConf

from gpt2.errors import exit_on_user_error
from gpt2.sampling import run, unescape
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("char_run"), CharTokenizer.from_text(TEXT))


def sample(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`python sample.py ...` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "device=cpu", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def run_ok(capsys, **cfg) -> str:
    """`run` as the CLI calls it, in process (no interpreter start-up): returns what it printed."""
    run(OmegaConf.create({"device": "cpu", **cfg}))
    return capsys.readouterr().out


@pytest.mark.e2e
def test_cli_char_checkpoint_writes_jsonl(char_run, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    r = sample(
        f"checkpoint={char_run}",
        "prompt=ROMEO:",
        "num_samples=3",
        "max_new_tokens=25",
        "temperature=0",
        f"output={out}",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    assert {line["prompt"] for line in lines} == {"ROMEO:"}
    assert len({line["sample"] for line in lines}) == 1 and len(lines[0]["sample"]) == 25  # greedy
    assert lines[0]["settings"]["temperature"] == 0 and lines[0]["settings"]["checkpoint"] == str(char_run)
    assert r.stdout.count("ROMEO:" + lines[0]["sample"]) == 3
    # Same seed, same text, streamed or not; the .pt file works as well as its run dir; output appends.
    kw = dict(prompt="ROMEO:", max_new_tokens=25, seed=5, temperature=1.0)
    streamed = run_ok(capsys, checkpoint=str(char_run / "ckpt.pt"), output=str(out), stream=True, **kw)
    assert streamed == run_ok(capsys, checkpoint=str(char_run), stream=False, **kw)
    assert streamed != run_ok(capsys, checkpoint=str(char_run), stream=False, **{**kw, "seed": 6})
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.e2e
def test_cli_prompt_from_stdin_and_files(char_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("JULIET:")
    r = sample(f"checkpoint={char_run}", "max_new_tokens=10", "temperature=0", "prompt=-", input="JULIET:")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("JULIET:")
    kw = dict(checkpoint=str(char_run), max_new_tokens=10, temperature=0)
    assert run_ok(capsys, prompt_file=str(tmp_path / "p.txt"), **kw) == r.stdout
    assert run_ok(capsys, prompt=f"FILE:{tmp_path / 'p.txt'}", **kw) == r.stdout
    assert run_ok(capsys, prompt="", **kw).startswith("\n")  # empty prompt: starts from a newline


def test_cli_gpt2_tokenizer_checkpoint_with_stop(tmp_path, capsys):
    run_dir = save_checkpoint(tmp_path / "bpe_run", GPT2Tokenizer(), block_size=16)
    kw = dict(checkpoint=str(run_dir), prompt="Hello world", max_new_tokens=30, temperature=0, ignore_eot=True)
    run_ok(capsys, output=str(tmp_path / "s.jsonl"), **kw)  # also slides past block_size=16
    full = json.loads((tmp_path / "s.jsonl").read_text())["sample"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    run_ok(capsys, output=str(tmp_path / "t.jsonl"), stop=[stop], **kw)
    assert json.loads((tmp_path / "t.jsonl").read_text())["sample"] == full[: full.index(stop)]


@pytest.mark.e2e
def test_cli_hf_layout_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    # No dtype given: greedy decoding runs in fp32 by default, so it reproduces other tools' text.
    r = sample(
        f"init_from={tmp_path / 'hf'}",
        "prompt=The",
        "max_new_tokens=8",
        "temperature=0",
        "ignore_eot=true",
        f"output={tmp_path / 's.jsonl'}",
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "s.jsonl").read_text())
    ours = record["sample"]
    assert record["settings"]["dtype"] == "float32"
    # transformers' own greedy decoding of the same weights gives the same text.
    tok = GPT2Tokenizer()
    idx = torch.tensor([tok.encode("The")])
    ref = hf.eval().generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == tok.decode(ref[0, 1:].tolist())


class Gadget:
    """A pickled object of a custom class: weights_only loading refuses it."""


@pytest.mark.e2e
def test_cli_bad_inputs_subprocess(char_run, tmp_path):
    torch.save({"model": Gadget()}, tmp_path / "evil.pt")
    r = sample(f"checkpoint={tmp_path / 'evil.pt'}")
    assert r.returncode == 2, r.stderr
    assert "refusing to load" in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def run_in_process(capsys, **cfg) -> str:
    """`run` as the CLI calls it, in process: returns the error line it printed before exiting with 2."""
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(run)(OmegaConf.create(cfg))  # as sample.py wraps it
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"device": "tpu"}, "device='tpu' is not valid"),
        ({"prompt": "ROMEO: ~~~"}, "character '~' is not in this char vocabulary"),
        ({"prompt_file": "/nonexistent/prompt.txt"}, "prompt file /nonexistent/prompt.txt does not exist"),
        ({"prompt": "FILE:/nonexistent/p.txt"}, "prompt file /nonexistent/p.txt does not exist"),
    ],
)
def test_bad_inputs_one_line_exit_2(char_run, capsys, overrides, message):
    err = run_in_process(capsys, **{"checkpoint": str(char_run), "device": "cpu", "max_new_tokens": 5, **overrides})
    assert message in err


def test_corrupt_missing_and_unsafe_checkpoints(tmp_path, capsys):
    torch.save({"model": Gadget()}, tmp_path / "evil.pt")
    assert "refusing to load" in run_in_process(capsys, checkpoint=str(tmp_path / "evil.pt"))
    assert "does not exist" in run_in_process(capsys, checkpoint=str(tmp_path / "missing"))
    (tmp_path / "ckpt.pt").write_bytes(b"not a zip file at all")
    assert "is not a PyTorch checkpoint (not a zip archive" in run_in_process(capsys, checkpoint=str(tmp_path))
    assert "no model to sample from" in run_in_process(capsys)
    assert "does not exist" in run_in_process(capsys, init_from=str(tmp_path / "no_such_dir"))


def test_command_line_escapes_in_prompt_and_stop(char_run, capsys):
    assert unescape(r"a\n\nb\tc\\n ü") == "a\n\nb\tc\\n ü"
    out = run_ok(capsys, checkpoint=str(char_run), prompt=r"JULIET:\nAy", max_new_tokens=5, temperature=0)
    assert out.startswith("JULIET:\nAy")


HARD_PROMPTS = [
    "O, my lord, I have",
    "a=b",
    "it's",
    'say "hi"',
    "x\\",
    "a\\'b",
    "${oc.env:HOME}",
    "[1,2]",
    "{a: 1}",
    "  lead",
    "null",
    "123",
    "~x",
    "a:b",
    "é ☃",
    "'",
    "\\",
    "${",
    "a\\${b}",
    "a\\\\${b}",
]


@pytest.mark.parametrize("prompt", HARD_PROMPTS)
def test_free_text_quoting_round_trips_through_hydra(prompt):
    from hydra import compose, initialize_config_dir

    from gpt2.cli import quote_free_text
    from gpt2.resources import CONFIG_DIR

    argv = quote_free_text(["sample.py", f"prompt={prompt}", "init_from=gpt2"])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        assert compose("sample", overrides=argv[1:]).prompt == prompt
        # A value the user already quoted for Hydra is left for Hydra to unquote.
        quoted = quote_free_text(["sample.py", "prompt='already, quoted'"])[1:]
        assert compose("sample", overrides=[*quoted, "init_from=gpt2"]).prompt == "already, quoted"


@pytest.mark.e2e
def test_cli_prompt_with_commas_quotes_and_equals_is_taken_as_typed(char_run):
    prompt = 'ROMEO: O, my lord, \'tis "so"=yes'
    gpt2_run = save_checkpoint(Path(str(char_run) + "_gpt2"), GPT2Tokenizer())
    r = sample(f"checkpoint={gpt2_run}", f"prompt={prompt}", "max_new_tokens=5", "temperature=0", "stream=false")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)


@pytest.mark.e2e
def test_help_lists_only_what_sample_py_takes():
    r = sample("--help")
    assert r.returncode == 0
    assert "prompt:" in r.stdout and "temperature:" in r.stdout
    assert "experiment" not in r.stdout and "optim" not in r.stdout and "Configuration groups" not in r.stdout


@pytest.mark.e2e
def test_misspelled_keys_added_with_plus_fail(char_run):
    r = sample(f"checkpoint={char_run}", "+promt=hi")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: unknown config key 'promt'; did you mean prompt? (--cfg job prints every key)"
    )


@pytest.mark.e2e
def test_an_output_that_cannot_be_written_fails_before_sampling(char_run, tmp_path):
    r = sample(f"checkpoint={char_run}", f"output={tmp_path / 'no' / 'such' / 'dir' / 's.jsonl'}", "max_new_tokens=5")
    assert r.returncode == 2 and r.stdout == ""  # nothing generated first
    assert r.stderr.strip().startswith("error: output=") and "cannot be written (No such file or directory)" in r.stderr


def test_long_runs_show_progress_and_save_each_batch_as_it_finishes(char_run, tmp_path, capsys, monkeypatch):
    from gpt2.sampling import Sampler

    out = tmp_path / "s.jsonl"
    real = Sampler.stream_rows
    calls = []

    def interrupted_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "stream_rows", interrupted_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(
            OmegaConf.create(
                {
                    "checkpoint": str(char_run),
                    "device": "cpu",
                    "num_samples": 6,
                    "batch_size": 2,
                    "max_new_tokens": 10,
                    "stream": False,
                    "output": str(out),
                }
            )
        )
    assert len(out.read_text().splitlines()) == 4  # the two finished batches were saved
    captured = capsys.readouterr()
    assert captured.out.count("-" * 40) == 4 and "sampling" in captured.err  # samples as they finish; progress


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompts_file_batches_prompts_of_any_length_in_input_order(char_run, tmp_path, capsys, suffix):
    """A prompts file of different-length prompts, 2 samples each, in batches of 3 rows: one record per prompt
    and sample in input order, and greedy text per prompt equal to what sample.py gives it alone."""
    prompts = ["ROMEO:", "But soft, what light\nthrough yonder", "J", "Ay me."]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(p.replace("\n", "\\n") for p in prompts) + "\n\n")  # a blank line is skipped
    else:
        path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "s.jsonl"
    kw = dict(checkpoint=str(char_run), temperature=0.0, max_new_tokens=40)  # slides past block_size=32
    run_ok(capsys, prompts_file=str(path), num_samples=2, batch_size=3, output=str(out), **kw)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["prompt"]) for r in records] == [(i, p) for i, p in enumerate(prompts) for _ in "ab"]
    for i, prompt in enumerate(prompts):
        alone = tmp_path / f"alone{i}.jsonl"
        run_ok(capsys, prompt=prompt, output=str(alone), **kw)
        assert records[2 * i]["sample"] == records[2 * i + 1]["sample"] == json.loads(alone.read_text())["sample"]


@pytest.mark.parametrize(
    "content, name, message",
    [
        (None, "missing.txt", "prompts_file={path} does not exist"),
        ("\n \n", "empty.txt", "prompts_file={path} has no prompts"),
        ('{"prompt": "ROMEO:"}\n{"prompt": "x"\n', "bad.jsonl", "{path}:2: not valid JSON"),
        ('{"prompt": "ROMEO:"}\n\n{"text": "x"}\n', "field.jsonl", '{path}:3: no "prompt" string'),
        ("ROMEO:\nJULIET: ~~\n", "chars.txt", "{path}:2: character '~' is not in this char vocabulary"),
        (b"ROMEO:\n\xff\n", "latin1.txt", "{path}:2: not UTF-8 (byte 0xff)"),
    ],
)
def test_bad_prompts_files_name_file_and_line(char_run, tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    err = run_in_process(capsys, checkpoint=str(char_run), device="cpu", max_new_tokens=5, prompts_file=str(path))
    assert message.format(path=path) in err


def test_prompts_file_with_a_prompt_is_an_error(char_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("ROMEO:\n")
    err = run_in_process(capsys, checkpoint=str(char_run), prompt="JULIET:", prompts_file=str(tmp_path / "p.txt"))
    assert "give prompts_file=... alone" in err


def test_a_long_prompt_in_a_prompts_file_is_said_once_with_its_line(char_run, tmp_path, capsys, recwarn):
    (tmp_path / "p.txt").write_text("ROMEO:\n" + "But soft, what light through yonder window breaks?\n")
    run(
        OmegaConf.create(
            {
                "checkpoint": str(char_run),
                "device": "cpu",
                "prompts_file": str(tmp_path / "p.txt"),
                "max_new_tokens": 5,
                "stream": False,
            }
        )
    )
    err = capsys.readouterr().err
    assert err.count("the prompt has") == 1 and not recwarn.list
    assert f"warning: {tmp_path / 'p.txt'}:2: the prompt has 50 tokens, more than the model's context of 32" in err
