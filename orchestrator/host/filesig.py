"""File signatures: the one ``stat`` that says whether a file changed since we read it.

Shared by the watcher's poll mode and the session worker's stat-gated passes, so
neither imports the other for it.
"""

from __future__ import annotations

import os

Signature = tuple[int, int, int] | None


def file_signature(path: os.PathLike | str, dir_fd: int | None = None) -> Signature:
    """(mtime_ns, size, inode) without following a symlink; None if absent. Any
    SQLite commit or touch changes it, so equal signatures mean "nothing to read".
    ``dir_fd``: ``path`` is a name in that folder (``safefs.SessionDir``)."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
