"""Sharded checkpoints (`torch.distributed.checkpoint`): every rank writes its own part of the model and the
optimizer, in parallel; no rank gathers the whole state. Distributed runs write them by default.

    out_dir/ckpt/
        latest               the name of the newest complete checkpoint, replaced atomically once every rank's
                             part is on disk: a checkpoint is complete or not named
        best                 the name of the one with the lowest val loss (runs that evaluate)
        step_00001000/
            .metadata        DCP's index: where each tensor's pieces are
            __0_0.distcp     rank 0's tensors (weights, optimizer moments), __1_0.distcp rank 1's, ...
            state.pt         the rest: a plain checkpoint (`gpt2.checkpoint`) whose `model` is {} and whose
                             optimizer `state` has the parameter names only; plus `files`, each .distcp file's
                             size and CRC-32, which every load checks

A checkpoint loads at any world size and parallelism (DCP reshards: each rank reads the pieces its own shards
cover). `gpt2.checkpoint.load` consolidates one into the single-file dict in memory (sampling, export), and
`python -m gpt2.checkpoint consolidate` writes it as a single file. DCP's index is a pickle, as DCP writes it:
load sharded checkpoints you trust (a consolidated file loads with `weights_only=True`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gpt2 import distributed
from gpt2.errors import UserError
from gpt2.files import atomic_write, atomic_write_text, fsync_dir

ROOT_NAME = "ckpt"
"""The directory of a run's sharded checkpoints, next to where its ckpt.pt would be."""
STATE_NAME = "state.pt"
POINTERS = ("latest", "best")
_STEP_DIR = re.compile(r"step_\d+(-\d+)?")


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / ROOT_NAME


def named(run_dir: str | Path, pointer: str = "latest") -> Path | None:
    """The checkpoint a pointer (`latest`, `best`) of a run names, or None when it has none."""
    path = root(run_dir) / pointer
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        raise UserError(f"{path} does not name a checkpoint ({name[:60]!r}): delete it, or point at a step_* folder")
    return path.parent / name


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").exists()


def save(run_dir: Path, state: dict[str, Any], tensors: dict[str, Any], step: int, best: bool, is_main: bool) -> Path:
    """Write one checkpoint; every rank calls it (a collective). `tensors` are this rank's: DTensors of a sharded
    model are written by the ranks that hold them, tensors every rank holds (DDP) by one rank each. `state` (rank
    0's) is the rest. Once every part is on disk rank 0 names it `latest` (and `best`), then deletes the
    checkpoints no pointer names. A failed write (a full disk) is a UserError; the previous checkpoint stays."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = root(run_dir) / distributed.broadcast_object(_new_name(run_dir, step) if is_main else None)
    try:
        with _single_process_quietly():
            dcp.save(tensors, storage_writer=_writer(directory), no_dist=_one_process())
        error = None
    except (CheckpointException, OSError, RuntimeError) as e:
        error = _reason(e)
    return _finish(run_dir, directory, state, best, is_main, error)


def save_in_background(
    run_dir: Path, state: dict[str, Any], tensors: dict[str, Any], step: int, best: bool, is_main: bool, group: Any
) -> Callable[[], Path]:
    """`save`, with the writing in the background: `tensors` are copied to CPU memory now (a snapshot that later
    steps cannot change), and the returned function, run on another thread on every rank, waits for the write
    and names the checkpoint as `save` does. The ranks talk over `group`, a gloo group (`distributed.cpu_group`)
    that nothing else uses meanwhile."""
    import torch.distributed.checkpoint as dcp

    name = distributed.broadcast_object(_new_name(run_dir, step) if is_main else None, group=group)
    directory = root(run_dir) / name
    written = dcp.async_save(tensors, storage_writer=_writer(directory), process_group=group)

    def finish() -> Path:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            written.result()
            error = None
        except (CheckpointException, OSError, RuntimeError) as e:
            error = _reason(e)
        return _finish(run_dir, directory, state, best, is_main, error, group)

    return finish


def _writer(directory: Path) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(directory, sync_files=True)


def _finish(
    run_dir: Path, directory: Path, state: dict[str, Any], best: bool, is_main: bool, error: str | None, group=None
) -> Path:
    """After every rank wrote its part (or failed to: `error`): rank 0 writes state.pt with the data files' sizes
    and CRC-32s and names the checkpoint, or every rank raises the first error."""
    try:
        files = _own_files(directory) if error is None else {}
    except OSError as e:
        files, error = {}, _reason(e)
    files = distributed.all_gather_object(files, group=group)
    errors = [e for e in distributed.all_gather_object(error, group=group) if e]
    if errors:
        if is_main:
            shutil.rmtree(directory, ignore_errors=True)  # (what the ranks wrote of it)
        raise _not_written(directory, errors[0])
    if is_main:
        try:
            manifest = {name: entry for rank_files in files for name, entry in rank_files.items()}
            atomic_write(directory / STATE_NAME, lambda f: torch.save({**state, "files": manifest}, f))
            fsync_dir(directory)
            for pointer in ("latest", "best") if best else ("latest",):
                atomic_write_text(root(run_dir) / pointer, directory.name + "\n")
        except (OSError, RuntimeError) as e:  # (torch.save reports a failed write as a RuntimeError)
            error = _reason(e)
        remove_unnamed(run_dir)
    error = distributed.broadcast_object(error, group=group)  # (every rank waits for rank 0 here)
    if error:
        raise _not_written(directory, error)
    return directory


def _not_written(directory: Path, reason: str) -> UserError:
    free = shutil.disk_usage(directory.parent).free / 2**20
    return UserError(
        f"sharded checkpoint {directory} not written ({reason}); the previous checkpoint is kept. "
        f"{directory.parent} has {free:,.0f} MiB free: free some space, then rerun the same command to resume"
    )


def _one_process() -> bool:
    return not torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes a single process whenever there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _reason(e: BaseException) -> str:
    """What went wrong, in one line (a CheckpointException carries each failed rank's exception)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = getattr(e, "strerror", None) or (str(e).splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _new_name(run_dir: Path, step: int) -> str:
    """`step_<step>`, or `step_<step>-<n>` when that step was saved before (a stop right after an eval's save):
    a complete checkpoint is never written over."""
    name, n = f"step_{step:08d}", 1
    while (root(run_dir) / name).exists():
        n += 1
        name = f"step_{step:08d}-{n}"
    return name


def _own_files(directory: Path) -> dict[str, tuple[int, int]]:
    """This rank's data files (DCP names them `__<rank>_<n>.distcp`): name -> (size, CRC-32)."""
    rank = 0 if _one_process() else torch.distributed.get_rank()
    return {p.name: (p.stat().st_size, _crc32(p)) for p in sorted(directory.glob(f"__{rank}_*.distcp"))}


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def remove_unnamed(run_dir: str | Path) -> list[Path]:
    """Delete the checkpoints no pointer names: older ones, and the parts of saves that never finished. Returns
    what it removed."""
    keep = {p.name for p in (named(run_dir, pointer) for pointer in POINTERS) if p is not None}
    unnamed = [p for p in sorted(root(run_dir).iterdir()) if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    unnamed = [p for p in unnamed if p.name not in keep]
    for path in unnamed:
        shutil.rmtree(path, ignore_errors=True)
    return unnamed


def remove_replaced(run_dir: Path, best: bool) -> None:
    """Forget the run's latest sharded checkpoint (and with `best`, its best) once a single-file ckpt.pt (and
    best.pt) replaced it: a run that went on in one process."""
    for pointer in ("latest", "best") if best else ("latest",):
        (root(run_dir) / pointer).unlink(missing_ok=True)
    remove_unnamed(run_dir)
    if not any(root(run_dir).iterdir()):
        root(run_dir).rmdir()


def read_state(directory: Path) -> dict[str, Any]:
    """The checkpoint's plain part (state.pt). Missing or unreadable -> UserError."""
    path = directory / STATE_NAME
    if not is_checkpoint_dir(directory) or not path.exists():
        raise UserError(
            f"{directory} is not a complete sharded checkpoint (no .metadata or {STATE_NAME}); "
            f"point at the run folder, which names its latest complete one in {ROOT_NAME}/latest"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file: truncated zip, unpickling error, ...)
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {e})".splitlines()[0]) from None


def verify(directory: Path, files: dict[str, tuple[int, int]], rank: int = 0, world_size: int = 1) -> None:
    """Check the data files' sizes and (this rank's share: every `world_size`-th file) their CRC-32s against
    `state.pt`'s manifest. A missing, truncated or altered file -> UserError naming it."""
    for i, (name, (size, crc)) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.exists() or path.stat().st_size != size:
            raise UserError(
                f"{path} is missing or truncated (expected {size:,} bytes): the checkpoint is incomplete; "
                "use an earlier one (ckpt/best) or copy the folder again"
            )
        if i % world_size == rank and _crc32(path) != crc:
            raise UserError(
                f"{path} is corrupt: its CRC-32 does not match the one written with it (bits flipped on disk or "
                "in a copy); use an earlier checkpoint (ckpt/best) or copy the folder again"
            )


def read(directory: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Fill `tensors` (this rank's, shaped and sharded as the running model's: the checkpoint is resharded to
    them) in place from the checkpoint; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quietly():
            dcp.load(tensors, checkpoint_id=directory, no_dist=_one_process())
    except (CheckpointException, RuntimeError) as e:
        raise UserError(
            f"{directory} does not fit this run's model or optimizer ({_reason(e)}); "
            "resume with the settings the run was saved with"
        ) from None
    return tensors


def read_whole(directory: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint's tensors under the top-level `keys`, whole (unsharded) in this process's CPU memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    whole: dict[str, Any] = {}
    _load_state_dict(
        whole, storage_reader=dcp.FileSystemReader(directory), planner=_EmptyStateDictLoadPlanner(keys), no_dist=True
    )
    return whole
