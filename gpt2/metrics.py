"""Training metrics: one logger that fans out to the console, `metrics.jsonl` and wandb; MFU.

The trainer hands `MetricsLogger.log` flat dicts whose key names are the `metrics.jsonl` contract
(DESIGN.md): training lines carry `step`, `loss`, `lr`, `grad_norm`, `ms_per_step`, `tokens_per_sec`, `mfu`,
`tokens_seen`; eval lines carry `step`, `train_loss`, `val_loss`. wandb gets the same values under namespaced
keys (`train/loss`, `val/loss`, `perf/tokens_per_sec`, `perf/mfu`, ...; see `WANDB_KEYS`). On non-main ranks
`MetricsLogger` is a no-op, so the trainer never branches on the rank to log.

MFU (model FLOPs utilisation) = achieved training FLOPs / peak FLOPs, where achieved FLOPs come from
`GPT.flops_per_token()` times tokens/s, and the peak is, per device:
- CUDA: a datasheet table by device name (dense bf16/fp16 tensor-core peak, and the fp32 matmul peak: TF32
  where the GPU has it, plain fp32 on the V100 and T4);
- CPU: a *measured* matmul ceiling: the best of repeated large matmuls in the training dtype, timed once per
  process and cached. CPUs have no honest datasheet number (it depends on cores, AVX-512/AMX and clocks), so CPU
  MFU is an estimate, "fraction of what this machine's matmul kernel reaches", not of a theoretical peak. On a
  shared machine the start-up timing can come out low; a step that then beats the ceiling reports no MFU rather
  than an impossible one above 100%.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.errors import UserError

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

WANDB_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_seen": "train/tokens_seen",
    "ms_per_step": "perf/ms_per_step",
    "tokens_per_sec": "perf/tokens_per_sec",
    "mfu": "perf/mfu",
    "train_loss": "eval/train_loss",
    "val_loss": "val/loss",
    "hellaswag_acc": "eval/hellaswag_acc",
    "hellaswag_acc_norm": "eval/hellaswag_acc_norm",
}

_ID_CHARS = string.ascii_lowercase + string.digits
_CPU_CEILING: dict[torch.dtype, float] = {}


def cpu_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, min_iters: int = 10,
                     min_seconds: float = 0.2) -> float:
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


class MetricsLogger:
    """Console + `<out_dir>/metrics.jsonl` + wandb (when enabled). A no-op unless `enabled` (the main rank).

    `log(metrics, step)` takes flat DESIGN.md key names; `close()` flushes and finishes the wandb run.
    The wandb run id is chosen here on a fresh run and passed back in on resume, so wandb continues the run.
    Records after `resume_step` are dropped from metrics.jsonl (they are about to be replayed); -1 (a fresh
    run) drops the records of an earlier attempt that died before its first checkpoint.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        wandb_cfg: Any = None,
        run_config: dict | None = None,
        wandb_run_id: str | None = None,
        resume_step: int = -1,
    ) -> None:
        self.enabled = enabled
        self.wandb_run_id = wandb_run_id
        self._wandb = None
        self._file = None
        if not enabled:
            return
        path = Path(out_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _drop_after(path, resume_step)
        self._file = open(path, "a", buffering=1)  # line-buffered: survives a kill
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            # Our own id (8 lowercase letters/digits, wandb's format), stored in the checkpoint for resume.
            self.wandb_run_id = wandb_run_id or "".join(secrets.choice(_ID_CHARS) for _ in range(8))
            self._wandb = start_wandb(wandb_cfg, out_dir, self.wandb_run_id, run_config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        print(format_line(record), flush=True)
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self._file.name} ({e.strerror}): a full disk? Free some space and rerun "
                            "the same command: it resumes from the last checkpoint") from None
        if self._wandb is not None:
            self._wandb.log({WANDB_KEYS.get(k, k): v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


WANDB_FIX = "use wandb.mode=offline (then `wandb sync` where there is a network) or wandb.enabled=false"


def start_wandb(wandb_cfg: Any, out_dir: str | Path, run_id: str, run_config: dict | None) -> Any:
    """`wandb.init` for this run (the same id resumes the same wandb run). Online, the server is checked first
    (a few seconds, not wandb's ~100 s of retries), and any failure is one UserError naming the fix."""
    import wandb

    if wandb_cfg.mode == "online":
        _check_reachable(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    try:
        return wandb.init(
            project=wandb_cfg.project,
            name=wandb_cfg.run_name or Path(out_dir).resolve().name,
            id=run_id,
            resume="allow",
            mode=wandb_cfg.mode,
            dir=os.environ.get("WANDB_DIR", str(out_dir)),
            config=run_config,
            settings=wandb.Settings(init_timeout=30),
        )
    except Exception as e:  # UsageError (no API key), CommError (server), timeouts: not our bug, the setup's
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"wandb could not start ({type(e).__name__}: {first}); run `wandb login`, or {WANDB_FIX}") from None


def _check_reachable(url: str, timeout: float = 5.0) -> None:
    """UserError unless a TCP connection to `url`'s host opens within `timeout` seconds."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"wandb.mode=online but {url} cannot be reached ({e}); {WANDB_FIX}") from None


def _drop_after(path: Path, step: int) -> None:
    """Remove the records logged after `step` (a resumed run replays those steps and logs them again), and a
    record cut short by a kill or a full disk (said on the console: it is the only thing dropped unasked)."""
    keep, broken = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            broken += bool(line.strip())
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            keep.append(line)
    if broken:
        print(f"{path}: dropped {broken} incomplete record(s) (a kill or a full disk mid-write)", flush=True)
    if step < 0 and any(line.strip() for line in path.read_text(errors="replace").splitlines()):
        print(f"{path}: cleared the records of an earlier attempt that left no checkpoint", flush=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def format_line(r: dict[str, Any]) -> str:
    """One console line: `step 100 | loss 2.1234 | lr 6.00e-04 | ... | mfu 12.3%` or an eval line."""
    parts = [f"step {r['step']}"]
    fmt = {
        "loss": "loss {:.4f}",
        "train_loss": "train loss {:.4f}",
        "val_loss": "val loss {:.4f}",
        "lr": "lr {:.2e}",
        "grad_norm": "grad norm {:.3f}",
        "ms_per_step": "{:.1f} ms",
        "tokens_per_sec": "{:,.0f} tok/s",
        "hellaswag_acc": "hellaswag acc {:.4f}",
        "hellaswag_acc_norm": "acc_norm {:.4f}",
    }
    for key, f in fmt.items():
        if key in r:
            parts.append(f.format(r[key]))
    if "mfu" in r:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    return " | ".join(parts)
