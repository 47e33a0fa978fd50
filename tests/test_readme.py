"""The README is the user's manual: every command it shows must run as written.

Every `train.py`, `sample.py`, `data/prepare.py`, `torchrun ... train.py` and `python -m gpt2.eval` command in
its bash blocks is composed and validated exactly as the CLI would (unknown keys, groups and bad values fail
here). GPU-sized and network-bound runs stop there; the demo block is run for real, with tiny overrides
appended, on the tiny-shakespeare the package ships.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, bash_blocks, commands

README = (ROOT / "README.md").read_text()
ENTRY = {
    "train.py": ("train", "TrainRunConfig"),
    "sample.py": ("sample", "SampleConfig"),
    "data/prepare.py": ("prepare", "PrepareConfig"),
    "gpt2.serve": ("serve", "ServeConfig"),
    "gpt2.export": ("export", "ExportConfig"),
}


def entry_and_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(entry point, its arguments) of a README command, whether it starts with python, torchrun, srun or a pipe."""
    if "|" in argv:
        argv = argv[argv.index("|") + 1 :]
    for i, word in enumerate(argv):
        if word in ENTRY and argv[0] in ("python", "torchrun", "srun"):
            return word, [a for a in argv[i + 1 :] if a not in ("-m", "--cfg", "job", "&")]
    if argv[:2] == ["python", "-m"] and argv[2] in ("gpt2.eval", "gpt2.serve", "gpt2.export"):
        return argv[2], argv[3:]
    return None


ALL = [c for block in bash_blocks(README) for c in commands(block)]
CHECKED = [(" ".join(c), entry_and_args(c)) for c in ALL if entry_and_args(c)]


def test_readme_shows_the_commands_users_need():
    entries = {e for _, (e, _) in CHECKED}
    assert entries == {"train.py", "sample.py", "data/prepare.py", "gpt2.eval", "gpt2.serve", "gpt2.export"}
    quick = bash_blocks(README.split("## Quick start")[1])[0]
    assert [c[:2] for c in commands(quick)] == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_multinode_commands_use_flags_torchrun_honours():
    """torchrun ignores --node_rank under the c10d rendezvous; the static one needs --master_addr."""
    torchruns = [c for c in ALL if c[0] == "torchrun" and "--nnodes=2" in c]
    assert len(torchruns) == 2
    for argv in torchruns:
        if "--rdzv_backend=c10d" in argv:
            assert not any(a.startswith("--node_rank") for a in argv), argv
        else:
            assert any(a.startswith("--node_rank") for a in argv) and any(a.startswith("--master_addr") for a in argv)


@pytest.mark.parametrize("command, parsed", CHECKED, ids=[c for c, _ in CHECKED])
def test_readme_command_composes_and_validates(command, parsed):
    from hydra import compose, initialize_config_dir

    from gpt2 import config
    from gpt2.resources import CONFIG_DIR

    entry, args = parsed
    if entry == "gpt2.eval":
        from gpt2.eval.config import HellaSwagConfig, PerplexityConfig, parse

        schema = {"perplexity": PerplexityConfig, "hellaswag": HellaSwagConfig}[args[0]]
        parse(schema, args[1:], prefix=args[0])
        return
    name, schema = ENTRY[entry]
    overrides = [a.split(",")[0] if "=" in a and "," in a and "[" not in a else a for a in args]  # -m sweeps
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    config.to_object(cfg, getattr(config, schema))


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_demo_runs_as_written(tmp_path):
    """The demo block, verbatim, with tiny overrides appended so that it takes seconds."""
    demo = commands(bash_blocks(README.split("## The demo, step by step")[1])[0])
    tiny = {
        "train.py": ["train.max_iters=30", "train.eval_interval=15", "train.eval_iters=2"],
        "sample.py": ["max_new_tokens=20"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in demo:
        assert argv[0] == "python"
        script = argv[1] if argv[1] != "-m" else None
        full = [sys.executable, *([str(ROOT / script)] if script else argv[1:3]), *argv[2 if script else 3 :]]
        full += tiny.get(script or "", [])
        p = subprocess.run(full, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, f"{' '.join(argv)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    out = tmp_path / "out" / "shakespeare_char_cpu"
    assert (out / "ckpt.pt").exists() and (out / "loss.png").stat().st_size > 0
    assert p.stdout.strip().endswith("loss.png")
