"""Real bad environments for tests: a small tmpfs to fill, read-only bind mounts.

These need root (CI runs as root). Without root a test using them is skipped —
except when ``CI`` is set, where it fails: CI must never silently skip them.
Mocks cannot show what a kernel does on a full disk (a short write, ENOSPC from
SQLite's journal) or on a read-only mount (root ignores file modes, not ``ro``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.docker_fixtures import in_ci


def need_root() -> None:
    if os.geteuid() != 0:
        message = "needs root to mount a tmpfs / a read-only bind mount"
        if in_ci():
            pytest.fail(f"{message} (CI is set: these tests must run)")
        pytest.skip(message)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. ``"4m"``) mounted at ``path``."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only onto itself (root cannot write it either)."""
    need_root()
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def fill(folder: Path, leave: int = 0, name: str = "filler") -> Path:
    """Fill the file system under ``folder`` until at most ``leave`` bytes are free."""
    target = folder / name
    chunk = b"\0" * 65536
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            free = free_bytes(folder)
            if free <= leave:
                break
            want = min(len(chunk), max(1, free - leave))
            try:
                os.write(fd, chunk[:want])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return target


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns): to show nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out
