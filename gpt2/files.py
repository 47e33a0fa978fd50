"""Files that are complete or absent: the one atomic write and the one downloader of the package.

`atomic_write` fills a temporary file next to the target, flushes and fsyncs it, renames it over the target and
fsyncs the directory, so a crash or a full disk leaves either the previous file or the new one, never a part
(the rename is atomic on POSIX filesystems, NFS included). `download` streams a URL through it.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable

from gpt2.progress import progress_bar


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes before the rename: hidden, in the same directory, unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(f)` writes into a binary file. On any failure the temporary
    file is removed, `path` is as it was, and the error propagates."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def download(url: str, dest: Path) -> Path:
    """Fetch `url` into `dest` atomically, with a progress bar. Network, HTTP and URL errors propagate as
    OSError (urllib's URLError and HTTPError are ones) or ValueError (a malformed URL): callers say what to do."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def stream(f: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("content-length") or 0) or None
            with progress_bar(total=size, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))

    atomic_write(dest, stream)
    return dest
