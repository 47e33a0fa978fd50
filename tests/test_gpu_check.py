"""The GPU scripts on a machine without CUDA: `make gpu-check` says that it needs a GPU, runs nothing and exits 0;
bench/gpu_step.py rehearses its whole run on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs the real thing")
def test_gpu_check_without_a_gpu_runs_nothing_and_says_so(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_text()
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "needs a CUDA GPU" in p.stdout and "nothing was run" in p.stdout
    assert "PASS" not in p.stdout and (ROOT / "BENCHMARKS.md").read_text() == before


@pytest.mark.slow
@pytest.mark.e2e
def test_the_gpu_step_benchmark_rehearses_its_whole_run_on_the_cpu(tmp_path):
    """bench/gpu_step.py is what a GPU session runs first: its CPU rehearsal goes through the same preparation,
    train.py runs, timing from the log lines and profiled trainer step, so a change that breaks it fails here."""
    before = (ROOT / "BENCHMARKS.md").read_text()
    command = [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--device", "cpu", "--rehearse"]
    p = subprocess.run(
        [*command, "--micro-batches", "2", "--steps", "20", "--warmup", "10", "--no-append"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    row = next(line for line in p.stdout.splitlines() if line.startswith("| 2 | ours | default |"))
    ms, tokens_per_s = (float(cell.replace(",", "")) for cell in row.split("|")[4:6])
    assert ms > 0 and tokens_per_s == pytest.approx(2 * 128 / (ms / 1e3), rel=0.01)
    assert "One step at 2 x 128, compile_mode=default" in p.stdout and "| `aten::mm` |" in p.stdout
    assert (ROOT / "BENCHMARKS.md").read_text() == before
