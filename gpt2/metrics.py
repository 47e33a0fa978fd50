"""Training metrics: one logger that fans out to the console, `metrics.jsonl` and wandb.

The trainer hands `MetricsLogger.log` flat dicts whose key names are the `metrics.jsonl` contract
(README, "Runs, resume and preemption"): training lines carry `step`, `loss`, `lr`, `grad_norm`,
`ms_per_step`, `tokens_per_sec`, `mfu`, `tokens_seen`; eval lines carry `step`, `train_loss`, `val_loss`.
wandb gets the same values under namespaced keys (`train/loss`, `val/loss`, `perf/tokens_per_sec`,
`perf/mfu`, ...; see `WANDB_KEYS`). On non-main ranks `MetricsLogger` is a no-op, so the trainer never
branches on the rank to log. MFU: `gpt2.flops`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

from gpt2.errors import UserError
from gpt2.files import atomic_write_text

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


class MetricsLogger:
    """Console + `<out_dir>/metrics.jsonl` + wandb (when enabled). A no-op unless `enabled` (the main rank).

    `start(resume_step)` opens the outputs, `log(metrics, step)` takes the flat metrics.jsonl key names,
    `close()` flushes and finishes the wandb run. Stateful: the wandb run id is chosen here on a fresh run and restored
    from the checkpoint on resume (before `start`), so wandb continues the same run.
    """

    def __init__(
        self, out_dir: str | Path, enabled: bool = True, wandb_cfg: Any = None, run_config: dict | None = None
    ) -> None:
        self.out_dir, self.enabled, self.wandb_cfg, self.run_config = Path(out_dir), enabled, wandb_cfg, run_config
        self.wandb_run_id: str | None = None
        self._wandb = None
        self._file = None

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wandb_run_id = state.get("wandb_run_id")

    def start(self, resume_step: int = -1) -> "MetricsLogger":
        """Open metrics.jsonl for appending and start wandb. Records after `resume_step` are dropped (they are
        about to be replayed); -1 (a fresh run) drops those of an earlier attempt that died before its first
        checkpoint."""
        if not self.enabled:
            return self
        path = self.out_dir / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _drop_after(path, resume_step)
        self._file = open(path, "a", buffering=1)  # line-buffered: survives a kill
        cfg = self.wandb_cfg
        if cfg is not None and cfg.enabled and cfg.mode != "disabled":
            # Our own id (8 lowercase letters/digits, wandb's format), stored in the checkpoint for resume.
            self.wandb_run_id = self.wandb_run_id or "".join(secrets.choice(_ID_CHARS) for _ in range(8))
            self._wandb = start_wandb(cfg, self.out_dir, self.wandb_run_id, self.run_config)
        return self

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        print(format_line(record), flush=True)
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(
                f"cannot write {self._file.name} ({e.strerror}): a full disk? Free some space and rerun "
                "the same command: it resumes from the last checkpoint"
            ) from None
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
        raise UserError(
            f"wandb could not start ({type(e).__name__}: {first}); run `wandb login`, or {WANDB_FIX}"
        ) from None


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
    atomic_write_text(path, "".join(line + "\n" for line in keep))


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
