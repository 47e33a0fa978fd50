"""One trainer per run directory: an exclusive lock on `out_dir/.lock`, held for the whole run.

Two commands on one out_dir would both write `ckpt.pt` and mix their metrics into one run. The lock is a
`flock` on a file in the run directory: the kernel drops it when the process ends in any way (exit, crash,
kill -9), so a stale lock cannot outlive its run, and the Linux NFSv4 client turns it into a byte-range lock that
the server enforces across machines, so a shared out_dir is locked for every node. (Lustre needs the `flock`
mount option; without it flock fails and the error says so.) The file holds who has the lock, for the message
the second command prints. Under torchrun only rank 0 takes it: the other ranks are the same run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from gpt2 import distributed
from gpt2.errors import UserError

LOCK_NAME = ".lock"


def check_shared(out_dir: str | Path, is_main: bool) -> None:
    """Under torchrun: UserError on every rank unless every rank sees rank 0's out_dir (its lock file, with rank
    0's own words in it). Rank 0 alone writes checkpoints and all ranks resume from them, so an out_dir on
    node-local disks would make one node resume and another start over, then hang in mismatched collectives."""
    path = Path(out_dir) / LOCK_NAME
    # Rank 0 reaches the broadcast holding the lock, its words written; the others read only after it.
    theirs = distributed.broadcast_object(path.read_text() if is_main else None)
    try:
        mine = path.read_text()
    except OSError:
        mine = None
    seen = distributed.all_gather_object((mine == theirs, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise UserError(
            f"out_dir={out_dir} is not shared by every process: {', '.join(blind)} cannot see rank 0's "
            f"{path}; put out_dir on a filesystem that every node mounts (rank 0 writes the checkpoints "
            "and every rank resumes from them)"
        )


@contextlib.contextmanager
def run_lock(out_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's lock inside the `with` block; UserError naming the holder if another run has it."""
    if not enabled:
        yield
        return
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={out_dir} is a file, not a directory; choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create out_dir={out_dir} ({e.strerror}); choose a writable out_dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"cannot lock {out / LOCK_NAME} ({e.strerror}): the filesystem does not support "
                    "file locks; use an out_dir on one that does"
                ) from None
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"out_dir={out_dir} is in use by another run ({holder}); wait for it to finish, stop "
                "it, or use another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
        # To the file server now: an NFS client may keep the written pages to itself until close, which comes at
        # the run's end; other nodes (`check_shared`, a second command's message) open the file afresh and read
        # what the server has.
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
