"""Divergence: a NaN or inf loss (or gradient norm) stops the run before it reaches a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf. The last good checkpoint is left untouched."""


class DivergenceWatch:
    """The first step whose loss (or, without a GradScaler, gradient norm) was NaN or inf, with both values,
    kept on the device so that training never waits for it; `check()` reads it (one sync, at log steps and
    before each checkpoint, on every rank together) and raises TrainingDiverged. With fp16 the GradScaler
    skips steps with inf/NaN gradients itself, so only the loss counts."""

    def __init__(self, device: torch.device, check_grad_norm: bool) -> None:
        self.check_grad_norm = check_grad_norm
        self.first = torch.tensor([math.inf, 0.0, 0.0], device=device)  # (step, loss, grad norm); inf: none yet

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        if self.check_grad_norm:
            bad |= ~torch.isfinite(grad_norm)
        values = torch.stack([torch.full_like(loss, step), loss, grad_norm.to(loss.dtype)]).to(self.first.dtype)
        self.first = torch.where(bad & torch.isinf(self.first[0]), values, self.first)

    def check(self, last_good: Path) -> None:
        first_step = self.first[:1].clone()
        if dist.is_initialized():
            dist.all_reduce(first_step, op=dist.ReduceOp.MIN)  # any rank's divergence stops every rank
        if math.isfinite(first_step.item()):
            step, loss, norm = self.first.tolist()
            raise TrainingDiverged(
                f"training diverged at step {int(first_step.item())}: loss {loss}, grad norm {norm}; the last good "
                f"checkpoint is {last_good}. Lower optim.lr or raise optim.warmup_iters, then rerun the same "
                "command to resume from it"
            )
