"""What every bench script shares: the machine line, the command line, and recording a section in
BENCHMARKS.md (each script prints its table and records it unless --no-append): the new section becomes its
measure's current one, and the section it replaces moves to the top of History."""

from __future__ import annotations

import datetime
import os
import platform
import re
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
    return f"### {title} ({datetime.date.today()})"


CURRENT, HISTORY = "## Current figures\n", "## History\n"


def append(section: str) -> None:
    """Record a markdown section (a `heading`, the command and machine, a table) in BENCHMARKS.md: in place of
    the current section with the same title (which moves to the top of History), or at the end of the current
    figures for a new measure."""
    text = BENCHMARKS.read_text()
    head, rest = text.split(CURRENT, 1)
    current, history = rest.split(HISTORY, 1)
    section = section.strip() + "\n"
    title = _title(section.splitlines()[0])
    parts = re.split(r"(?m)^(?=### |## )", current)
    same = [i for i, part in enumerate(parts) if part.startswith("### ") and _title(part.splitlines()[0]) == title]
    if same:
        history = "\n" + parts[same[0]].strip() + "\n\n" + history.lstrip("\n")
        parts[same[0]] = section + "\n"
    else:
        last = max(i for i, part in enumerate(parts) if part.startswith("### "))
        parts.insert(last + 1, section + "\n")
    BENCHMARKS.write_text(head + CURRENT + "".join(parts) + HISTORY + history)
    print(f"recorded in {BENCHMARKS}")


def _title(heading_line: str) -> str:
    """`### Sampling speed (2026-12-02)` -> `Sampling speed`."""
    return re.sub(r" \(\d{4}-\d{2}-\d{2}\)$", "", heading_line.removeprefix("### ").strip())
