"""The trainer: pretraining and fine-tuning GPT-2 from a Hydra config, one process or many (torchrun).

`run(cfg)` is what `train.py` and the `gpt2-train` console script call. It builds a `Trainer`, whose `fit()`
loop reads like nanoGPT's: maybe evaluate and checkpoint, `train_step()`, log. Everything else lives in its own
module: LR schedule and optimizers in `gpt2.optim`, process groups in `gpt2.distributed`, batches in
`gpt2.data`, metrics in `gpt2.metrics`, the checkpoint file in `gpt2.checkpoint`.

A run lives in `out_dir` (DESIGN.md): `ckpt.pt` (latest, atomic), `best.pt` (lowest val loss), the resolved
`config.yaml` and `metrics.jsonl`. If `out_dir/ckpt.pt` exists, the same command resumes it exactly: model,
optimizer, grad scaler, counters, every rank's data-loader position and RNG states, and the wandb run id are
all in the checkpoint, so a resumed run on CPU ends with the same weights, bit for bit, as an uninterrupted one.
SIGTERM/SIGINT/SIGHUP finish the current step, write a checkpoint and exit; `run` holds out_dir's lock.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from gpt2 import checkpoint, distributed
from gpt2.config import PRETRAINED, TrainConfig, TrainRunConfig, to_dict, to_object
from gpt2.data import TokenLoader, check_block_size, eval_batches, open_dataset
from gpt2.device import autocast, check_memory, configure_backends, resolve_dtype
from gpt2.distributed import DistInfo, print0
from gpt2.errors import UserError, exit_on_user_error
from gpt2.metrics import MetricsLogger, mfu, peak_flops
from gpt2.model import GPT, GPTConfig
from gpt2.optim import build_optimizer, schedule_warning, set_lr
from gpt2.resources import CONFIG_DIR
from gpt2.runlock import check_shared, run_lock

BEST_NAME = "best.pt"
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "bias")
"""Model keys that define the architecture: a checkpoint's values win, and an override that disagrees is an error."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop a run with a checkpoint: a scheduler's notice, Ctrl-C, a closed terminal or dropped ssh."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf. The last good checkpoint is left untouched."""


@dataclass
class TrainState:
    """The trainer's own counters: resumable state, saved at the top level of the checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    best_val_loss: float = math.inf
    tokens_seen: int = 0
    wandb_run_id: Optional[str] = None
    last_eval_step: int = -1
    """The step whose eval is logged: a resume does not repeat it, and one stopped mid-eval redoes it."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in asdict(self):
            setattr(self, key, state.get(key, getattr(self, key)))
        if "last_eval_step" not in state:  # checkpoints before it was kept were written right after an eval
            self.last_eval_step = state["step"]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states (torch CPU, and the current CUDA device). Dropout is the only consumer;
    the data order comes from the loader's own seeded state, and no numpy/python RNG is used."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].clone())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].clone(), device)


class Trainer:
    """Builds everything a run needs from `cfg` (resuming `out_dir/ckpt.pt` when present) and trains it.

    Attributes: `model` (the unwrapped GPT, compiled in place when `compile` is on; its state dict has plain
    keys), `net` (what the forward/backward go through: `model`, or its DDP wrapper, or `model` sharded by
    FSDP2), `optimizer`, `scaler`, `loader`, `state` (counters), `logger`.
    """

    def __init__(self, cfg: TrainRunConfig, info: DistInfo, explicit_model_keys: frozenset[str] = frozenset()):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        configure_backends(self.device)
        tc = cfg.train
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / checkpoint.CKPT_NAME
        self.ds = open_dataset(cfg.data.name)

        # Model: resume > fine-tune init > scratch. Same seed on every rank, so FSDP shards agree.
        torch.manual_seed(cfg.seed)
        self.state = TrainState()
        resuming = distributed.broadcast_object(self.ckpt_path.exists())  # rank 0 decides; out_dir is shared
        ckpt = checkpoint.load(self.ckpt_path) if resuming else None
        if ckpt is not None:
            self._check_resume(ckpt)
            model = self._model_from_resume(ckpt, explicit_model_keys)
        elif cfg.init_from == "scratch":
            model_cfg = GPTConfig(**asdict(cfg.model), vocab_size=self.ds.vocab_size)
            check_block_size(self.ds, model_cfg.block_size)  # before allocating anything
            check_memory(model_cfg, self.device, info.world_size if tc.parallelism == "fsdp" else 1)
            with torch.device(self.device):
                model = GPT(model_cfg)
        else:
            model = self._model_from_init(cfg.init_from, explicit_model_keys)
        self.ds.check_vocab(model.config.vocab_size)
        cfg.model = type(cfg.model)(**{k: getattr(model.config, k) for k in asdict(cfg.model)})  # the truth
        self.model = model.to(self.device).train()
        self.block_size = model.config.block_size
        tc.grad_accum_steps = _grad_accum_steps(tc, self.block_size, info.world_size)
        self.accum = tc.grad_accum_steps // info.world_size  # micro-steps per rank per optimizer step

        self.compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        if self.compile:
            _compile(self.model, tc.parallelism if info.is_distributed else "none")
        self.net = distributed.wrap_model(self.model, info, tc.parallelism)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.loader = TokenLoader(
            self.ds, "train", batch_size=tc.batch_size, block_size=self.block_size, rank=info.rank,
            world_size=info.world_size, seed=cfg.seed, device=self.device,
        )
        self.resumed_at: int | None = None
        if ckpt is not None:
            self._load_train_state(ckpt)

        self.tokens_per_step = tc.batch_size * self.block_size * tc.grad_accum_steps
        self.flops_per_token = self.model.flops_per_token(self.block_size)
        self.peak_flops = peak_flops(self.device, self.dtype)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(to_dict(cfg)), self.out_dir / "config.yaml")
        self.logger = MetricsLogger(
            self.out_dir,
            enabled=info.is_main,
            wandb_cfg=cfg.wandb,
            run_config=to_dict(cfg),
            wandb_run_id=self.state.wandb_run_id,
            resume_step=self.state.step if self.resumed_at is not None else -1,  # a fresh run keeps no records
        )
        self.state.wandb_run_id = self.logger.wandb_run_id
        self.hellaswag = self._load_hellaswag() if cfg.eval.hellaswag_interval else None
        self._stop_signal: int | None = None
        # Last, so that nothing above draws from it: dropout masks differ across ranks, and a resumed run
        # continues this rank's RNG stream where it stopped.
        torch.manual_seed(cfg.seed + info.rank)
        if ckpt is not None and info.rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][info.rank], self.device)

    # ----------------------------------------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Train until `train.max_iters` optimizer steps; evaluate and checkpoint every `eval_interval`."""
        tc = self.cfg.train
        self._print_summary()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            while self.state.step < tc.max_iters:
                step = self.state.step
                if tc.eval_interval and step % tc.eval_interval == 0 and step != self.state.last_eval_step:
                    self.evaluate_and_checkpoint()
                    self._stop_if_asked()  # a signal during a long eval is answered when the eval gives up
                if self.hellaswag and step % self.cfg.eval.hellaswag_interval == 0 and step != self.resumed_at:
                    self.evaluate_hellaswag()
                metrics = self.train_step()
                self.state.step += 1
                if self.state.step % tc.log_interval == 0 or self.state.step == tc.max_iters:
                    self.logger.log(metrics, self.state.step)
                self._stop_if_asked()
            if self.state.step != self.state.last_eval_step:
                self.evaluate_and_checkpoint()
                self._stop_if_asked()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches per rank. Returns the step's metrics (DESIGN.md keys)."""
        t0 = time.perf_counter()
        lr = set_lr(self.optimizer, self.state.step, self.cfg.optim, self.cfg.train.max_iters)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            # The gradient all-reduce runs once, on the last micro-step.
            with distributed.no_sync(self.net, enabled=micro < self.accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.net(x, y)  # cross-entropy computed in fp32 under autocast
                loss = loss / self.accum  # gradients of the mean over micro-steps
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.optimizer.unscale_(self.scaler)
        clip = self.cfg.train.grad_clip or math.inf  # inf: measure the norm, clip nothing
        grad_norm = clip_grad_norm_(list(self.model.parameters()), clip)
        loss_value = distributed.all_reduce_mean(loss_sum).item()  # also waits for the device
        norm_value = float(grad_norm)
        if not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value)):
            raise TrainingDiverged(
                f"training diverged at step {self.state.step}: loss {loss_value}, grad norm {norm_value}; the last "
                f"good checkpoint is {self.ckpt_path}. Lower optim.lr or raise optim.warmup_iters, then rerun the "
                "same command to resume from it"
            )
        self.optimizer.step(self.scaler)  # with fp16, skipped when gradients overflowed
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.state.tokens_seen += self.tokens_per_step
        tokens_per_sec = self.tokens_per_step / dt
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "ms_per_step": 1000 * dt,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu(self.flops_per_token, tokens_per_sec, self.peak_flops, self.info.world_size),
            "tokens_seen": self.state.tokens_seen,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss over `eval_iters` fixed batches of each split (the same batches every eval), all ranks.
        A single process gives up between batches when a stop signal came (None): a long eval must not outlast
        a scheduler's grace period. (Ranks of a distributed run finish it together, then stop.)"""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            batches = list(
                eval_batches(self.ds, split, num_batches=self.cfg.train.eval_iters,
                             batch_size=self.cfg.train.batch_size, block_size=self.block_size,
                             rank=self.info.rank, world_size=self.info.world_size, device=self.device)
            )
            total = torch.zeros(2, device=self.device)  # (sum of losses, batches)
            if distributed.is_sharded(self.net):
                # FSDP2's forward is a collective: every rank runs the same number of them (padding weighs 0).
                n = math.ceil(self.cfg.train.eval_iters / self.info.world_size)
                batches = [(b, 1.0) for b in batches] + [(batches[0] if batches else None, 0.0)] * (n - len(batches))
            else:
                batches = [(b, 1.0) for b in batches]
            for batch, weight in batches:
                if self._stop_signal is not None and not self.info.is_distributed:
                    self.model.train()
                    return None
                x, y = batch if batch is not None else self._dummy_batch()
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                total += torch.stack([loss.float() * weight, torch.tensor(weight, device=self.device)])
            distributed.all_reduce_mean(total)
            out[f"{split}_loss"] = (total[0] / total[1]).item()
        self.model.train()
        return out

    def evaluate_and_checkpoint(self) -> None:
        metrics = self.evaluate()
        if metrics is None:  # given up for a stop signal: the checkpoint the stop writes will redo it
            return
        self.logger.log(metrics, self.state.step)
        self.state.last_eval_step = self.state.step
        best = metrics["val_loss"] < self.state.best_val_loss
        if best:
            self.state.best_val_loss = metrics["val_loss"]
        # Nothing to save before the first step (a rerun starts over identically). It also matters: gathering
        # an FSDP2 optimizer's still-empty state would initialise it with a step, changing Adam's first update.
        if self.state.step > 0:
            self.save_checkpoint(best=best)

    def evaluate_hellaswag(self) -> None:
        """HellaSwag acc / acc_norm (ranks score disjoint examples, then all-reduce), logged like val loss."""
        from gpt2.eval import hellaswag

        metrics = hellaswag.training_metrics(
            self.model, self.ds.tokenizer, self.hellaswag, self.device, self.dtype,
            self.info.rank, self.info.world_size,
        )
        self.logger.log(metrics, self.state.step)

    def _load_hellaswag(self) -> list:
        """The examples for in-training HellaSwag: checked before training, downloaded once by rank 0."""
        from gpt2.eval import hellaswag

        ec = self.cfg.eval
        hellaswag.check_tokenizer(self.ds.tokenizer)
        if self.info.is_main:
            hellaswag.load_examples(ec.hellaswag_path, ec.hellaswag_limit)
        distributed.barrier()
        return hellaswag.load_examples(ec.hellaswag_path, ec.hellaswag_limit)

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, best: bool = False) -> None:
        """Write `ckpt.pt` atomically (every rank takes part: it gathers sharded weights and per-rank states);
        with `best`, `best.pt` becomes a hard link to the same file (a copy where links are unsupported)."""
        model_state = distributed.full_model_state(self.model)
        optim_state = {
            "optimizers": [distributed.full_optimizer_state(self.model, o) for o in self.optimizer.optimizers]
        }
        loaders = distributed.all_gather_object(self.loader.state_dict())
        rngs = distributed.all_gather_object(rng_state(self.device))
        if self.info.is_main:
            checkpoint.save(
                self.ckpt_path,
                {
                    "model": model_state,
                    "model_config": asdict(self.model.config),
                    "tokenizer": self.ds.tokenizer.to_dict(),
                    "data_fingerprint": self.ds.fingerprint,
                    "config": to_dict(self.cfg),
                    "optimizer": optim_state,
                    "scaler": self.scaler.state_dict(),
                    **self.state.state_dict(),
                    "loader": loaders,
                    "rng": rngs,
                },
            )
            if best:
                _link_or_copy(self.ckpt_path, self.out_dir / BEST_NAME)
        distributed.barrier()

    def _load_train_state(self, ckpt: dict[str, Any]) -> None:
        """Restore optimizer, scaler, counters and the loader position from a checkpoint. The optimizer's state
        (moments, step counts) comes from the checkpoint; its hyperparameters from this command's optim.*, so
        a changed lr or weight decay applies from the resume step, as config.yaml and the log say."""
        configured = self.optimizer.hyperparameters()
        for opt, s in zip(self.optimizer.optimizers, _optimizer_states(ckpt, len(self.optimizer.optimizers))):
            distributed.load_full_optimizer_state(self.model, opt, s)
        self.optimizer.set_hyperparameters(configured)
        changed = [f"optim.{k} {v} -> {getattr(self.cfg.optim, k)}" for k, v in ckpt["config"]["optim"].items()
                   if v != getattr(self.cfg.optim, k)]  # fmt: skip
        if changed:
            print0(f"resuming with changed {', '.join(changed)}: applied from step {ckpt['step']}")
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state.load_state_dict(ckpt)
        # The loader's position counts global micro-batches, so it is valid at any world size. (RNG states,
        # per rank, are restored at the end of __init__.)
        self.loader.load_state_dict(ckpt["loader"][0])
        self.resumed_at = self.state.step

    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        """A rerun continues the run in out_dir: an init_from that disagrees with it, or a max_iters below the
        step it reached, is an error (never silently ignored, never written into config.yaml)."""
        theirs = ckpt["config"].get("init_from", "scratch")
        if self.cfg.init_from != theirs:
            raise UserError(
                f"init_from={self.cfg.init_from} disagrees with the run in {self.out_dir}, which started from "
                f"init_from={theirs}; rerun with init_from={theirs} to resume it, or use a new out_dir"
            )
        if self.cfg.train.max_iters < ckpt["step"]:
            raise UserError(
                f"train.max_iters={self.cfg.train.max_iters} is below step {ckpt['step']}, which the run in "
                f"{self.out_dir} has reached; raise train.max_iters to train on, or use a new out_dir"
            )

    def _model_from_resume(self, ckpt: dict[str, Any], explicit: frozenset[str]) -> GPT:
        """The checkpointed model; model.* values that disagree with it are an error naming the key."""
        saved = ckpt["model_config"]
        scratch = ckpt.get("config", {}).get("init_from", "scratch") == "scratch"
        # A run from scratch takes its architecture from the config, so the whole config must agree; a
        # fine-tune run's came from its init, so only the keys typed on the command line are compared.
        all_keys = (*ARCH_KEYS, "block_size", "dropout")
        keys = all_keys if scratch else tuple(k for k in all_keys if k in explicit)
        for key in keys:
            if getattr(self.cfg.model, key) != saved[key]:
                raise UserError(
                    f"model.{key}={getattr(self.cfg.model, key)} disagrees with the run being resumed in "
                    f"{self.out_dir} (model.{key}={saved[key]}); drop the override or use a new out_dir"
                )
        self.ds.check_tokenizer(ckpt["tokenizer"])
        print0(f"resuming {self.ckpt_path} at step {ckpt['step']}")
        if ckpt.get("data_fingerprint", self.ds.fingerprint) != self.ds.fingerprint:
            print0(f"warning: {self.ds.dir} was prepared again since this run's last checkpoint: the run goes on with "
                   "the new data, so its batches differ from an uninterrupted run's")
        return checkpoint.model_from_state(ckpt, self.device)

    def _model_from_init(self, init_from: str, explicit: frozenset[str]) -> GPT:
        """Fine-tuning: a pretrained name, a Hugging Face-layout dir, or one of our checkpoints (a run dir or
        .pt). Its architecture wins; block_size may shrink (positions cropped) and dropout may change."""
        path = Path(init_from)
        if init_from in PRETRAINED or (path.is_dir() and (path / "config.json").exists()):
            from gpt2 import hf

            model, source, tokenizer = hf.load_pretrained(init_from), init_from, {"name": "gpt2"}
        else:
            if not path.exists() and not init_from.endswith(".pt"):
                raise UserError(
                    f"init_from={init_from!r} is neither scratch, a pretrained name ({', '.join(PRETRAINED)}), "
                    "a Hugging Face-layout directory nor a checkpoint; fix the name or the path"
                )
            ckpt = checkpoint.load(init_from)
            model, source, tokenizer = checkpoint.model_from_state(ckpt), init_from, ckpt["tokenizer"]
        self.ds.check_tokenizer(tokenizer)
        have = model.config
        for key in ARCH_KEYS:
            if key in explicit and getattr(self.cfg.model, key) != getattr(have, key):
                raise UserError(
                    f"model.{key}={getattr(self.cfg.model, key)} disagrees with init_from={source} "
                    f"(model.{key}={getattr(have, key)}); drop the override: the architecture comes from the init"
                )
        block_size = self.cfg.model.block_size if "block_size" in explicit else have.block_size
        if block_size > have.block_size:
            raise UserError(
                f"model.block_size={block_size} is larger than init_from={source}'s {have.block_size} positions; "
                f"use model.block_size<={have.block_size}"
            )
        dropout = self.cfg.model.dropout if "dropout" in explicit else have.dropout
        if (block_size, dropout) != (have.block_size, have.dropout):
            state = model.state_dict()
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()  # crop
            new = replace(have, block_size=block_size, dropout=dropout)
            model = checkpoint.model_from_state({"model": state, "model_config": asdict(new)})
        print0(f"fine-tuning from {source}")
        return model.to(self.device)

    # ---------------------------------------------------------------------------------------------- plumbing

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first signal stops the run after the current step, with a checkpoint; a second one at once."""
        if self._stop_signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        if signum == signal.SIGHUP and sys.stdout.isatty():  # the terminal is gone: writing to it would fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(devnull, fd)
        self._stop_signal = signum  # acted on after the current step, when the state is consistent
        print0(f"got {signal.Signals(signum).name}: finishing this step, then saving {self.ckpt_path} "
               "(send it again to stop at once, without saving)")

    def _stop_if_asked(self) -> None:
        """After a stop signal (on any rank): save a checkpoint of the current step and exit 128 + signal."""
        if self._should_stop():
            self.save_checkpoint()
            print0(f"stopped by signal {self._stop_signal} at step {self.state.step}: checkpoint saved "
                   f"to {self.ckpt_path}; rerun the same command to resume")
            raise SystemExit(128 + self._stop_signal)

    def _should_stop(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT (ranks must agree: the checkpoint save is collective)."""
        if not self.info.is_distributed:
            return self._stop_signal is not None  # no device round trip per step
        flag = torch.tensor(float(self._stop_signal or 0), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return self._stop_signal is not None

    def _dummy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, self.block_size, dtype=torch.long, device=self.device)
        return x, x

    def _print_summary(self) -> None:
        tc, info = self.cfg.train, self.info
        print0(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters ({self.model.config.n_layer} layers, "
            f"{self.model.config.n_embd} wide, context {self.block_size}, vocab {self.model.config.vocab_size})\n"
            f"device: {self.device} x {info.world_size}, dtype {str(self.dtype).removeprefix('torch.')}, "
            f"compile {self.compile}, parallelism {tc.parallelism if info.is_distributed else 'none'}\n"
            f"batch: {self.tokens_per_step:,} tokens per step = {tc.batch_size} sequences x {self.block_size} tokens "
            f"x {self.accum} micro-steps x {info.world_size} ranks; {tc.max_iters} steps; out_dir {self.out_dir}"
        )
        warning = schedule_warning(self.cfg.optim, tc.max_iters)
        if warning:
            print0(warning)


def _grad_accum_steps(tc: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step over all ranks: `train.grad_accum_steps`, or derived from
    `train.tokens_per_step` when set. Either way a multiple of the world size."""
    steps = tc.grad_accum_steps
    if tc.tokens_per_step is not None:
        per_micro = tc.batch_size * block_size
        if tc.tokens_per_step % (per_micro * world_size):
            raise UserError(
                f"train.tokens_per_step={tc.tokens_per_step} is not a multiple of batch_size x block_size x "
                f"processes = {tc.batch_size} x {block_size} x {world_size} = {per_micro * world_size}; "
                "round it to a multiple of that"
            )
        steps = tc.tokens_per_step // per_micro
    if steps % world_size:
        raise UserError(
            f"train.grad_accum_steps={steps} is not divisible by the {world_size} processes; "
            f"make it a multiple of {world_size} (the global batch is batch_size x grad_accum_steps)"
        )
    return steps


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


def _compile(model: GPT, parallelism: str) -> None:
    """torch.compile in place (the module and its state-dict keys stay as they are). Under FSDP2, each block
    is compiled on its own (as torchtitan), so the per-block all-gathers stay outside the compiled graphs."""
    if parallelism == "fsdp":
        for block in model.transformer.h:
            block.compile()
    else:
        model.compile()


def _optimizer_states(ckpt: dict[str, Any], n: int) -> list[dict[str, Any]]:
    states = ckpt["optimizer"]["optimizers"]
    if len(states) != n:
        raise UserError(
            f"the checkpoint holds {len(states)} optimizer state(s) but optim.name={ckpt['config']['optim']['name']!r} "
            f"was the run's optimizer; resume with the same optim.name, or start a new out_dir"
        )
    return states


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src`, atomically (a hard link costs nothing; `src` is later replaced
    by a new file, not rewritten, so the link keeps this version)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _explicit_model_keys() -> frozenset[str]:
    """model.* keys typed on the command line (all of them for a `model=<preset>` choice). Fine-tuning and
    resuming compare only these with the checkpoint's architecture: the rest are the preset's defaults."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model":
            return frozenset((*ARCH_KEYS, "block_size", "dropout"))
        if key.startswith("model."):
            keys.add(key.removeprefix("model."))
    return frozenset(keys)


def _job_out_dir(out_dir: str) -> str:
    """Under a Hydra multirun (`-m`), each job trains in its own subfolder of out_dir, named by its overrides,
    so sweep jobs never resume each other's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir  # train.yaml: hydra.sweep = out_dir/<override_dirname>
    return out_dir


def run(cfg: DictConfig) -> None:
    """Train (or resume) the run `cfg` describes. Called by `train.py` and `gpt2-train`."""
    explicit = _explicit_model_keys()
    run_cfg = to_object(cfg, TrainRunConfig)
    run_cfg.out_dir = _job_out_dir(run_cfg.out_dir)
    info = distributed.init(run_cfg.device)
    try:
        with run_lock(run_cfg.out_dir, enabled=info.is_main):  # one trainer per out_dir (rank 0 holds it)
            if info.is_distributed:
                check_shared(run_cfg.out_dir, info.is_main)
            if info.is_main:
                for path in checkpoint.remove_stale_temporaries(run_cfg.out_dir):
                    print0(f"removed {path}, left by a save that was interrupted")
            Trainer(run_cfg, info, explicit).fit()
    finally:
        distributed.cleanup()


def main() -> None:
    """The `gpt2-train` console script: train.py, runnable from any directory."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(exit_on_user_error(run))()
