"""The host's inotify watch: one watch per folder, and never through a link.

Why not a recursive watch (watchfiles' ``RustNotify``, the ``notify`` crate, which
the host used before): it walks every folder it is given, and every folder that
appears later, following symbolic links. A session folder is the agent's to write,
so ``outbox/d/x -> /``
(made elsewhere, then renamed in, or present when the host starts) made the host
add a watch for every folder of the machine: the whole watch budget, seconds of a
walk holding the GIL at a start, and every change on the host reported as that
session's outbox. The host needs events from only four levels, all folders it
knows by name: the sessions root, each agent group, each session folder and its
``outbox/``. This module watches exactly those:

- each one opened component by component with ``O_NOFOLLOW|O_DIRECTORY``
  (``safefs.open_dir``) and watched through ``/proc/self/fd/<fd>``: the watch is
  on the very folder that was opened, whatever a racing rename does to the path;
- a folder that appears at one of those levels (a new group, session or outbox)
  is watched as its event is read, before the batch reaches the loop, so the pass
  that event causes sees everything written before the watch existed;
- nothing below ``outbox/`` and no other folder of a session is ever watched.

``FolderWatch`` is the ``watcher.Notifier`` the watch thread drives
(``watch(debounce_ms, step_ms, timeout_ms, stop_event)`` returning a set of
``(Change, path)``, "timeout" or "stop"; a context manager; tests script a
stand-in). A queue overflow (``IN_Q_OVERFLOW``) is reported (``take_lost``), not
dropped, and the watched inodes come from its own bookkeeping (``watched_inodes``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from typing import Protocol

from orchestrator.contract.inotify import (
    IN_ATTRIB,
    IN_CLOEXEC,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_TO,
    IN_NONBLOCK,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    _libc,
)
from orchestrator.contract.layout import OUTBOX
from orchestrator.host.safefs import open_dir
from orchestrator.watch.changes import Change

IN_MOVED_FROM = 0x00000040
IN_ISDIR = 0x40000000
IN_EXCL_UNLINK = 0x04000000

MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)
ADDED, MODIFIED, DELETED = Change.added, Change.modified, Change.deleted
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_READ = 64 * 1024
# While nothing has changed, how often ``watch`` wakes up to ask its stop event (the
# first change ends the wait at once, so this costs no latency, only wake-ups).
IDLE_WAKE_MS = 100



class StopEvent(Protocol):
    def is_set(self) -> bool: ...


def change_of(mask: int) -> Change | None:
    """An inotify event as a ``Change`` (None: not a change)."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        return ADDED
    if mask & (IN_DELETE | IN_MOVED_FROM):
        return DELETED
    if mask & (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE):
        return MODIFIED
    return None


def watched_level(depth: int, name: str) -> bool:
    """Whether a folder named ``name`` at ``depth`` below the root (1 = a group, 2 = a
    session, 3 = a session's entry) is one the host watches."""
    return depth in (1, 2) or (depth == 3 and name == OUTBOX)


class FolderWatch:
    """inotify on the sessions root, its groups, sessions and their ``outbox/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.normpath(root)
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._add = libc.inotify_add_watch
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.paths: dict[int, tuple[str, int]] = {}  # wd → (path, depth)
        self.inodes: dict[int, int] = {}  # wd → the watched folder's inode
        self.lost: str | None = None
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        try:  # a root that cannot be opened, a used-up budget: no descriptor left behind
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._walk(root_fd, self.root, 0, [])
            finally:
                os.close(root_fd)
        except BaseException:
            self.close()
            raise

    # --- watches ------------------------------------------------------------------------

    def _watch(self, dir_fd: int, path: str, depth: int) -> bool:
        wd = self._add(self.fd, f"/proc/self/fd/{dir_fd}".encode(), MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC:
                raise OSError(code, "the inotify watch budget (max_user_watches) is used up")
            return False  # e.g. EACCES: watch_health finds it unwatched and says so
        self.paths[wd] = (path, depth)
        self.inodes[wd] = os.fstat(dir_fd).st_ino
        return True

    def _walk(self, dir_fd: int, path: str, depth: int, found: list[str]) -> None:
        """Watch the folder open as ``dir_fd``, then the folders below it the host
        watches; ``found`` collects the paths of the folders below it."""
        if not self._watch(dir_fd, path, depth):
            return
        if depth >= 2:  # a session folder: only its outbox/, never a list of what is in it
            if depth == 2:  # (an agent's million files would cost every start)
                self._enter(dir_fd, path, depth, OUTBOX, found)
            return
        try:
            entries = [e.name for e in os.scandir(dir_fd)
                       if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name in entries:
            if watched_level(depth + 1, name):
                self._enter(dir_fd, path, depth, name, found)

    def _enter(self, parent_fd: int, parent: str, depth: int, name: str,
               found: list[str]) -> None:
        child = f"{parent}/{name}"
        try:
            fd = open_dir(name, parent_fd, child)  # a link or a non-folder: refused
        except OSError:  # (absent too)
            return
        try:
            found.append(child)
            self._walk(fd, child, depth + 1, found)
        finally:
            os.close(fd)

    def _appeared(self, parent: str, depth: int, name: str) -> list[str]:
        """A folder appeared in a watched one: watch it (and what is already in it)
        now, before its event reaches the loop; its paths, to report as added."""
        found: list[str] = []
        parent_fd = self._open(parent)
        if parent_fd is None:
            return found
        try:
            wd = self._add(self.fd, f"/proc/self/fd/{parent_fd}".encode(), MASK)
            if self.paths.get(wd, (None,))[0] == parent:  # still the folder we watch there
                self._enter(parent_fd, parent, depth, name, found)
        finally:
            os.close(parent_fd)
        return found

    def _open(self, path: str) -> int | None:
        """A watched folder, opened from the root one component at a time (no links)."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        for part in path[len(self.root):].split("/"):
            if not part:
                continue
            try:
                nxt = open_dir(part, fd, path)
            except OSError:
                return None
            finally:
                os.close(fd)
            fd = nxt
        return fd

    # --- events -------------------------------------------------------------------------

    def _read(self, changes: set[tuple[Change, str]]) -> bool:
        """Read what is queued into ``changes``; True if anything was read."""
        got = False
        while True:
            try:
                buf = os.read(self.fd, _READ)
            except BlockingIOError:
                return got
            except InterruptedError:
                continue
            if not buf:
                return got
            got = True
            self._parse(buf, changes)

    def _parse(self, buf: bytes, changes: set[tuple[Change, str]]) -> None:
        offset = 0
        while offset + _HEADER.size <= len(buf):
            wd, mask, _cookie, length = _HEADER.unpack_from(buf, offset)
            offset += _HEADER.size
            name = buf[offset:offset + length].split(b"\0", 1)[0].decode("utf-8", "replace")
            offset += length
            if mask & IN_Q_OVERFLOW:  # a new folder's event may be among the lost: walk again
                self.lost = "the kernel's inotify queue overflowed"
                self._rewalk(changes)
                continue
            where = self.paths.get(wd)
            if where is None:
                continue
            if mask & IN_IGNORED:  # the folder is gone (or unmounted): so is its watch
                del self.paths[wd]
                self.inodes.pop(wd, None)
                continue
            path, depth = where
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) or not name:
                continue  # its parent reports it (deleted, renamed) by name
            change = change_of(mask)
            if change is None:
                continue
            full = f"{path}/{name}"
            changes.add((change, full))
            if change == ADDED and mask & IN_ISDIR and watched_level(depth + 1, name):
                for sub in self._appeared(path, depth, name):
                    changes.add((ADDED, sub))

    def _rewalk(self, changes: set[tuple[Change, str]]) -> None:
        """Watch every folder that should be (an existing watch is kept: same inode,
        same descriptor); the ones newly watched are reported as added."""
        before = {path for path, _ in self.paths.values()}
        found: list[str] = []
        root_fd = self._open(self.root)
        if root_fd is None:
            return
        try:
            self._walk(root_fd, self.root, 0, found)
        finally:
            os.close(root_fd)
        changes.update((ADDED, path) for path in found if path not in before)

    def watched_inodes(self) -> set[int]:
        """The inodes this instance watches, from its own exact bookkeeping (the
        kernel's list in /proc/self/fdinfo says the same, at ~50 ms per 20 000)."""
        return set(self.inodes.values())

    def take_lost(self) -> str | None:
        """Why events were lost since the last call (a queue overflow), or None."""
        lost, self.lost = self.lost, None
        return lost

    def watch(self, *, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: StopEvent | None) -> set[tuple[Change, str]] | str:
        """Wait for changes: a batch ends ``step_ms`` after the
        last change and at most ``debounce_ms`` after the first; "timeout" after
        ``timeout_ms`` (0: never) without any; "stop" once ``stop_event`` is set
        (asked once per step, which is what ``watch_health.Gate`` relies on)."""
        changes: set[tuple[Change, str]] = set()
        start = time.monotonic()
        first: float | None = None
        while True:
            if stop_event is not None and stop_event.is_set():
                return "stop"
            wait = step_ms if first is not None else max(step_ms, IDLE_WAKE_MS)
            if timeout_ms:
                wait = min(wait, max(0, timeout_ms - int((time.monotonic() - start) * 1000)))
            try:
                ready = self._poll.poll(wait)
            except InterruptedError:
                ready = []
            now = time.monotonic()
            if ready and self._read(changes) and changes:
                first = first if first is not None else now
                if (now - first) * 1000 < debounce_ms:
                    continue  # more may follow within a step
            if changes:
                return changes
            if self.lost is not None:
                return set()  # nothing to report but the loss (``take_lost``)
            if timeout_ms and (now - start) * 1000 >= timeout_ms:
                return "timeout"

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FolderWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watched_folders(watch: FolderWatch) -> list[str]:
    """The folders ``watch`` holds a watch on, sorted."""
    return sorted(path for path, _ in watch.paths.values())
