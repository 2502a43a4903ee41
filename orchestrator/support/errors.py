"""The project's own "you can fix this" errors, and how a storage failure becomes one.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; anything
else is a bug and crashes with a traceback (exit 1), so a bug never looks like
bad input. Config, id, message, attachment and environment errors all derive
from ``UserError``.

A full disk, a read-only mount or an unwritable folder is the user's to fix too,
but the OS and SQLite describe it badly ("unable to open database file", no
path at all). ``storage_error`` names the path and the likely cause instead.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """Bad input or a bad environment: one line naming the thing and the fix."""


class StorageError(UserError):
    """A path the orchestrator must write (or read) is unusable: read-only, full, missing."""


_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
}


HOST_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
SQLITE_FULL = 13


def host_storage_failure(exc: BaseException) -> bool:
    """The host's own disk is full or read-only: nobody's fault but the host's, so
    it must not count against a message or a reply (they would fail while good)."""
    if isinstance(exc, OSError):
        return exc.errno in HOST_STORAGE_ERRNOS
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


def probe_cause(path: Path) -> str | None:
    """Why writing under ``path`` fails, found by looking at its nearest existing folder.

    SQLite reports ENOSPC, EROFS and EACCES alike as "unable to open database file"
    or "attempt to write a readonly database"; the file system itself says which.
    """
    folder = path
    while not folder.is_dir():
        if folder.parent == folder:
            return None
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(folder, os.W_OK):
        return "permission denied"
    if st.f_bavail == 0 or (st.f_favail == 0 and st.f_files):
        return "no space left on the device"
    return None


def describe(exc: BaseException, path: Path) -> str:
    """The cause in words: errno first, then what the file system says, then SQLite's text."""
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CAUSES:
        return _ERRNO_CAUSES[exc.errno]
    probed = probe_cause(path)
    if probed:
        return probed
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, sqlite3.Error) and "full" in str(exc):
        return "no space left on the device"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def storage_error(exc: BaseException, path: Path, doing: str) -> StorageError:
    """``<path>: cannot <doing> (<cause>)`` with the fix a user needs."""
    cause = describe(exc, path)
    fix = {"no space left on the device": "free some space and try again",
           "disk quota exceeded": "free some space and try again",
           "read-only file system": "mount it read-write or point data_dir elsewhere"}.get(
        cause, "check the path and its permissions")
    return StorageError(f"{path}: cannot {doing} ({cause}); {fix}")


@contextmanager
def storage(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError or sqlite3.Error inside the block into a one-line StorageError."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        raise storage_error(exc, path, doing) from exc
