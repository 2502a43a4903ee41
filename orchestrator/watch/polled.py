"""The sessions past the inotify budget: looked at by ``stat``, a few at a time.

When the kernel's watch limit cannot cover every session folder (``budget``), the
folders without a watch are not lost to the host: ``FolderWatch`` hands them here and
asks ``due`` on each of its wake-ups (at least every 100 ms) for the ones whose turn
it is. A session is two ``lstat`` calls, never a read:

- its folder: ``inbound.db`` and ``outbound.db`` are written with
  ``journal_mode=DELETE`` (the contract), so every commit creates and removes a
  ``-journal`` beside them, which changes the folder's mtime and ctime: one ``lstat``
  sees a commit to either database (a heartbeat, a touch of a file, does not: it
  decides nothing a pass would not read anyway);
- its ``outbox/``: a file the agent puts there changes that folder's mtime.

A change is reported as if inotify had said it (``outbound.db``/``inbound.db``
modified, or something added in ``outbox/``), so the loop cannot tell a polled
session from a watched one, and ``FolderWatch`` promotes the session to a watch (an
active session is worth one more than a dormant one). At most ``rate`` sessions a
second are looked at, so 100 000 polled sessions cost a bounded CPU share and each
is seen every ``len / rate`` s (``budget.poll_round``).
"""

from __future__ import annotations

import os
import time

from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB, OUTBOX
from orchestrator.watch.changes import Change

Mark = tuple[int, int, int, int]  # folder (mtime_ns, ctime_ns, inode), outbox mtime_ns (0: none)
GONE: Mark = (0, 0, 0, 0)


def mark_of(path: str) -> Mark:
    """What one look sees of a session folder (GONE if it is not there)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return GONE
    try:
        out = os.stat(f"{path}/{OUTBOX}", follow_symlinks=False).st_mtime_ns
    except OSError:
        out = 0
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, out)


def changes_between(path: str, old: Mark, new: Mark) -> list[tuple[Change, str]]:
    """What to report for a session whose look went from ``old`` to ``new``."""
    if new == old:
        return []
    if new == GONE:
        return [(Change.deleted, path)]
    out: list[tuple[Change, str]] = []
    if new[:3] != old[:3]:
        out += [(Change.modified, f"{path}/{OUTBOUND_DB}"),
                (Change.modified, f"{path}/{INBOUND_DB}")]
    if new[3] != old[3]:
        out.append((Change.added, f"{path}/{OUTBOX}"))
    return out


class PolledSessions:
    """Session folders (paths) without a watch, each with what its last look saw."""

    def __init__(self, rate: float, interval: float,
                 clock=time.monotonic) -> None:
        self.rate = rate  # most sessions looked at per second
        self.interval = interval  # and none more often than this (seconds)
        self.marks: dict[str, Mark] = {}
        self.inodes: dict[str, int] = {}
        self._order: list[str] = []
        self._next = 0
        self._credit = 0.0
        self._clock = clock
        self._last = clock()

    def __len__(self) -> int:
        return len(self.marks)

    def __contains__(self, path: object) -> bool:
        return path in self.marks

    def add(self, path: str, inode: int) -> None:
        """Poll ``path`` from now on; what it is now is the baseline (a change before
        this call was the watch's to report, or the start-up pass's to see)."""
        if path not in self.marks:
            self.marks[path] = mark_of(path)
            self.inodes[path] = inode

    def remove(self, path: str) -> None:
        self.marks.pop(path, None)
        self.inodes.pop(path, None)

    def due(self, changes: set[tuple[Change, str]]) -> list[str]:
        """Look at the sessions whose turn it is; add what changed to ``changes``;
        return the paths that changed (the caller may promote them to a watch)."""
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if not self.marks:
            self._credit = 0.0
            return []
        per_s = min(self.rate, len(self.marks) / self.interval)
        self._credit = min(self._credit + elapsed * per_s, float(len(self.marks)))
        changed: list[str] = []
        while self._credit >= 1.0:
            if self._next >= len(self._order):  # a new round: the paths as they are now
                self._order, self._next = list(self.marks), 0
                if not self._order:
                    break
            path = self._order[self._next]
            self._next += 1
            self._credit -= 1.0
            old = self.marks.get(path)
            if old is None:  # removed since the round began
                continue
            new = mark_of(path)
            found = changes_between(path, old, new)
            if found:
                self.marks[path] = new
                changes.update(found)
                if new == GONE:
                    self.remove(path)
                else:
                    changed.append(path)
        return changed
