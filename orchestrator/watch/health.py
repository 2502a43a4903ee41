"""Is the inotify watch still telling us everything? Signs of lost events.

inotify loses events in two ways, and ``folder_watch`` sees both only in part, so
these checks also look from outside:

- **Queue overflow.** The kernel queues at most ``fs.inotify.max_queued_events``
  events per instance; past that it queues one ``IN_Q_OVERFLOW`` and drops the
  rest until the reader catches up. ``folder_watch`` reads that event
  (``take_lost``); a queue close to its limit, or a long stall, is a sign too.
- **Folders that are not watched.** A folder may not get its watch (``EACCES``
  for a non-root host, a watch lost in a race); then nothing in it is reported.

What we look at, for *our* inotify instance (its fd):

- ``FIONREAD`` on it: bytes queued and not yet read. A queue near its limit
  means the watch is behind and events are being, or are about to be, dropped.
- the watched inodes (the watch's own list; ``/proc/self/fdinfo/<fd>`` has the
  kernel's, one line per watch): "is this session folder watched?" has an exact
  answer.
- a stall: the watch asks its stop event once per step; a gap of seconds
  between two asks means this process did not run (SIGSTOP, a frozen VM, a
  starved host) while agents went on writing — the queue may have overflowed.
- a batch with as many distinct changes as half the queue holds.

Any sign costs one stat-gated rescan (a few ``stat`` calls per session), so the
signs err on the side of rescanning.
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import termios
import threading
import time
from pathlib import Path
from typing import Callable

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
INOTIFY_LINK = "anon_inode:inotify"
MIN_EVENT_BYTES = 16  # struct inotify_event without a name
STALL_SECONDS = 2.0  # a loaded host delays a thread by tens of ms, not seconds
LOSS_RESCAN_EVERY = 1.0  # s: while signs keep coming, rescan at most this often
LOSS_EPISODE_END = 5.0  # s without a sign: the next sign is a new episode (warned again)
RECHECK_AFTER = 0.5  # s: a folder found unwatched is looked at again before we act


def queue_limit() -> int:
    """The kernel's per-instance queue length (read when an instance is created)."""
    try:
        return int(MAX_QUEUED_EVENTS.read_text())
    except (OSError, ValueError):
        return 16384  # the kernel's default


def inotify_fds() -> set[int]:
    """This process's open inotify instances."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == INOTIFY_LINK:
                found.add(int(name))
        except OSError:
            continue
    return found


_WATCHED_INODE = re.compile(r"^inotify wd:\S+ ino:([0-9a-f]+) ", re.MULTILINE)


def watched_inodes(fd: int) -> set[int] | None:
    """Inodes watched by inotify instance ``fd`` (from its fdinfo), None if unreadable.
    (1000 sessions: ~3000 lines, ~20 ms, most of it the kernel writing them.)"""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            text = fh.read()
    except OSError:
        return None
    return {int(ino, 16) for ino in _WATCHED_INODE.findall(text)}


def pending_bytes(fd: int, buf: array.array | None = None) -> int:
    """Bytes queued on inotify instance ``fd`` and not read yet (FIONREAD)."""
    buf = buf if buf is not None else array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


def loss_sign(*, gap: float, pending: int, batch: int, queue: int) -> str | None:
    """Why events may have been lost, or None. Values in, verdict out:

    ``gap``: seconds since the watch loop last asked its stop event (one step,
    normally); ``pending``: bytes queued unread; ``batch``: distinct changes in
    the batch just returned; ``queue``: the kernel's queue limit (events).
    """
    if gap >= STALL_SECONDS:
        return f"the watch did not run for {gap:.1f}s (process stopped or starved)"
    if pending >= queue * MIN_EVENT_BYTES // 2:
        return (f"the inotify queue is filling up ({pending} bytes unread, limit "
                f"{queue} events)")
    if batch >= max(1, queue // 2):
        return f"{batch} changes in one batch (the inotify queue holds {queue} events)"
    return None


def session_folders(root: Path) -> dict[int, str]:
    """{inode: "group/session"} for the root, every group and session folder
    (no symlinks). Directory entries carry the inode: no ``stat`` per folder."""
    out: dict[int, str] = {}
    try:
        out[os.stat(root, follow_symlinks=False).st_ino] = "."
        groups = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for group in groups:
        out[group.inode()] = group.name
        try:
            with os.scandir(group.path) as entries:
                for sess in entries:
                    if sess.is_dir(follow_symlinks=False):
                        out[sess.inode()] = f"{group.name}/{sess.name}"
        except OSError:
            continue
    return out


def unwatched(folders: dict[int, str], watched: set[int], root: Path | None = None
              ) -> dict[int, str]:
    """The folders whose inode no watch of ours covers — and that we could watch:
    one we may not read (``root`` given) cannot be watched, so restarting the watch
    for it would only repeat itself; it counts once it is readable."""
    return {ino: name for ino, name in folders.items() if ino not in watched
            and (root is None or os.access(root / name, os.R_OK | os.X_OK))}


class Episodes:
    """When signs of loss become rescans, and which rescan is warned about.

    The first sign of an episode: a rescan now, with one warning. Signs while it
    lasts: a rescan owed, made ``LOSS_RESCAN_EVERY`` after the last one (events may
    still be getting lost; the last rescan must come after the last loss), logged
    at debug only. ``LOSS_EPISODE_END`` without a sign ends the episode.
    """

    def __init__(self) -> None:
        self.last_sign: float | None = None
        self.last_rescan = 0.0
        self.owed = False

    def step(self, sign: str | None, now: float) -> tuple[str, bool] | None:
        """(reason, warn) of the rescan to make now, or None."""
        out = None
        if sign:
            if self.last_sign is None or now - self.last_sign >= LOSS_EPISODE_END:
                out, self.last_rescan, self.owed = (sign, True), now, False
            else:
                self.owed = True
            self.last_sign = now
        if self.owed and now - self.last_rescan >= LOSS_RESCAN_EVERY:
            out = ("events were still being lost", False)
            self.last_rescan, self.owed = now, False
        return out

    def due_in(self, now: float) -> float | None:
        """Seconds until an owed rescan is due (wake up for it), or None."""
        return max(0.0, self.last_rescan + LOSS_RESCAN_EVERY - now) if self.owed else None


class Gate:
    """Given to the notifier's ``watch`` as its ``stop_event``: the watch calls
    ``is_set`` once per step, which is the one place a long ``watch`` call lets us
    look at the watch from outside without a thread of our own: a stall or a filling
    queue is kept as a sign (``take_sign``), and every ``verify_every`` s the watched
    inodes are compared with the folders; one unwatched twice in a row asks for a
    restart (``is_set`` then says True and ``watch`` returns "stop")."""

    def __init__(self, halt: threading.Event, root: Path, fd: int | None, queue: int,
                 verify_every: float, watched: Callable[[], set[int] | None],
                 first_in: float = 0.0) -> None:
        self.halt, self.root, self.fd, self.queue = halt, root, fd, queue
        self.watched = watched  # the notifier's own list of the inodes it watches
        self.verify_every = verify_every
        self.last = time.monotonic()
        self.sign: str | None = None
        self.restart: str | None = None
        self.verify_at = self.last + first_in  # soon: what did the walk at start leave out?
        self.suspects: dict[int, str] = {}
        self._buf = array.array("i", [0])
        self._pending_limit = queue * MIN_EVENT_BYTES // 2  # as in ``loss_sign``

    def arm(self) -> None:
        self.last = time.monotonic()

    def is_set(self) -> bool:
        # called every step (3-20 ms) of the watch, also when nothing happens: the
        # common case is two comparisons and one ioctl
        now = time.monotonic()
        gap, self.last = now - self.last, now
        if self.sign is None:
            pending = pending_bytes(self.fd, self._buf) if self.fd is not None else 0
            if gap >= STALL_SECONDS or pending >= self._pending_limit:
                self.sign = loss_sign(gap=gap, pending=pending, batch=0, queue=self.queue)
        if self.fd is not None and now >= self.verify_at:
            self._verify(now)
        return self.halt.is_set() or self.restart is not None

    def _verify(self, now: float) -> None:
        """Folders no watch covers, twice in a row (a folder just created may not be
        watched yet): restart the watch, which adds them (and rescans)."""
        watched = self.watched()
        if watched is None:
            self.verify_at = now + self.verify_every
            return
        missing = unwatched(session_folders(self.root), watched, self.root)
        confirmed = {ino: name for ino, name in missing.items() if ino in self.suspects}
        if confirmed:
            names = sorted(confirmed.values())
            self.restart = (f"{len(names)} folder(s) not watched ({', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''})")
        self.suspects = missing
        self.verify_at = now + (RECHECK_AFTER if missing else self.verify_every)

    def take_sign(self) -> str | None:
        sign, self.sign = self.sign, None
        return sign
