"""Disk space: what one session folder holds, what the data dir's file system has
left, and the host's reserve on it.

Everything here runs off the event loop (``asyncio.to_thread``): a walk of an
agent's folder is as slow as the agent makes it.

``session_bytes`` counts what the folder *allocates* (``st_blocks``, so a sparse
file costs what it really takes), by descriptor: each folder opened relative to
its parent with ``O_NOFOLLOW | O_DIRECTORY``, entries ``lstat``-ed, never a link
followed, never another file system entered (a mount inside the folder is not
the session's space), an inode with several links counted once. The walk is
bounded — by entries, by depth, and by the limit itself (once over it, the rest
does not matter) — and says whether it saw everything.

``Reserve`` is a file, ``data_dir/space-reserve``, of ``[sessions] min_free_bytes``
(``posix_fallocate``: blocks really allocated). An agent that fills the disk fills
it up to the reserve; the host then releases it, and its own writes (the registry,
the tries and failures in ``inbound.db``, delivered files) have that much room
while the filler is stopped. It is taken again once the space is back.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from orchestrator.host.safefs import SessionDir

RESERVE_FILE = "space-reserve"
MAX_ENTRIES = 200_000  # a folder with more is "at least this much" (complete=False)
MAX_DEPTH = 64  # open descriptors during a walk: at most this many


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int  # allocated under the folder (st_blocks * 512), as far as the walk went
    entries: int
    complete: bool  # False: stopped early (over ``stop_over``, too many entries, too deep)


class _Walk:
    def __init__(self, dev: int, stop_over: int, max_entries: int) -> None:
        self.dev = dev
        self.stop_over = stop_over
        self.max_entries = max_entries
        self.bytes = 0
        self.entries = 0
        self.complete = True
        self.seen: set[int] = set()  # inodes with several links, counted once

    def done(self) -> bool:
        return (self.stop_over > 0 and self.bytes > self.stop_over) or (
            self.entries >= self.max_entries)

    def count(self, st: os.stat_result) -> None:
        self.entries += 1
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in self.seen:
                return
            self.seen.add(st.st_ino)
        self.bytes += st.st_blocks * 512

    def folder(self, fd: int, depth: int) -> None:
        """Count what is in the folder open at ``fd`` (the caller closes it)."""
        subfolders: list[str] = []
        with os.scandir(fd) as it:
            for entry in it:
                if self.done():
                    self.complete = False
                    return
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # gone since it was listed
                    continue
                if st.st_dev != self.dev:
                    continue  # another file system mounted inside: not this folder's space
                self.count(st)
                if stat.S_ISDIR(st.st_mode):
                    subfolders.append(entry.name)
        for name in subfolders:
            if depth >= MAX_DEPTH or self.done():
                self.complete = False
                return
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError:  # gone, or swapped for a link since it was listed
                continue
            try:
                self.folder(sub, depth + 1)
            finally:
                os.close(sub)


def session_bytes(data_dir: Path, agent_group: str, session_id: str, *, stop_over: int = 0,
                  max_entries: int = MAX_ENTRIES) -> Usage:
    """The space one session folder takes (see the module text). ``stop_over`` > 0:
    stop counting once past it (the answer is then "more than that")."""
    with SessionDir(data_dir, agent_group, session_id) as folder:
        st = os.fstat(folder.fd)
        walk = _Walk(st.st_dev, stop_over, max_entries)
        walk.bytes = st.st_blocks * 512
        walk.folder(folder.fd, 0)
    return Usage(walk.bytes, walk.entries, walk.complete)


def free_bytes(path: Path) -> int:
    """What an unprivileged writer can still put on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Reserve:
    """The host's reserve on the data dir's file system (see the module text)."""

    def __init__(self, data_dir: Path, size: int) -> None:
        self.path = data_dir / RESERVE_FILE
        self.size = size

    def held(self) -> int:
        """Bytes the reserve file holds now (0: none)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return 0
        return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0

    def take(self) -> bool:
        """Allocate the reserve; False if the file system has no room for it (then
        nothing is kept: a half reserve would only hide how full the disk is)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                os.ftruncate(fd, 0)
                return False
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the reserve's space back to the file system (at once)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
