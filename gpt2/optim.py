"""Optimizers and learning-rate schedules.

- AdamW (Loshchilov & Hutter) with weight decay on >= 2-D weights only (matmul weights and embeddings), none
  on biases and LayerNorm gains, as nanoGPT; torch's fused kernel on CUDA and on the CPU (there much faster than
  its default loop).
- Muon (Jordan et al. 2024, `torch.optim.Muon`) for the 2-D matrices inside the transformer blocks, with AdamW
  for everything else (embeddings / tied LM head, LayerNorms, biases), as modded-nanogpt; its Newton-Schulz
  iteration runs in fp32 where bf16 is not native (see `Muon`).
- Schedules (`lr_at`): linear warmup, then cosine decay to min_lr (GPT-3 paper), or warmup-stable-decay
  (WSD, Hu et al. 2024 "MiniCPM": hold the peak, then decay linearly over the last `decay_fraction`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from gpt2 import distributed
from gpt2.config import OptimConfig
from gpt2.device import resolve_dtype
from gpt2.errors import UserError


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """The AdamW learning rate at optimizer step `step` (0-based). Pure: same inputs, same output."""
    decay_iters = cfg.lr_decay_iters or max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.final_lr
    if cfg.schedule == "cosine":
        ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
        return cfg.final_lr + coeff * (cfg.lr - cfg.final_lr)
    # wsd: stable at the peak until the decay window, then linear to min_lr at decay_iters
    decay_start = max(cfg.warmup_iters, decay_iters - round(cfg.decay_fraction * decay_iters))
    if step < decay_start:
        return cfg.lr
    ratio = (step - decay_start) / max(1, decay_iters - decay_start)
    return cfg.lr + ratio * (cfg.final_lr - cfg.lr)


def schedule_warning(cfg: OptimConfig, max_iters: int) -> str | None:
    """A warning when the run ends inside the warmup, so the learning rate never reaches `optim.lr`."""
    if cfg.warmup_iters < max_iters:
        return None
    return (
        f"warning: optim.warmup_iters={cfg.warmup_iters} >= train.max_iters={max_iters}: the learning rate never "
        f"reaches optim.lr={cfg.lr:g} (it ends at {lr_at(max_iters - 1, cfg, max_iters):.3g}); lower "
        f"optim.warmup_iters (e.g. optim.warmup_iters={max_iters // 10}) or raise train.max_iters"
    )


class Optimizers:
    """One or two torch optimizers stepped together (AdamW alone, or Muon + AdamW), over `model`'s parameters.

    Every param group carries `base_lr`, its peak learning rate; `set_lr` scales all of them by the schedule.
    Stateful: the state is keyed by parameter name and unsharded (see `gpt2.distributed.optimizer_state`).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], model: nn.Module) -> None:
        self.optimizers = optimizers
        self.model = model

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def unscale_(self, scaler: torch.amp.GradScaler | None) -> None:
        """Divide gradients by the loss scale (before clipping); a no-op without an enabled scaler."""
        if scaler is not None and scaler.is_enabled():
            for opt in self.optimizers:
                scaler.unscale_(opt)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Step every optimizer; with an enabled GradScaler, skip on inf/NaN gradients and update the scale."""
        if scaler is not None and scaler.is_enabled():
            for opt in self.optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            for opt in self.optimizers:
                opt.step()

    def state_dict(self, whole: bool = True) -> dict[str, Any]:
        """Without `whole`: an FSDP2 model's moments as this rank's shards (a sharded checkpoint's part)."""
        if not any(opt.state for opt in self.optimizers):
            # Never stepped (a run stopped before its first step): torch's state-dict API would step it once
            # with lr 0 to make a state, and the resumed run would count one Adam step too many.
            return {
                "state": {},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            }
        return distributed.optimizer_state(self.model, self.optimizers, whole)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The moments and step counts come from `state`; the hyperparameters (lr, weight decay, betas, ...) stay
        the configured ones, so a changed optim.* applies from the resume step, as config.yaml says."""
        if self._check_groups(state):
            self._load(state, whole=True)

    def sharded_state_dict(self) -> dict[str, Any]:
        return self.state_dict(whole=False)

    def load_sharded(self, saved: dict[str, Any], read: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Load from a sharded checkpoint: `saved` is its plain part (param groups, and the names of the
        parameters that have moments), `read` fills this rank's moments in the shapes the running model has."""
        if self._check_groups(saved):
            # The moments to read into: torch's state-dict API makes them for a fresh optimizer by stepping it with
            # lr 0 and zero gradients (no weight changes); the step counts are then read from the checkpoint too.
            moments = distributed.optimizer_state(self.model, self.optimizers, whole=False)
            self._load({"state": read(moments["state"]), "param_groups": saved["param_groups"]}, whole=False)

    def _check_groups(self, state: dict[str, Any]) -> bool:
        """Whether `state` has moments to load (it is empty when saved before the first step: this fresh
        optimizer is that state); a different number of parameter groups is an error."""
        if len(state["param_groups"]) != len(self.param_groups):
            raise UserError(
                f"the checkpoint holds {len(state['param_groups'])} optimizer parameter groups but this optim.name "
                f"builds {len(self.param_groups)}; resume with the optim.name the run started with"
            )
        return bool(state["state"])

    def _load(self, state: dict[str, Any], whole: bool) -> None:
        configured = [
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers
        ]
        distributed.load_optimizer_state(self.model, self.optimizers, state, whole)
        for opt, groups in zip(self.optimizers, configured):
            for group, values in zip(opt.param_groups, groups):
                group.update(values)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype`. torch's always runs it in bf16, which is
    what GPUs since Ampere and CPUs with AVX-512 bf16 want, but elsewhere bf16 matmuls are emulated, an order of
    magnitude slower (BENCHMARKS.md, "Measurements behind design rules"). With `ns_dtype=torch.float32` the step
    is the same algorithm (Nesterov momentum, quintic Newton-Schulz with torch's coefficients, lr scaled by
    sqrt(max(1, rows/cols)), decoupled weight decay) and the same state, with the iteration in fp32 and batched
    over the matrices of one shape (one batched product per shape instead of one per layer)."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        assert closure is None, "the trainer never passes a closure"
        for group in self.param_groups:
            assert group["adjust_lr_fn"] in (None, "original"), "only torch's default lr adjustment is built"
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                updates = torch.stack([self._momentum_update(p, group) for p in params]).to(self.ns_dtype)
                updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for p, update in zip(params, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))

    def _momentum_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf


def orthogonalize(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Jordan et al. 2024) on each matrix of g (n, rows, cols), in g's
    dtype: about U V^T for each matrix U S V^T."""
    a, b, c = coefficients
    tall = g.size(1) > g.size(2)
    x = g.mT if tall else g
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu") or None
    )


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> Optimizers:
    """The optimizer(s) `cfg.name` asks for, over `model`'s trainable parameters (tied weights once)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and ".h." in f".{n}"]
        hidden_ids = {id(p) for p in hidden}
        rest = [(n, p) for n, p in params if id(p) not in hidden_ids]
        fast_bf16 = resolve_dtype("auto", torch.device(device_type)) == torch.bfloat16
        muon = Muon(
            [{"params": hidden, "base_lr": cfg.muon_lr}],
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32,
        )
        adamw = _adamw(_decay_groups(rest, cfg), cfg, device_type)
        return Optimizers([muon, adamw], model)
    return Optimizers([_adamw(_decay_groups(params, cfg), cfg, device_type)], model)


def _decay_groups(params: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on >= 2-D tensors (matmuls, embeddings); none on biases and LayerNorm parameters."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]


def set_lr(optimizers: Optimizers, step: int, cfg: OptimConfig, max_iters: int) -> float:
    """Set every param group's lr for `step` (each group's peak `base_lr` times the schedule's factor) and
    return the AdamW learning rate, for logging."""
    lr = lr_at(step, cfg, max_iters)
    factor = lr / cfg.lr
    for group in optimizers.param_groups:
        group["lr"] = group["base_lr"] * factor
    return lr


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before clipping.

    As torchtitan: under FSDP2 the norm of sharded (DTensor) gradients is reduced to the full norm *before*
    the clip coefficient is computed (`torch.nn.utils.clip_grad_norm_` would scale each shard by a
    coefficient from a partial norm, and the run would drift from the single-process one).
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: sum the shards' squared norms across ranks
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
