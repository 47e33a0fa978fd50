"""Test setup: the package's own offline assets, offline hubs, and clean global state per test.

Nothing here needs ../shared: tiny-shakespeare and the GPT-2 BPE files ship inside the package. When
../shared/offline/tiktoken-cache exists, tests that compare with tiktoken's own downloaded encoding use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpt2.resources import GPT2_BPE_DIR, TINY_SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]


def model_entries(model) -> dict:
    """The `model` and `model_config` entries of a checkpoint (gpt2.checkpoint), for a model-only checkpoint."""
    from dataclasses import asdict

    return {"model": model.state_dict(), "model_config": asdict(model.config)}

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
