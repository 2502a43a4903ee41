"""Waking an agent when the host writes ``inbound.db``: inotify through ctypes.

Why: polling ``inbound.db`` every 0.1 s costs an idle agent ~0.6 % of a core
(300 idle agents ≈ 2 cores) and still adds ~50 ms to every round trip. The host
writes inbound.db with ``journal_mode=DELETE``, so every commit creates and then
deletes ``inbound.db-journal`` and modifies ``inbound.db`` in the session folder:
one watch on that folder sees every commit, with no watch on the file itself.

Why a watch on the *folder* works in a container: the folder is bind-mounted at
``/workspace`` and inbound.db again, read-only, on top. inotify marks inodes, not
paths or mounts: the folder's inode is the host's, and the host's write to its
inbound.db is reported to that inode's watchers whichever mount they used
(tests/test_docker_e2e.py checks it against a real engine). It does NOT work on
network file systems and Docker Desktop / 9p shares — writes made on the other
side raise no event there — which is why the caller keeps a slow poll behind it.

Stdlib only (the agent image has nothing but python3). ``open_watch`` returns None
where inotify is missing (not Linux, no libc symbol, watch budget exhausted), and
the caller polls instead.
"""

from __future__ import annotations

import os
import select
import struct

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000  # a symlinked workspace is not followed either
IN_EXCL_UNLINK = 0x04000000
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
         | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_ALWAYS = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF  # lost track: wake


def wakes(mask: int, name: str, names: frozenset[str]) -> bool:
    """Whether one event is worth a look at inbound.db.

    Only events about the watched names count (the agent's own writes to
    outbound.db, .heartbeat and outbox/ land in the same folder and must not wake
    it); a queue overflow or the folder itself going away always does, since
    something may have been missed.
    """
    return bool(mask & _ALWAYS) or name in names


def parse_events(buf: bytes) -> list[tuple[int, str]]:
    """``(mask, name)`` of each ``struct inotify_event`` in ``buf``."""
    out: list[tuple[int, str]] = []
    offset = 0
    while offset + _HEADER.size <= len(buf):
        _wd, mask, _cookie, length = _HEADER.unpack_from(buf, offset)
        offset += _HEADER.size
        raw = buf[offset:offset + length]
        offset += length
        out.append((mask, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
    return out


def _libc() -> ctypes.CDLL | None:
    """The C library (the interpreter's own symbols; no ``find_library``, which
    runs ldconfig and costs tens of ms at every agent start). ctypes is imported
    here, not with the module: it is ~3 ms that a cold start defers until the
    first reply is written (``SessionFolder.start_watch``)."""
    import ctypes

    for name in (None, "libc.so.6"):
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.inotify_init1  # noqa: B018 - raises AttributeError where missing
            libc.inotify_add_watch  # noqa: B018
        except (OSError, AttributeError):
            continue
        return libc
    return None


class FolderWatch:
    """One inotify watch on one folder; ``wait`` blocks until a watched name changes."""

    def __init__(self, fd: int, names: frozenset[str]) -> None:
        self.fd = fd
        self.names = names

    def wait(self, timeout: float | None) -> bool:
        """Block up to ``timeout`` s (None: forever); True if a watched name changed.

        Drains everything queued, so a burst of events (one commit is three) costs
        one wake-up. EINTR (a signal, e.g. SIGTERM setting the stop flag) returns
        False so the caller re-checks its flags.
        """
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except InterruptedError:
            return False
        return bool(ready) and self.drain()

    def drain(self) -> bool:
        """Read every queued event without blocking; True if one is worth a look."""
        hit = False
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return hit
            except InterruptedError:
                continue
            if not buf:
                return hit
            hit = hit or any(wakes(mask, name, self.names) for mask, name in parse_events(buf))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_watch(folder: str | os.PathLike[str], names: frozenset[str]) -> FolderWatch | None:
    """A watch on ``folder`` for changes to ``names``, or None if inotify is unavailable.

    ``folder`` is watched with ``IN_ONLYDIR`` (a symlink or file there is refused),
    and nothing inside it is opened.
    """
    libc = _libc()
    if libc is None:
        return None
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        return None
    wd = libc.inotify_add_watch(fd, os.fsencode(os.fspath(folder)), _MASK | IN_DONT_FOLLOW)
    if wd < 0:  # ENOSPC (watch budget), EACCES, ENOTDIR, ELOOP ...: poll instead
        os.close(fd)
        return None
    return FolderWatch(fd, names)
