"""One supervisor per data directory: the lock ``orchestrator run`` holds.

Two supervisors on one data dir would deliver the same replies twice.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.host.private import FILE_MODE, make_dirs
from orchestrator.support.errors import UserError, storage


class AlreadyRunning(UserError):
    pass


@dataclass
class DataDirLock:
    """The held locks; ``release`` (or the process's exit) lets the next ``run`` in."""

    fds: list[int]

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """One supervisor per data dir: two would deliver the same replies twice.

    The lock is an ``flock`` on the data directory itself, which nobody can delete
    from under a running supervisor (a lock *file* can be removed, and the next
    ``run`` would lock a new file of the same name). ``orchestrator.lock`` is
    locked as well, so a supervisor from before this change is excluded too.
    """
    with storage(data_dir, "create the data directory"):
        make_dirs(data_dir)
    lock = DataDirLock([])
    try:
        with storage(data_dir, "lock the data directory"):
            try:
                lock.fds.append(os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY))
                fcntl.flock(lock.fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                legacy = data_dir / "orchestrator.lock"
                if os.access(data_dir, os.W_OK) or legacy.exists():
                    lock.fds.append(os.open(legacy, os.O_RDWR | os.O_CREAT, FILE_MODE))
                    fcntl.flock(lock.fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(f"another orchestrator is running on {data_dir}; "
                                     "stop it first") from None
    except BaseException:
        lock.release()
        raise
    return lock
