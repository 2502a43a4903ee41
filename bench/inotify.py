"""A minimal inotify reader (ctypes, Linux only) for the bench's own observations.

The bench must see *when* things happen without polling (a polling observer
would add noise and a sampling error of its own): a line appended to the jsonl
channel file, and the commit of a ``delivered`` row in a session's inbound.db
(SQLite in ``journal_mode=DELETE`` commits by unlinking ``inbound.db-journal``).
This is deliberately not watchfiles: watchfiles batches events (that is what is
being measured), raw inotify hands each one over as soon as it is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from dataclasses import dataclass

IN_MODIFY = 0x00000002
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_HEADER = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.overflowed = False

    def add(self, path: str | os.PathLike, mask: int) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(os.fspath(path)), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch({path}): {os.strerror(err)}")
        return wd

    def read(self, timeout: float) -> list[Event]:
        """Events available within ``timeout`` seconds (possibly none)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return []
            raise
        events: list[Event] = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
            pos += _HEADER.size
            name = data[pos:pos + length].rstrip(b"\0").decode("utf-8", "replace")
            pos += length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            events.append(Event(wd, mask, name))
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
