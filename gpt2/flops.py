"""Peak FLOP/s per device and MFU (model FLOPs utilisation).

MFU = achieved training FLOPs / peak FLOPs, where achieved FLOPs come from `GPT.flops_per_token()` times
tokens/s, and the peak is, per device:
- CUDA: a datasheet table by device name (dense bf16/fp16 tensor-core peak, and the fp32 matmul peak: TF32
  where the GPU has it, plain fp32 on the V100 and T4);
- CPU: a *measured* matmul ceiling: the best of repeated large matmuls in the training dtype, timed once per
  process and cached. CPUs have no honest datasheet number (it depends on cores, AVX-512/AMX and clocks), so CPU
  MFU is an estimate, "fraction of what this machine's matmul kernel reaches", not of a theoretical peak. On a
  shared machine the start-up timing can come out low; a step that then beats the ceiling reports no MFU rather
  than an impossible one above 100%.
"""

from __future__ import annotations

import math
import time

import torch

# Datasheet peaks per GPU, dense (no sparsity), FLOP/s: (bf16/fp16 tensor cores, fp32 matmuls). The fp32 column
# is TF32 tensor cores from Ampere on, and plain fp32 on the V100 and T4, which have no TF32. Matched by
# substring of the device name, first match wins, so the more specific names come first (GB200 before B200,
# GH200 before H200, H100 NVL/PCIe before H100, L40S before L40 before L4, A100 and A10G before A10).
CUDA_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("GB200", 2.5e15, 1.25e15),
    ("B200", 2.25e15, 1.1e15),
    ("GH200", 989e12, 494.5e12),
    ("H200", 989e12, 494.5e12),
    ("H100 NVL", 835e12, 417.5e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM
    ("H800", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("A6000", 155e12, 77.4e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 only; fp32 without TF32
    ("T4", 65e12, 8.1e12),  # fp16 only; fp32 without TF32
]

_CPU_CEILING: dict[torch.dtype, float] = {}


def cpu_matmul_flops(
    dtype: torch.dtype = torch.float32, n: int = 1024, min_iters: int = 10, min_seconds: float = 0.2
) -> float:
    """This CPU's achievable matmul throughput in FLOP/s for `dtype`: the best of n x n @ n x n matmuls, repeated
    at least `min_iters` times and for at least `min_seconds` (a best-of is robust to a busy neighbour).

    Measured once per process and dtype (a fifth of a second or so), then cached.
    """
    if dtype not in _CPU_CEILING:
        gen = torch.Generator().manual_seed(0)  # never touch the global RNG: a resumed run restores it
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        a @ b  # warm up (thread pool, kernel selection)
        best, iters, start = math.inf, 0, time.perf_counter()
        while iters < min_iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            a @ b
            best, iters = min(best, time.perf_counter() - t0), iters + 1
        _CPU_CEILING[dtype] = 2 * n**3 / best
    return _CPU_CEILING[dtype]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one `device` computing in `dtype`, or None when unknown (then MFU is not reported)."""
    if device.type == "cpu":
        return cpu_matmul_flops(dtype)
    if device.type == "cuda":
        return cuda_peak_flops(torch.cuda.get_device_name(device), dtype)
    return None


def cuda_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak of the GPU called `device_name` in `dtype` (CUDA_PEAK_FLOPS), or None if unlisted."""
    for key, half, single in CUDA_PEAK_FLOPS:
        if key in device_name:
            return single if dtype == torch.float32 else half
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak of all `world_size` devices. None when
    the peak is unknown, or below what was achieved (a measured CPU ceiling that came out low): never above 1."""
    if not peak_per_device:
        return None
    value = flops_per_token * tokens_per_sec / (peak_per_device * world_size)
    return value if value <= 1.0 else None
