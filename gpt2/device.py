"""Device and precision policy, in one place for the trainer, the sampler and the evaluators."""

from __future__ import annotations

import contextlib

import torch

from gpt2.errors import UserError
from gpt2.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu. An explicit device that is absent is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name} but MPS is not available here; use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA GPUs with native bf16 (compute capability >= 8.0, Ampere and newer), else fp16
    (with a GradScaler when training): `torch.cuda.is_bf16_supported()` also counts the emulated bf16 of a T4 or
    V100, which has no bf16 tensor cores or flash attention. On CPU bf16 where oneDNN has native bf16 kernels
    (AVX-512 bf16, AMX or Arm bf16: faster than fp32 for training and decoding, BENCHMARKS.md), else fp32, since
    emulated bf16 is slower than fp32; fp32 on MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype={name!r} is not valid; choose one of: auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise UserError("dtype=float16 is unusably slow on CPU; use dtype=bfloat16 or dtype=float32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes: parameters stay fp32, matmuls run in `dtype`.

    Without autocast's cache of cast weights: GPT-2 uses each weight once per forward, so the cache saves no
    casts, but it holds a `dtype` copy of every weight until the forward ends, which activation checkpointing
    would otherwise free block by block (the peak it saves: bench/memory.py, BENCHMARKS.md)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def configure_backends(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


TRAINING_BYTES_PER_PARAM = 16
"""fp32 weights (4) + gradients (4) + AdamW's two moments (8): the floor of a training step's memory."""


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device`: MemAvailable on CPU (Linux), free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def check_memory(config, device: torch.device, shards: int = 1) -> None:
    """UserError, before anything is allocated, when the model's weights, gradients and AdamW state alone
    (split over `shards` FSDP ranks) exceed the memory `device` has available; activations come on top."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(config).parameters())
    need, have = TRAINING_BYTES_PER_PARAM * params // shards, available_memory(device)
    if have is not None and need > have:
        raise UserError(
            f"the model ({params / 1e6:,.0f}M parameters: n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"block_size={config.block_size}, vocab {config.vocab_size}) needs {need / 2**30:.1f} GiB for weights, "
            f"gradients and AdamW state alone, more than the {have / 2**30:.1f} GiB available on {device}; use a "
            "smaller model.* (or train.parallelism=fsdp over more GPUs)"
        )
