"""Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model"): `objective=dpo`, the sigmoid loss TRL's `DPOTrainer` computes by default.

For a prompt x with a chosen reply y_w and a rejected one y_l, the model being tuned pi and a frozen reference
pi_ref (the weights training started from):

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))       the implicit reward of a reply
    loss  = -log sigmoid(r(y_w) - r(y_l))                      averaged over the pairs of a step

log pi(y | x) sums the log-probabilities of the reply's tokens (its loss-mask targets, end-of-text included;
`data=preferences` prepares them). With LoRA the reference is the same model with its adapters off, so there is no
second copy of the weights; otherwise it is `init_from` loaded once more, frozen. The reference runs in eval mode
(no dropout). Each step also yields sums over its pairs of the chosen and rejected rewards and of the pairs whose
chosen reward is the higher, which the trainer logs as `reward_chosen`, `reward_rejected`, `reward_accuracy` and
`reward_margin` (means over pairs).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import loading
from gpt2.config import TrainRunConfig
from gpt2.data.dataset import TokenDataset
from gpt2.errors import UserError
from gpt2.lora import adapters_off
from gpt2.model import GPT


def check_objective(cfg: TrainRunConfig, ds: TokenDataset) -> None:
    """UserError when the objective and the data do not go together."""
    if cfg.objective == "dpo" and not ds.has_pairs:
        raise UserError(
            f"objective=dpo trains on preference pairs, and {ds.dir} holds none: prepare them with "
            "python data/prepare.py data=preferences data.source=<pairs.jsonl> data.name=<name>"
        )
    if cfg.objective == "lm" and ds.has_pairs:
        raise UserError(
            f"{ds.dir} holds preference pairs, which next-token training would learn both replies of: train it "
            "with objective=dpo"
        )
    if cfg.objective == "dpo" and cfg.train.parallelism == "fsdp":
        raise UserError("objective=dpo runs in one process or under DDP; use train.parallelism=ddp")


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R,) the summed log-probability of each row's targets (y != -1) given its inputs (the LM head runs at
    the targeted positions only; on CUDA, selecting them waits for the device once per call)."""
    _, losses = model(x, y, reduction="none")  # (R, T)
    return -losses.sum(1)


class DPO:
    """The DPO loss of a run. `reference` is the frozen starting model, or None with LoRA (adapters off)."""

    def __init__(self, beta: float, reference: GPT | None) -> None:
        self.beta = beta
        self.reference = reference

    @classmethod
    def for_run(cls, cfg: TrainRunConfig, device: torch.device) -> DPO:
        if cfg.lora.rank:
            return cls(cfg.dpo.beta, None)
        reference = loading.load(cfg.init_from, device).model
        return cls(cfg.dpo.beta, reference.eval().requires_grad_(False))

    def loss(
        self, policy: nn.Module, model: GPT, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (2N, T): N chosen sequences, then their N rejected ones. `policy` is what the forward goes through
        (`model` or its DDP wrapper). Returns the mean loss over the N pairs and (4,) sums over them: chosen
        reward, rejected reward, pairs ranked right, pairs."""
        logps = sequence_logps(policy, x, y)
        with torch.no_grad(), self._reference(model) as reference:
            reference_logps = sequence_logps(reference, x, y)
        chosen, rejected = (self.beta * (logps - reference_logps)).chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        pairs = torch.full((), float(len(chosen)), device=x.device)  # (a fill on the device, not a copy to it)
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), pairs]).detach()
        return loss, stats

    @contextlib.contextmanager
    def _reference(self, model: GPT) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
            return
        training = model.training
        model.eval()
        try:
            with adapters_off(model):
                yield model
        finally:
            model.train(training)


def reward_metrics(stats: torch.Tensor) -> dict[str, float]:
    """The metrics.jsonl keys of summed reward stats (see `DPO.loss`), means over their pairs."""
    chosen, rejected, right, pairs = stats.tolist()
    pairs = max(pairs, 1.0)
    return {
        "reward_chosen": chosen / pairs,
        "reward_rejected": rejected / pairs,
        "reward_accuracy": right / pairs,
        "reward_margin": (chosen - rejected) / pairs,
    }
