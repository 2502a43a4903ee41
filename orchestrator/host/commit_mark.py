"""Whether an SQLite database was committed to since a pass read it, by one ``pread``.

An event-driven pass over a running agent's session reads ``outbound.db`` when inotify
says it was written. A commit is a run of events that a batch can cut in two, so the
second half asked for a read that found nothing new: a whole pass (the folder opened,
a connection, a query, a decision) for nothing, and most of what events mode cost per
reply over poll mode. SQLite's *file change counter* (4 bytes, big-endian, at offset
24 of the database header) is incremented by every committed write transaction in
rollback-journal mode, which is the contract's (``journal_mode=DELETE``) — so "the
same counter as before the last complete read" means "nothing committed since".

What one look (``mark``) keeps: the file's inode, size and mtime (ns) beside the
counter. A database not in rollback-journal mode (bytes 18-19 of the header are 2 in
WAL mode, where a commit goes to the ``-wal`` file and the counter moves only at a
checkpoint) or too short to have a header has no mark: it is always read.

The file is the agent's, so hostile: opened relative to the session folder's
descriptor with ``O_NOFOLLOW`` (a link is not followed) and ``O_NONBLOCK`` (a FIFO in
its place does not block the open), read only if ``fstat`` says it is a regular file,
and only the 12 header bytes from offset 16, whatever its size.

How a wrong "unchanged" is ruled out (``SessionWorker`` takes the mark before a read
and keeps it only if a second mark after the read is the same):

- a commit after the first mark changes the counter (rollback mode: every commit);
- a mark taken while a commit is writing the file (page 1 already holds the new
  counter, the commit not yet done): the read waits for that commit (or fails busy,
  and nothing is kept), so the read saw what the mark says; if that commit is rolled
  back instead (its writer died; the hot journal is replayed), the counter goes back
  and the second mark differs: nothing is kept;
- a file replaced by another (a new inode, or an inode reused with another size or
  mtime) has another mark. The one case left, a file replaced by one with the same
  inode, size, mtime and counter, is an agent's deliberate act against itself (its
  own replies wait for the reconcile sweep, which reads without this gate).
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

_HEADER_AT = 16  # page size (2 bytes), write and read format versions (1 each), …
_HEADER_LEN = 12  # … reserved, payload fractions (4), file change counter (4)
_ROLLBACK = 1  # format version of a rollback-journal database (WAL: 2)


class Mark(NamedTuple):
    """What one look sees of a database file."""

    inode: int
    size: int
    mtime_ns: int
    counter: int


def header_counter(header: bytes) -> int | None:
    """The file change counter of a header read from offset 16, or None when it cannot
    be trusted to move on every commit (not rollback-journal mode, too short)."""
    if len(header) < _HEADER_LEN or header[2] != _ROLLBACK or header[3] != _ROLLBACK:
        return None
    return int.from_bytes(header[8:12], "big")


def mark(dir_fd: int, name: str) -> Mark | None:
    """``name`` (in the folder open as ``dir_fd``) as it is now; None if it is absent,
    not a regular file, unreadable or has no counter to trust."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        counter = header_counter(os.pread(fd, _HEADER_LEN, _HEADER_AT))
    except OSError:
        return None
    finally:
        os.close(fd)
    if counter is None:
        return None
    return Mark(st.st_ino, st.st_size, st.st_mtime_ns, counter)


def unchanged(before: Mark | None, now: Mark | None) -> bool:
    """Whether nothing was committed since ``before`` (kept from a complete read): only
    when both looks have a mark and they are the same."""
    return before is not None and now is not None and before == now
