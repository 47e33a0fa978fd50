"""MFU: never an impossible value; the CPU ceiling is a best-of over repeated matmuls."""

from __future__ import annotations

import time

import torch

from gpt2 import metrics


def test_mfu_is_a_fraction_of_the_peak_and_never_above_one():
    assert metrics.mfu(1e9, 100.0, 1e12, world_size=1) == 0.1
    assert metrics.mfu(1e9, 100.0, 1e12, world_size=4) == 0.025
    assert metrics.mfu(1e9, 100.0, None, world_size=1) is None
    # A busy machine at start-up made the measured ceiling too low: no MFU rather than 134%.
    assert metrics.mfu(1e9, 1340.0, 1e12, world_size=1) is None
    line = metrics.format_line({"step": 1, "loss": 1.0, "tokens_per_sec": 1340.0})
    assert "mfu" not in line


def test_cpu_ceiling_is_a_best_of_many_repetitions(monkeypatch):
    metrics._CPU_CEILING.clear()
    calls = []
    real_matmul = torch.Tensor.__matmul__

    def counting(a, b):
        calls.append(time.perf_counter())
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    t0 = time.perf_counter()
    flops = metrics.cpu_matmul_flops(torch.float32, n=256, min_iters=10, min_seconds=0.2)
    n = len(calls)
    assert n >= 11 and time.perf_counter() - t0 >= 0.2  # warm-up + at least 10 timed
    assert metrics.cpu_matmul_flops(torch.float32, n=256) == flops and len(calls) == n  # cached per process
    monkeypatch.undo()
    metrics._CPU_CEILING.clear()
    # The best of many is at least what a single timed matmul reaches.
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    a @ a
    single = 2 * 256**3 / (time.perf_counter() - t0)
    assert metrics.cpu_matmul_flops(torch.float32, n=256, min_iters=10, min_seconds=0.2) >= 0.5 * single
    metrics._CPU_CEILING.clear()
