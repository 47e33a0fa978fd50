"""The model an evaluation scores: one of our checkpoints, or OpenAI's GPT-2 weights, with its tokenizer."""

from __future__ import annotations

from typing import Any, Optional

import torch

from gpt2.model import GPT
from gpt2.tokenizer import get_tokenizer


def load(checkpoint: Optional[str], init_from: Optional[str], device: torch.device) -> tuple[GPT, Any, str]:
    """(model in eval mode on `device`, its tokenizer, a short description for printing).

    `checkpoint`: a run's out_dir or a .pt file (the tokenizer is read from it). `init_from`: a `gpt2*` hub name
    or a Hugging Face-layout directory (GPT-2's BPE tokenizer). Exactly one must be given (configs check that).
    """
    if checkpoint:
        from gpt2.checkpoint import load_model

        model, tokenizer, _ = load_model(checkpoint, device)
        return model, tokenizer, f"checkpoint {checkpoint}"
    assert init_from, "configs require checkpoint or init_from"
    from gpt2.hf import load_pretrained

    model = load_pretrained(init_from).to(device).eval()
    return model, get_tokenizer("gpt2"), f"{init_from} (Hugging Face GPT-2 weights)"
