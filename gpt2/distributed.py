"""Process-group setup for torchrun, in one place.

`init()` reads torchrun's environment once and returns a frozen `DistInfo`; nothing else reads RANK or
WORLD_SIZE. NCCL on CUDA, gloo on CPU. `wrap_model` applies DistributedDataParallel (replicated weights) or
FSDP2's `fully_shard` (each block's parameters sharded across ranks, for models that do not fit one GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (before any process group exists: see `cleanup`)
import torch.nn as nn

from gpt2.device import resolve_device
from gpt2.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    local_rank: int = 0
    """The rank among the processes of this node (torchrun's LOCAL_RANK)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init(device_name: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1) and pick this rank's device. A rank
    waiting longer than `timeout_s` in a collective fails the job (instead of hanging, or failing early while
    rank 0 writes a large checkpoint)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = cuda_device(local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training on {device.type} is not supported; use device=cuda or device=cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            device_id=device if backend == "nccl" else None,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world_size, device=device, local_rank=local_rank)


def cuda_device(local_rank: int) -> torch.device:
    """This process's GPU: one per process. `local_rank % device_count` also covers launchers that show each
    process only its own GPU (CUDA_VISIBLE_DEVICES per rank, SLURM's --gpus-per-task), where it is cuda:0."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cleanup() -> None:
    """Destroy the process group, and with it gloo's worker threads, while Python is still running.

    Its last reference must be the one `destroy_process_group` drops. Otherwise the group and its threads live
    until the interpreter shuts down, where a thread still releasing a finished collective's tensor needs the
    GIL and, now and then, aborts the process ("terminate called without an active exception", after the
    checkpoint was written). What held it: torch.distributed.nn.functional, which DDP imports, binds
    the live group as its functions' default argument when first imported after init (so this module imports
    it first); DTensor's caches (FSDP2); a DDP or FSDP model in a reference cycle; and, when an error
    propagates, the locals of its traceback's frames (dropped here; the printed traceback stays whole).
    """
    if not dist.is_initialized():
        return
    in_flight = sys.exc_info()[1]  # (called from a `finally` while an error propagates)
    if in_flight is not None:
        traceback.clear_frames(in_flight.__traceback__)
    _clear_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()


DTENSOR_CACHE_CLEARS = (
    "debug._clear_sharding_prop_cache",
    "_redistribute.clear_redistribute_planner_cache",
    "_redistribute._gen_transform_infos.cache_clear",
    "_collective_utils.MeshTopoInfo.build_from_mesh.cache_clear",
)
"""Under torch.distributed.tensor; private, so an older or newer torch may lack one (it is then skipped)."""


def _clear_dtensor_caches() -> None:
    """DTensor's sharding-propagation and redistribution caches (FSDP2's parameters are DTensors) keep device
    meshes, and through them the process group, for the life of the process."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    for path in DTENSOR_CACHE_CLEARS:
        module, *names = path.split(".")
        try:
            clear = importlib.import_module(f"torch.distributed.tensor.{module}")
            for name in names:
                clear = getattr(clear, name)
        except (ImportError, AttributeError):
            continue
        clear()


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only (or when not distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def wrap_model(
    model: nn.Module, info: DistInfo, parallelism: str = "ddp", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """DDP or FSDP2 around `model` under torchrun; `model` itself when single-process.

    DDP keeps the gradients in its all-reduce buckets (`gradient_as_bucket_view`). FSDP2 shards each transformer
    block, then the root (embeddings, final norm, tied head), in place: the returned module is `model`, now
    holding DTensor parameters. With a bf16/fp16 `dtype`, FSDP2 gathers the blocks' parameters in that dtype
    (half the all-gather traffic and unsharded memory) and reduces gradients in fp32; the sharded master weights
    and the optimizer stay fp32. The blocks' inputs are not cast, and the root and the LayerNorms keep fp32
    parameters, so the residual stream stays fp32 between blocks as under DDP's autocast (which runs the matmuls
    in `dtype`): the same numerics under either parallelism, for an fp32 all-gather of the embeddings (2-5% of
    the model) and of the LayerNorms' gains and biases (two small all-gathers more per block).
    """
    if not info.is_distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        half = dtype in (torch.bfloat16, torch.float16)
        blocks = (
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
            if half
            else MixedPrecisionPolicy()
        )
        for block in model.transformer.h:
            if half:  # their gains and biases in fp32, as under autocast (whose LayerNorm on CPU needs them so)
                fully_shard([block.ln_1, block.ln_2], mp_policy=MixedPrecisionPolicy())
            fully_shard(block, mp_policy=blocks)
        fully_shard(model, mp_policy=MixedPrecisionPolicy())
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients as views of DDP's all-reduce buckets (kept there by `zero_grad`): no second copy of them under
    # gradient accumulation (0.5 GB at 124M, 6 GB at 1.5B per GPU in fp32), and no copy between the two.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def zero_grad(model: nn.Module, optimizers: Any) -> None:
    """Clear the gradients for the next step. Under DDP they are views of its all-reduce buckets and are zeroed
    in place: set to None, the next step's first micro-steps (under `no_sync`) would allocate a second copy of
    them beside the buckets. Elsewhere None, which frees them until the next backward."""
    optimizers.zero_grad(set_to_none=not isinstance(model, nn.parallel.DistributedDataParallel))


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True, sharded_too: bool = False) -> Iterator[None]:
    """DDP: skip the gradient all-reduce inside (micro-steps before the last of an accumulation). FSDP2
    reduce-scatters every micro-step unless `sharded_too` (train.fsdp_reduce_every_micro_step=false): so by
    default no rank holds unsharded gradients between micro-steps (the sum of the reduced shards is the reduced
    sum: the same gradients for more communication); with `sharded_too` each rank accumulates the whole
    gradient in fp32 and the last micro-step reduce-scatters it once."""
    if enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif enabled and sharded_too and is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def materialize(model: nn.Module, device: torch.device, full_state: dict[str, torch.Tensor] | None) -> None:
    """Give an FSDP2 model that was built on the meta device its (sharded) storage on `device`; with
    `full_state` (rank 0's weights, {} on the other ranks) broadcast them from rank 0 into every rank's shards.
    Without it the weights are left for a checkpoint to fill."""
    model.to_empty(device=device)
    if full_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


class FullModelState:
    """The model's weights as one unsharded, plain-keyed state dict (Stateful, for the checkpoint): gathered to
    the CPU from FSDP2 shards on save, sharded again on load; the module's own state dict otherwise. With `keys`
    (a LoRA run's adapters), only those entries are saved and restored: the rest is the frozen base."""

    def __init__(self, model: nn.Module, keys: set[str] | None = None) -> None:
        self.model, self.keys = model, keys

    def state_dict(self) -> dict[str, torch.Tensor]:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.model, options=_full_state_options())
        state = self.model.state_dict()
        return state if self.keys is None else {k: v for k, v in state.items() if k in self.keys}

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part, for a sharded checkpoint: DTensors of an FSDP2 model (each rank writes its shards),
        the module's own (whole) tensors otherwise."""
        if not is_sharded(self.model):
            return self.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model)
        return state if self.keys is None else {k: v for k, v in state.items() if k in self.keys}

    def load_sharded(self, saved: dict[str, Any], read: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Load from a sharded checkpoint: `read` fills this rank's part (`sharded_state_dict`'s shapes) from it
        (`saved`, its plain part, has no weights)."""
        state = read(self.sharded_state_dict())
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(strict=self.keys is None))
        else:
            self.model.load_state_dict(state, strict=self.keys is None)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Sharded: `state` is rank 0's whole state ({} on the other ranks), broadcast into every rank's shards."""
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state, options=_rank_0_state_options())
        elif self.keys is None:
            self.model.load_state_dict(state)
        else:
            if set(state) != self.keys:
                raise UserError("the checkpoint's LoRA adapters do not match this model's (lora.targets?)")
            self.model.load_state_dict(state, strict=False)


def optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], whole: bool = True) -> dict[str, Any]:
    """The optimizers' state as one dict keyed by parameter name, unsharded: the same format whether `model`
    runs in one process, under DDP or sharded by FSDP2, so a run resumes under any parallelism and world size.
    Without `whole`, an FSDP2 model's moments stay this rank's DTensor shards (for a sharded checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Gathered for a sharded model; a plain model's own state is already full and FQN-keyed (and torch's
    # full-state path would need an optimizer that has stepped).
    options = _full_state_options() if whole and is_sharded(model) else StateDictOptions()
    return get_optimizer_state_dict(model, optimizers, options=options)


def load_optimizer_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict[str, Any], whole: bool = True
) -> None:
    """Load `optimizer_state`'s format. FSDP2: rank 0's state is broadcast into every rank's shards (the other
    ranks' `state` needs its param_groups only: see `gpt2.checkpoint.load_for_ranks`); without `whole`, each
    rank's `state` holds its own shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not (whole and is_sharded(model)):  # this rank's own shards, or a plain model's whole state
        set_optimizer_state_dict(model, optimizers, state)
        return
    if dist.get_rank() != 0:
        state = {"state": {}, "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, optimizers, state, options=_rank_0_state_options())


def _rank_0_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


SIGNAL_BITS, LATE = 0xFF, 0x100
"""A vote is a signal number (0: none), with LATE set when a rank is past its stop grace (max-reduced)."""


class StopVote:
    """Whether any rank was asked to stop (the signal number; 0: none), agreed on by every rank without making a
    training step wait for the device or for the other ranks.

    The ranks' flags are max-reduced on a CPU (gloo) group in the background: `after_step` reads the vote it
    issued after the previous step and issues the next one, so all ranks learn of a signal together, one step
    after the step during which it arrived, and stop after the same step. `now` votes and waits for the
    answer, where the ranks wait for each other anyway (after an eval). Single-process: the flag itself."""

    def __init__(self, info: DistInfo) -> None:
        self.group = dist.new_group(backend="gloo") if info.is_distributed else None
        self.flag = torch.zeros(1, dtype=torch.int64)  # on the CPU whatever the device: reading it syncs nothing
        self.pending: Any = None  # the vote in flight

    def after_step(self, signal: int) -> int:
        if self.group is None:
            return signal
        agreed = self._collect()
        if not agreed:
            self._issue(signal)
        return agreed & SIGNAL_BITS

    def between_micro_steps(self, signal: int, late: bool) -> tuple[int, bool]:
        """(the signal, whether any rank is `late`) as of the vote issued at the previous micro-step or step end;
        issues the next. Every rank collects the same answer at the same micro-step, so they abandon a step
        together (see `gpt2.stopping.StopSignals.abandon_step`)."""
        if self.group is None:
            return signal, late
        agreed = self._collect()
        self._issue(max(agreed, signal | (LATE if late else 0)))
        return agreed & SIGNAL_BITS, bool(agreed & LATE)

    def _issue(self, value: int) -> None:
        self.flag.fill_(value)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def now(self, signal: int) -> int:
        if self.group is None:
            return signal
        agreed = self._collect()
        self.flag.fill_(max(agreed, signal))
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(self.flag.item()) & SIGNAL_BITS

    def finish(self) -> None:
        """Wait for the vote in flight (before the process group goes)."""
        self._collect()

    def _collect(self) -> int:
        if self.pending is None:
            return 0
        self.pending.wait()
        self.pending = None
        return int(self.flag.item())


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (in place); `t` itself when single-process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (e.g. per-rank loader and RNG states for the checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`obj` from rank `src` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def cpu_group() -> Any:
    """A new gloo process group over every rank (None in one process): for work that talks between ranks on
    another thread than training's, or on the CPU whatever the device. Every rank must create it, in the same
    order."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
