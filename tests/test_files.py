"""gpt2.files: the one atomic write (checkpoints, meta.json, metrics.jsonl, downloads go through it)."""

from __future__ import annotations

import os

import pytest

from gpt2.files import atomic_write, atomic_write_text


def test_an_atomic_write_replaces_the_file_after_fsyncing_it_and_its_directory(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    path.write_text("old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["meta.json"]
    if os.path.exists("/proc/self/fd"):
        assert synced[-1] == str(tmp_path) and synced[0].endswith(".tmp")  # the data, then the rename


def test_a_failed_atomic_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")

    def write(f):
        f.write(b"half of it")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, write)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["ckpt.pt"]
