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
    """`NVIDIA H100 80GB HBM3, torch 2.x CUDA 12.x` or `2-core x86_64 CPU, torch 2.x CPU`."""
    torch_version = torch.__version__.split("+")[0]
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch_version} CUDA {torch.version.cuda}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch_version} CPU"


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
