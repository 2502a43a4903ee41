"""Is the inotify watch still telling us everything? Signs of lost events.

inotify loses events in two ways, and the watchfiles binding reports neither:

- **Queue overflow.** The kernel queues at most ``fs.inotify.max_queued_events``
  events per instance; past that it queues one ``IN_Q_OVERFLOW`` and drops the
  rest until the reader catches up. The ``notify`` crate (8.0, inside watchfiles
  1.x) turns ``IN_Q_OVERFLOW`` into an event of kind ``Other`` with the ``Rescan``
  flag and **no path**; watchfiles' handler (``src/lib.rs``) only records events
  that have a path, so the overflow is dropped without a trace (it is printed
  only with ``debug=True``, to the process's stderr, with every other event).
- **Folders that are not watched.** A recursive watch adds one watch per
  directory; notify adds them for new folders itself, but ignores any error in
  doing so (``add_watch(...).ok()``), and at start-up a folder it may not read
  (``EACCES`` for a non-root host) ends its walk — with
  ``ignore_permission_denied`` the error is swallowed.

So we look from outside, at what the kernel itself says about *our* inotify
instance (the fd ``RustNotify`` opened, found in ``/proc/self/fd``):

- ``FIONREAD`` on it: bytes queued and not yet read by notify. A queue near
  its limit means notify is behind and events are being, or are about to be,
  dropped.
- ``/proc/self/fdinfo/<fd>``: one line per watch with the watched inode, so
  "is this session folder watched?" has an exact answer.
- a stall: the Rust loop asks its stop event once per step; a gap of seconds
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
import termios
from pathlib import Path

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
INOTIFY_LINK = "anon_inode:inotify"
MIN_EVENT_BYTES = 16  # struct inotify_event without a name
STALL_SECONDS = 1.0


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


def watched_inodes(fd: int) -> set[int] | None:
    """Inodes watched by inotify instance ``fd`` (from its fdinfo), None if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            text = fh.read()
    except OSError:
        return None
    inodes = set()
    for line in text.splitlines():
        if line.startswith("inotify "):
            for part in line.split():
                if part.startswith("ino:"):
                    inodes.add(int(part[4:], 16))
    return inodes


def find_instance(before: set[int], root: Path) -> int | None:
    """The inotify fd that appeared since ``before`` and watches ``root``.

    watchfiles does not expose its fd; another thread may open an instance at the
    same moment, so the new fd must also be the one that watches our root.
    """
    try:
        root_ino = os.stat(root).st_ino
    except OSError:
        return None
    found = [fd for fd in inotify_fds() - before
             if root_ino in (watched_inodes(fd) or ())]
    return found[0] if len(found) == 1 else None


def pending_bytes(fd: int) -> int:
    """Bytes queued on inotify instance ``fd`` and not read yet (FIONREAD)."""
    buf = array.array("i", [0])
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


def watch_paths(root: Path) -> list[str]:
    """What to hand ``RustNotify``: the root, then every group and session folder.

    notify's recursive walk stops at the first folder it may not watch (``EACCES``
    for a non-root host, swallowed by ``ignore_permission_denied``), leaving every
    folder after it unwatched. Each path is walked on its own, so one unreadable
    folder costs only itself; the duplicates cost nothing (one watch per inode).
    """
    folders = session_folders(root)
    return [str(root)] + [str(root / name) for name in sorted(folders.values(),
                                                               key=lambda n: (n.count("/"), n))
                          if name != "."]
