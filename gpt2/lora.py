"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") on GPT's Linear layers.

An adapted layer computes W x + b + (alpha / r) B A dropout(x): W and b stay frozen, A (r, in) starts
Kaiming-uniform and B (out, r) at zero (peft's init), so the adapted model starts equal to its base and only
A and B train: r (in + out) numbers per layer instead of in x out. `LoRALinear` is an nn.Linear with two more
parameters, so the state dict keeps the base's plain keys (`...c_attn.weight`) next to `...c_attn.lora_A`.
`merge_lora` folds B A into W and gives back plain nn.Linear layers: the model sampling, evaluation and export use.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.dropout import Dropout
from gpt2.errors import UserError


class LoRALinear(nn.Linear):
    """`base`'s weight and bias (shared, frozen) plus a rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.lora_dropout = Dropout(dropout)
        self.enabled = True
        """False: the layer is its base alone (`adapters_off`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Freeze every parameter of `model` and adapt the Linear layers whose name ends with one of `targets`
    (`c_attn`, `c_proj`, `c_fc`, or a longer suffix such as `attn.c_proj`). Returns the adapted layers' names;
    UserError if a target matches none."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for target in targets:
        matches = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and _matches(name, target)
        ]
        if not matches:
            raise UserError(
                f"lora.targets: {target!r} matches no Linear layer of the model; use c_attn, "
                "c_proj, c_fc or attn.c_proj / mlp.c_proj"
            )
        for name in matches:
            parent, child = _parent(model, name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
        adapted += matches
    return adapted


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its layer's weight (W += alpha / r B A) and make it a plain nn.Linear again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.scaling
            module.weight += delta.to(module.weight.dtype)
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent, child = _parent(model, name)
            setattr(parent, child, plain)
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, for as long as the block runs: every LoRA layer computes its frozen layer alone (DPO's
    reference model, with no second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_names(model: nn.Module) -> set[str]:
    """The state-dict keys of the LoRA parameters (what a LoRA run's checkpoint holds of the model)."""
    return {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child
