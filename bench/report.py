"""What every bench script shares: the machine line, the command line, and appending a section to
BENCHMARKS.md (each script prints its table and appends it unless --no-append)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine(device: torch.device | None = None) -> str:
    """`NVIDIA H100 80GB HBM3, torch 2.x CUDA 12.x` or `2-core x86_64 CPU (native bf16), torch 2.x CPU`."""
    torch_version = torch.__version__.split("+")[0]
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch_version} CUDA {torch.version.cuda}"
    bf16 = "native bf16" if native_bf16() else "bf16 emulated"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({bf16}), torch {torch_version} CPU"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 matmuls are emulated."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def heading(title: str) -> str:
    return f"## {title} ({datetime.date.today()})"


def append(section: str) -> None:
    """Append a markdown section (a heading, the command and machine, a table) to BENCHMARKS.md."""
    with open(BENCHMARKS, "a") as f:
        f.write(f"\n{section.strip()}\n")
    print(f"appended to {BENCHMARKS}")
