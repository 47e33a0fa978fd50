"""What the tests share: offline settings and clean global state, the one tiny-model factory, prepared datasets
(session fixtures), checkpoints, and helpers that run train.py and read its runs.

Nothing here needs ../shared: tiny-shakespeare and the GPT-2 BPE files ship inside the package. When
../shared/offline/tiktoken-cache exists, tests that compare with tiktoken's own downloaded encoding use it.
Unit tests import the library; end-to-end tests (marked `slow` when they take more than ~20 s) run its commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from gpt2 import checkpoint
from gpt2.model import GPT, GPTConfig
from gpt2.resources import GPT2_BPE_DIR, TINY_SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = TINY_SHAKESPEARE
GPT2_BPE = GPT2_BPE_DIR
TIKTOKEN_CACHE = ROOT.parent / "shared" / "offline" / "tiktoken-cache"
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _clean_state():
    """Restore the default dtype and tear down any process group a test left behind."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- models


def tiny_gpt(vocab_size: int = 64, block_size: int = 16, seed: int = 0, **overrides) -> GPT:
    """The tests' tiny GPT: 2 layers, 2 heads, 32 wide, seeded, in training mode; `overrides` are GPTConfig fields."""
    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": block_size, "vocab_size": vocab_size}
    return GPT(GPTConfig(**{**shape, **overrides}))


def model_entries(model: GPT) -> dict:
    """The `model` and `model_config` entries of a checkpoint (gpt2.checkpoint), for a model-only checkpoint."""
    return {"model": model.state_dict(), "model_config": asdict(model.config)}


TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me.\n"


def save_checkpoint(path: Path, tokenizer, block_size: int = 32) -> Path:
    """A run folder whose ckpt.pt holds `tiny_gpt` for `tokenizer` (random weights)."""
    model = tiny_gpt(tokenizer.vocab_size, block_size)
    config = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": block_size}}
    checkpoint.save(path / "ckpt.pt", {**model_entries(model), "tokenizer": tokenizer.to_dict(), "config": config})
    return path


def hf_model_dir(path: Path, vocab_size: int = 50257) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------- datasets


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text()[:60_000]
    return "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(1500))


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A character-level dataset prepared with the data helper's API into a temp data root."""
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    src = root / "corpus.txt"
    src.write_text(corpus_text())
    prepare(DataConfig(name="chars", source=str(src), tokenizer="char", val_fraction=0.1), data_root=root)
    return root / "chars"


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    from gpt2.config import DataConfig
    from gpt2.data.prepare import prepare

    root = tmp_path_factory.mktemp("bpe")
    src = root / "corpus.txt"
    src.write_text(corpus_text()[:20_000])
    prepare(DataConfig(name="bpe", source=str(src), tokenizer="gpt2", val_fraction=0.1), data_root=root)
    return root / "bpe"


# ------------------------------------------------------------------------------------ train.py runs


TRAIN = [sys.executable, str(ROOT / "train.py")]


# A 2-layer character model, fp32, no compile: a step takes a few ms, and resume must be exact.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
    "optim.warmup_iters=5",
    "optim.lr=3e-3",
    "device=cpu",
    "dtype=float32",
    "compile=false",
]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    e["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention on a shared 2-core machine
    e.update(extra)
    return e


def train(args: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    p = subprocess.run(TRAIN + args, cwd=cwd, capture_output=True, text=True, env=env(**extra_env), timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def interrupt(args: list[str], cwd: Path, out: Path, at_step: int, sig: int) -> int:
    """Start a run, send `sig` once it has logged `at_step`, and return its exit status."""
    proc = subprocess.Popen(
        TRAIN + args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            json.loads(line)["step"] >= at_step for line in metrics.read_text().splitlines() if line.endswith("}")
        ):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run ended before the signal:\n{output[-2000:]}"
    return proc.returncode


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> str:
    """train.py under torchrun; returns its stdout."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"),
        *args,
    ]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gpt2.resources import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def trainer(*overrides: str, typed_model_keys: frozenset[str] = frozenset()):
    """A single-process `Trainer` built in this process from train.py's overrides (no start-up cost): for tests
    where a train.py subprocess would prove nothing more."""
    from gpt2.config import TrainRunConfig, to_object
    from gpt2.distributed import DistInfo
    from gpt2.training import Trainer

    return Trainer(to_object(compose(*overrides), TrainRunConfig), DistInfo(), typed_model_keys)


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text (the README's commands)."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's command lines (continuations joined, comments dropped), each split like a shell would."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if ("loss" in r) == (kind == "train")]


def curve(out: Path) -> list[float]:
    return [r.get("loss", r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def weights(out: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A run's latest weights (from ckpt.pt or its sharded checkpoint), or those of the file `name` in it."""
    from gpt2 import checkpoint

    return checkpoint.load(out if name is None else out / name, optimizer=False)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
