"""Test setup: offline assets from ../shared/offline, offline hubs, and clean global state per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT.parent / "shared" / "offline"
SHAKESPEARE = OFFLINE / "tinyshakespeare" / "input.txt"
GPT2_BPE = OFFLINE / "gpt2-bpe"

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(OFFLINE / "tiktoken-cache"))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

requires_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is missing")
requires_tiktoken = pytest.mark.skipif(
    not Path(os.environ["TIKTOKEN_CACHE_DIR"]).exists(), reason="tiktoken cache is missing"
)


@pytest.fixture(autouse=True)
def _clean_state():
    """Restore the default dtype and tear down any process group a test left behind."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
