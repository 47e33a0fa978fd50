"""The trainer: pretraining and fine-tuning GPT-2 from a Hydra config, one process or many (torchrun).

`run(cfg)` is what `train.py` and the `gpt2-train` console script call. It builds a `Trainer`, whose `fit()`
loop reads like nanoGPT's: maybe evaluate and checkpoint, `train_step()`, log. Everything else lives in its own
module: the model a run starts from (resume, fine-tuning init, scratch, LoRA) in `gpt2.run_model`, LR schedule,
optimizers and clipping in `gpt2.optim`, process groups in `gpt2.distributed`, batches in `gpt2.data`, logging in
`gpt2.metrics`, MFU in `gpt2.flops`, NaN/inf detection in `gpt2.divergence`, stop signals in `gpt2.stopping`,
the checkpoint file and `Checkpointer` (which saves and restores every resumable component, listed in
`Trainer.__init__`) in `gpt2.checkpoint`.

A run lives in `out_dir`: `ckpt.pt` (latest, atomic), `best.pt` (lowest val loss), the resolved
`config.yaml` and `metrics.jsonl`; a distributed run's checkpoints are sharded folders under `ckpt/` instead
(`gpt2.sharded_checkpoint`). If out_dir has a checkpoint, the same command resumes it exactly: model,
optimizer, grad scaler, counters, the data-loader position, every rank's RNG states and the wandb run id are
all in the checkpoint, so a resumed run on CPU ends with the same weights, bit for bit, as an uninterrupted one.
SIGTERM/SIGINT/SIGHUP finish the current step, write a checkpoint and exit; `run` holds out_dir's lock.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gpt2 import checkpoint, distributed
from gpt2.checkpoint import Checkpointer
from gpt2.cli import job_out_dir, typed_keys
from gpt2.config import CUDA_GRAPH_MODES, TrainConfig, TrainRunConfig, check_no_preparation_keys, to_dict, to_object
from gpt2.data import Batch, TokenLoader, eval_batches, open_dataset
from gpt2.data.loader import resolve_packing
from gpt2.device import autocast, configure_backends, resolve_dtype
from gpt2.distributed import DistInfo, FullModelState, print0
from gpt2.divergence import DivergenceWatch
from gpt2.dpo import DPO, check_objective, reward_metrics
from gpt2.errors import UserError, exit_on_user_error
from gpt2.eval import hellaswag
from gpt2.flops import mfu, peak_flops
from gpt2.lora import adapter_names
from gpt2.metrics import MetricsLogger
from gpt2.model import GPT
from gpt2.optim import build_optimizer, clip_grad_norm_, schedule_warning, set_lr
from gpt2.resources import CONFIG_DIR
from gpt2.rng import RankRNG
from gpt2.run_model import MODEL_KEYS, build_model
from gpt2.runlock import check_shared, run_lock
from gpt2.stopping import StopSignals


@dataclass
class TrainState:
    """The trainer's own counters: resumable state, saved at the top level of the checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    best_val_loss: float = math.inf
    tokens_seen: int = 0
    last_eval_step: int = -1
    """The step whose eval is logged: a resume does not repeat it, and one stopped mid-eval redoes it."""
    evals_since_best: int = 0
    """Evaluations in a row without a new best val loss (for train.early_stopping_patience)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in asdict(self):
            setattr(self, key, state.get(key, getattr(self, key)))
        if "last_eval_step" not in state:  # checkpoints before it was kept were written right after an eval
            self.last_eval_step = state["step"]


class Trainer:
    """Builds everything a run needs from `cfg` (resuming out_dir's latest checkpoint when present) and trains it.

    Attributes: `model` (the GPT itself, compiled in place when `compile` is on; its state dict has plain keys),
    `parallel_model` (what the forward/backward go through: `model`, its DDP wrapper, or `model` sharded in
    place by FSDP2), `optimizers`, `scaler`, `loader`, `state` (counters), `logger`, and `checkpointer`, which
    lists every resumable component and is the one place they are saved and restored.
    """

    def __init__(self, cfg: TrainRunConfig, info: DistInfo, typed_model_keys: frozenset[str] = frozenset()):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        configure_backends(self.device)
        self.out_dir = Path(cfg.out_dir)
        self.ds = open_dataset(cfg.data.name)
        resumed = distributed.broadcast_object(checkpoint.latest(self.out_dir) if info.is_main else None)
        fsdp = info.is_distributed and cfg.train.parallelism == "fsdp"
        ckpt = checkpoint.load_for_ranks(resumed, info, rank_0_only=fsdp) if resumed else None
        check_objective(cfg, self.ds)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, so FSDP shards agree
        self.model, initial_state, self.chat_template = build_model(
            cfg, self.ds, info, self.dtype, ckpt, typed_model_keys
        )
        cfg.model = self.model.config.arch  # the truth, for config.yaml and the checkpoint
        self.block_size = self.model.config.block_size
        train = cfg.train
        train.grad_accum_steps = _grad_accum_steps(train, self.block_size, info.world_size)
        self.accum = train.grad_accum_steps // info.world_size  # micro-steps per rank per optimizer step
        rows = 2 if cfg.objective == "dpo" else 1  # (a DPO batch element is a pair of sequences)
        self.tokens_per_step = train.batch_size * rows * self.block_size * train.grad_accum_steps
        resumed_packing = ckpt["config"]["data"].get("packing", False) if ckpt else None  # (older runs: padded)
        cfg.data.packing = resolve_packing(self.ds, cfg.data.packing, resumed_packing)
        self.compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        self.dpo = DPO.for_run(cfg, self.device) if cfg.objective == "dpo" else None
        if self.compile:
            _compile(self.model, train.parallelism if info.is_distributed else "none", cfg.compile_mode)
        self.parallel_model = distributed.wrap_model(self.model, info, train.parallelism, self.dtype)
        if distributed.is_sharded(self.parallel_model):
            distributed.materialize(self.model, self.device, initial_state)
        self.optimizers = build_optimizer(self.model, cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.loader = TokenLoader(
            self.ds,
            "train",
            batch_size=train.batch_size,
            block_size=self.block_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.seed,
            order=cfg.data.order,
            packing=cfg.data.packing,
            device=self.device,
        )
        if train.epochs is not None:
            train.max_iters = _steps_for_epochs(train, len(self.loader.epoch), self.loader.sequences.unit)
        self.state = TrainState()
        self.rng = RankRNG(self.device, info.rank)
        self.logger = MetricsLogger(self.out_dir, enabled=info.is_main, wandb_cfg=cfg.wandb, run_config=to_dict(cfg))
        self.checkpointer = Checkpointer(
            self.out_dir,
            components={
                "model": FullModelState(self.model, adapter_names(self.model) if cfg.lora.rank else None),
                "optimizer": self.optimizers,
                "scaler": self.scaler,
                "loader": self.loader,
                "rng": self.rng,
            },
            counters=(self.state, self.logger),
            metadata=self._run_metadata,
            is_main=info.is_main,
            background=self.device.type != "cpu",  # (on the CPU a snapshot would double the run's memory)
            sharded=info.is_distributed if train.sharded_checkpoint is None else train.sharded_checkpoint,
        )
        self.flops_per_token = self.model.flops_per_token(self.block_size)
        self.peak_flops = peak_flops(self.device, self.dtype)
        self.hellaswag = None
        if cfg.eval.hellaswag_interval:
            self.hellaswag = hellaswag.examples_for_training(cfg.eval, self.ds.tokenizer, info)
        self.stop = StopSignals(info, saving_to=self.checkpointer.where)
        self._said_early_stop = False
        self.divergence = DivergenceWatch(self.device, check_grad_norm=not self.scaler.is_enabled())
        self._clock = (time.perf_counter(), 0)  # (time, step) the speed is measured from (`_read_metrics`)
        self._write_run_config()
        # Last, so that nothing above draws from it: dropout masks differ across ranks, and a resumed run
        # continues this rank's RNG stream where it stopped (restored with the rest of the state).
        torch.manual_seed(cfg.seed + info.rank)
        self.resumed_at: int | None = None
        if ckpt is not None:
            self._resume(ckpt, resumed)

    def _resume(self, ckpt: dict[str, Any], path: Path) -> None:
        """Restore every component from the checkpoint at `path` (a sharded one: each rank reads its part of it).
        The optimizer's moments come from it, its hyperparameters from this command's optim.* (said when they
        changed)."""
        print0(f"resuming {path} at step {ckpt['step']}")
        self.checkpointer.restore(ckpt, directory=path if path.is_dir() else None)
        self.resumed_at = self.state.step
        changed = [
            f"optim.{k} {v} -> {getattr(self.cfg.optim, k)}"
            for k, v in ckpt["config"]["optim"].items()
            if v != getattr(self.cfg.optim, k)
        ]
        if changed:
            print0(f"resuming with changed {', '.join(changed)}: applied from step {ckpt['step']}")

    def _run_metadata(self) -> dict[str, Any]:
        """What a checkpoint holds besides the resumable state: what the run is (see gpt2.checkpoint)."""
        return {
            "model_config": asdict(self.model.config),
            "tokenizer": self.ds.tokenizer.to_dict(),
            "chat_template": self.chat_template,
            "data_fingerprint": self.ds.fingerprint,
            "config": to_dict(self.cfg),
        }

    def _write_run_config(self) -> None:
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(to_dict(self.cfg)), self.out_dir / "config.yaml")

    # ----------------------------------------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Train until `train.max_iters` optimizer steps; evaluate and checkpoint every `eval_interval`."""
        train = self.cfg.train
        self._print_summary()
        self.logger.start(resume_step=self.state.step if self.resumed_at is not None else -1)
        self._restart_clock()
        with contextlib.closing(self.logger), self.stop:
            while self.state.step < train.max_iters and not self._stopped_early():  # (a resumed run may be done)
                step = self.state.step
                if train.eval_interval and step % train.eval_interval == 0 and step != self.state.last_eval_step:
                    self.evaluate_and_checkpoint()
                    self._stop_if_asked()  # a signal during a long eval is answered when the eval gives up
                    if self._stopped_early():
                        break
                if self.hellaswag and step % self.cfg.eval.hellaswag_interval == 0 and step != self.resumed_at:
                    self.evaluate_hellaswag()
                if self.state.step == self._clock[1]:
                    self._restart_clock()  # the speed of training steps, not of evals or start-up
                last = self.train_step()
                if last is None:  # abandoned for a stop signal
                    self._stop(self.stop.signal, abandoned=True)
                if self.state.step % train.log_interval == 0 or self.state.step == train.max_iters:
                    self.logger.log(self._read_metrics(last), self.state.step)
                self._stop_if_asked(after_step=True)
            if self.state.step != self.state.last_eval_step and not self._stopped_early():
                self.evaluate_and_checkpoint()
                self._stop_if_asked()
            self.checkpointer.wait()

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step over `accum` micro-batches per rank. Nothing here waits for the device: the loss
        and gradient norm stay on it (returned as tensors) until a log step reads them, and a NaN/inf is
        remembered on the device by `divergence` until then. None: a stop signal abandoned the step (nothing
        changed: see `_accumulate_gradients`)."""
        lr = set_lr(self.optimizers, self.state.step, self.cfg.optim, self.cfg.train.max_iters)
        accumulated = self._accumulate_gradients()
        if accumulated is None:
            return None
        loss, rewards = accumulated
        self.optimizers.unscale_(self.scaler)
        clip = self.cfg.train.grad_clip or math.inf  # inf: measure the norm, clip nothing
        grad_norm = clip_grad_norm_(list(self.model.parameters()), clip)
        self.divergence.update(self.state.step, loss, grad_norm)
        self.optimizers.step(self.scaler)  # with fp16, skipped when gradients overflowed
        distributed.zero_grad(self.parallel_model, self.optimizers)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "rewards": rewards}

    def _read_metrics(self, last: dict[str, Any]) -> dict[str, float]:
        """The metrics of a log step (metrics.jsonl keys), read from the device once: the last step's loss (mean over
        ranks) and gradient norm, and the speed over the steps since the previous log line."""
        self.divergence.check(self.checkpointer.where)
        loss = distributed.all_reduce_mean(last["loss"].detach().clone()).item()
        now, steps = time.perf_counter(), self.state.step - self._clock[1]
        dt = (now - self._clock[0]) / max(1, steps)
        self._clock = (now, self.state.step)
        tokens_per_sec = self.tokens_per_step / dt
        rewards = (
            {} if last["rewards"] is None else reward_metrics(distributed.all_reduce_mean(last["rewards"].clone()))
        )
        return {
            **rewards,
            "loss": loss,
            "lr": last["lr"],
            "grad_norm": float(last["grad_norm"]),
            "ms_per_step": 1000 * dt,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu(self.flops_per_token, tokens_per_sec, self.peak_flops, self.info.world_size),
            "tokens_seen": self.state.tokens_seen,
        }

    def _restart_clock(self) -> None:
        self._clock = (time.perf_counter(), self.state.step)

    def _accumulate_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Forward and backward over this rank's micro-batches; the gradients are of the mean loss over every
        target (DPO: pair) of the step's micro-batches on all ranks. Returns this rank's part of that loss times
        the number of ranks (so that their mean is the loss), and with DPO the step's reward sums, on the device.
        None when the ranks abandoned the step for a stop signal (train.stop_grace_s): the gradients are dropped
        and the data position and RNG are back where the step started, so a resume redoes it exactly."""
        loss_sum = torch.zeros((), device=self.device)
        reward_sums = torch.zeros(4, device=self.device) if self.dpo else None
        abandonable = self.accum > 1 and self.cfg.train.stop_grace_s > 0
        started = time.perf_counter()
        start = (self.loader.state_dict(), self.rng.local_state()) if abandonable else None
        for micro, weight in enumerate(self.loader.micro_batch_weights(self.accum)):
            if micro and start and self.stop.abandon_step(lambda: self._past_grace(started, micro)):
                distributed.zero_grad(self.parallel_model, self.optimizers)
                self.loader.load_state_dict(start[0])
                self.rng.set_local_state(start[1])
                return None
            batch = self.loader.next_batch()
            # The gradient all-reduce runs once, on the last micro-step (FSDP: unless fsdp_reduce_every_micro_step).
            last = micro == self.accum - 1
            with distributed.no_sync(self.parallel_model, not last, not self.cfg.train.fsdp_reduce_every_micro_step):
                loss, rewards = self._loss(self.parallel_model, batch)
                loss = loss * weight  # gradients of the mean over all targets of the step (1 / accum for tokens)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            if rewards is not None:
                reward_sums += rewards
        return loss_sum, reward_sums

    def _past_grace(self, started: float, done: int) -> bool:
        """Whether finishing this step (at the pace of its `done` micro-steps so far) and then saving (as long as
        the last save took) would end more than train.stop_grace_s after the stop signal."""
        now = time.perf_counter()
        finish = now + (now - started) / done * (self.accum - done) + self.checkpointer.last_save_s
        return finish > self.stop.since + self.cfg.train.stop_grace_s

    def _loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean loss of a batch through `model` (the chunked loss, gpt2.loss) and, with DPO, its reward sums."""
        if self.compile and self.cfg.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # each pass is new: its outputs replace the last pass's
        with autocast(self.device, self.dtype):
            if self.dpo is not None:
                return self.dpo.loss(model, self.model, batch.x, batch.y)
            _, loss = model(batch.x, batch.y, return_logits=False, positions=batch.positions)
        return loss, None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss over the targets of `eval_iters` fixed batches of each split (the same batches every eval),
        all ranks. A single process gives up between batches when a stop signal came (None): a long eval must not
        outlast a scheduler's grace period. (Ranks of a distributed run finish it together, then stop.)"""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            total = torch.zeros(6, device=self.device)  # (sum of losses, targets or pairs, DPO's reward sums)
            for batch in self._eval_batches(split):
                if self.stop.requested and not self.info.is_distributed:
                    self.model.train()
                    return None
                loss, rewards = self._loss(self.model, batch)
                if rewards is None:
                    targets = (batch.y != -1).sum().float()
                    total[:2] += torch.stack([loss.float() * targets, targets])
                else:
                    total += torch.cat([torch.stack([loss.float() * rewards[3], rewards[3]]), rewards])
            distributed.all_reduce_mean(total)
            out[f"{split}_loss"] = (total[0] / total[1]).item()
            if self.dpo is not None:
                out[f"{split}_reward_accuracy"] = (total[4] / total[1]).item()  # pairs ranked right / pairs
        self.model.train()
        return out

    def _eval_batches(self, split: str) -> list[Batch]:
        """This rank's eval batches of `split`. FSDP2's forward is a collective, so there every rank runs the
        same number of forwards: the ranks with fewer batches pad with batches without targets (all -1)."""
        train = self.cfg.train
        batches = list(
            eval_batches(
                self.ds,
                split,
                num_batches=train.eval_iters,
                batch_size=train.batch_size,
                block_size=self.block_size,
                rank=self.info.rank,
                world_size=self.info.world_size,
                packing=self.cfg.data.packing,
                device=self.device,
            )
        )
        if distributed.is_sharded(self.parallel_model):
            padding = torch.full((1, self.block_size), -1, dtype=torch.long, device=self.device)
            n = math.ceil(train.eval_iters / self.info.world_size)
            positions = torch.zeros_like(padding) if self.cfg.data.packing else None
            batches += [Batch(padding.clamp(min=0), padding, positions)] * (n - len(batches))
        return batches

    def evaluate_and_checkpoint(self) -> None:
        metrics = self.evaluate()
        if metrics is None:  # given up for a stop signal: the checkpoint the stop writes will redo it
            return
        self.logger.log(metrics, self.state.step)
        self.state.last_eval_step = self.state.step
        best = metrics["val_loss"] < self.state.best_val_loss
        if best:
            self.state.best_val_loss = metrics["val_loss"]
        self.state.evals_since_best = 0 if best else self.state.evals_since_best + 1
        # Nothing to save before the first step (a rerun starts over identically). It also matters: gathering
        # an FSDP2 optimizer's still-empty state would initialise it with a step, changing Adam's first update.
        if self.state.step > 0:
            self.divergence.check(self.checkpointer.where)  # never a checkpoint of a diverged state
            self.checkpointer.save(best=best)

    def _stopped_early(self) -> bool:
        """True once train.early_stopping_patience evaluations in a row brought no new best (said once)."""
        patience = self.cfg.train.early_stopping_patience
        if not patience or self.state.evals_since_best < patience:
            return False
        if self.info.is_main and not self._said_early_stop:
            print(
                f"early stopping at step {self.state.step}: no new best val loss in {patience} evaluations "
                f"(best {self.state.best_val_loss:.4f}, in {self.checkpointer.best_where})",
                flush=True,
            )
        self._said_early_stop = True
        return True

    def evaluate_hellaswag(self) -> None:
        """HellaSwag acc / acc_norm (ranks score disjoint examples, then all-reduce), logged like val loss."""
        metrics = hellaswag.training_metrics(
            self.model,
            self.ds.tokenizer,
            self.hellaswag,
            self.device,
            self.dtype,
            self.info.rank,
            self.info.world_size,
        )
        self.logger.log(metrics, self.state.step)

    # ---------------------------------------------------------------------------------------------- plumbing

    def _stop_if_asked(self, after_step: bool = False) -> None:
        """After a stop signal (on any rank): save a checkpoint of the current step and exit 128 + signal. Ranks
        must agree (the save is collective): after a training step on the vote issued after the step before
        (no wait), elsewhere on a vote taken now."""
        signum = self.stop.agreed(after_step)
        if signum:
            self._stop(signum)

    def _stop(self, signum: int, abandoned: bool = False) -> None:
        """Save a checkpoint of the current step and exit 128 + signal (every rank: the save is collective)."""
        self.divergence.check(self.checkpointer.where)
        self.checkpointer.save()
        self.checkpointer.wait()
        why = f" (step {self.state.step + 1} abandoned to save within train.stop_grace_s)" if abandoned else ""
        print0(
            f"stopped by signal {signum} at step {self.state.step}{why}: checkpoint saved "
            f"to {self.checkpointer.where}; rerun the same command to resume"
        )
        raise SystemExit(128 + signum)

    def _print_summary(self) -> None:
        train, info = self.cfg.train, self.info
        compile_mode = f" ({self.cfg.compile_mode})" if self.compile else ""
        parallelism = train.parallelism if info.is_distributed else "none"
        print0(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters ({self.model.config.n_layer} layers, "
            f"{self.model.config.n_embd} wide, context {self.block_size}, vocab {self.model.config.vocab_size})\n"
            f"device: {self.device} x {info.world_size}, dtype {str(self.dtype).removeprefix('torch.')}, "
            f"compile {self.compile}{compile_mode}, parallelism {parallelism}\n"
            f"batch: {self.tokens_per_step:,} tokens per step = {train.batch_size} sequences x {self.block_size} "
            f"tokens x {self.accum} micro-steps x {info.world_size} ranks; {train.max_iters} steps; "
            f"out_dir {self.out_dir}\n"
            f"data: {self.cfg.data.order} order; an epoch ({len(self.loader.epoch):,} {self.loader.sequences.unit}) "
            f"is {len(self.loader.epoch) / (train.batch_size * train.grad_accum_steps):,.1f} steps"
            + (f"; rows filled to {self.loader.sequences.fill:.1%}" if self.cfg.data.packing else "")
        )
        examples = getattr(self.loader.sequences, "examples", self.loader.sequences)  # (packed: their rows')
        if self.ds.has_examples and (examples.truncated or examples.untrained):
            print0(
                f"warning: {examples.truncated:,} of {examples.count:,} training examples are longer than "
                f"block_size + 1 = {self.block_size + 1} tokens and are cut to it; {examples.untrained:,} keep no "
                "completion token within it and train nothing (raise model.block_size or shorten the prompts)"
            )
        warning = schedule_warning(self.cfg.optim, train.max_iters)
        if warning:
            print0(warning)
        if not self.compile and self.cfg.compile_mode != "default":
            print0(f"warning: compile_mode={self.cfg.compile_mode} does nothing while compile is off; set compile=true")


def _steps_for_epochs(train: TrainConfig, per_epoch: int, unit: str) -> int:
    """Optimizer steps for `train.epochs` passes over an epoch of `per_epoch` sequences (rounded up)."""
    per_step = train.batch_size * train.grad_accum_steps  # sequences in one global batch
    if per_epoch < per_step:
        raise UserError(
            f"train.epochs needs a training split of at least one global batch: it holds {per_epoch} {unit} "
            f"and a step takes {per_step} (train.batch_size x grad_accum_steps); lower them, or use more data"
        )
    return math.ceil(train.epochs * per_epoch / per_step)


def _grad_accum_steps(train: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step over all ranks: `train.grad_accum_steps`, or derived from
    `train.tokens_per_step` when set. Either way a multiple of the world size."""
    steps = train.grad_accum_steps
    if train.tokens_per_step is not None:
        per_micro = train.batch_size * block_size
        if train.tokens_per_step % (per_micro * world_size):
            raise UserError(
                f"train.tokens_per_step={train.tokens_per_step} is not a multiple of batch_size x block_size x "
                f"processes = {train.batch_size} x {block_size} x {world_size} = {per_micro * world_size}; "
                "round it to a multiple of that"
            )
        steps = train.tokens_per_step // per_micro
    if steps % world_size:
        raise UserError(
            f"train.grad_accum_steps={steps} is not divisible by the {world_size} processes; "
            f"make it a multiple of {world_size} (the global batch is batch_size x grad_accum_steps)"
        )
    return steps


def _compile(model: GPT, parallelism: str, mode: str) -> None:
    """torch.compile in place (the module and its state-dict keys stay as they are) in `mode` (compile_mode).
    Under FSDP2, each block is compiled on its own (as torchtitan), so the per-block all-gathers stay outside the
    compiled graphs; CUDA graphs cannot capture those, so the modes that make them are refused there."""
    options = {} if mode == "default" else {"mode": mode}
    if parallelism == "fsdp":
        if mode in CUDA_GRAPH_MODES:
            raise UserError(
                f"compile_mode={mode} captures CUDA graphs, which cannot hold FSDP's all-gathers; with "
                "train.parallelism=fsdp use compile_mode=default or max-autotune-no-cudagraphs"
            )
        for block in model.transformer.h:
            block.compile(**options)
    else:
        model.compile(**options)


def run(cfg: DictConfig) -> None:
    """Train (or resume) the run `cfg` describes. Called by `train.py` and `gpt2-train`."""
    typed_model_keys = typed_keys("model", MODEL_KEYS)
    check_no_preparation_keys(typed_keys("data", ()))
    run_cfg = to_object(cfg, TrainRunConfig)
    run_cfg.out_dir = job_out_dir(run_cfg.out_dir)
    info = distributed.init(run_cfg.device, run_cfg.train.collective_timeout_s)
    try:
        with run_lock(run_cfg.out_dir, enabled=info.is_main):  # one trainer per out_dir (rank 0 holds it)
            if info.is_distributed:
                check_shared(run_cfg.out_dir, info.is_main)
            if info.is_main:
                for path in checkpoint.remove_stale_temporaries(run_cfg.out_dir):
                    print0(f"removed {path}, left by a save that was interrupted")
            Trainer(run_cfg, info, typed_model_keys).fit()
    finally:
        distributed.cleanup()


def main() -> None:
    """The `gpt2-train` console script: train.py, runnable from any directory."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(exit_on_user_error(run))()
