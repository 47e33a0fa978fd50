"""`make gpu-check` on a machine without CUDA: it says that it needs a GPU, runs nothing, and exits 0."""

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
