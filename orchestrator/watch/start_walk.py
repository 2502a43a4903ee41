"""The start-up walk's sessions, as a part of ``WatchTable``: each group's session
folders watched in one call each (``inotify_add_watch`` through the group's
descriptor), or, for a big group, listed and added by a child process (``bulk_add``)
whose ``lstat`` of each folder the start-up check reads (``seen``, ``listed``).

A mixin only to keep ``watch_table.py`` about the table itself (which folder each
watch is on, the budget, folders appearing later); it has no state of its own
(``WatchTable.__init__`` makes every attribute it uses). ``MASK`` is every watch's.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
from itertools import repeat
from typing import TYPE_CHECKING, Callable

from orchestrator.contract.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_EXCL_UNLINK,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
)
from orchestrator.watch.bulk_add import CHILD_FROM, FIELDS, add_in_child, big_group

if TYPE_CHECKING:
    from orchestrator.watch.polled import PolledSessions

MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)

class Full(Exception):
    """No watch can be added: this instance's limit, or the kernel's (ENOSPC)."""


class StartWalk:
    # WatchTable's, used here (see watch_table.py)
    fd: int
    limit: int | None
    kernel_refused: bool
    paths: dict[int, tuple[str, int]]
    inodes: dict[int, int]
    _by_inode: dict[int, int]
    sessions: dict[str, int]
    polled: PolledSessions
    seen: dict[str, tuple[array.array, dict[str, int], tuple[list[str], list[str]]]]
    listed: dict[str, list[str]]
    _keep_seen: bool
    _add: Callable[..., int]
    _rm: Callable[..., int]

    def _sessions_at_start(self, group_fd: int, group: str, found: list[str]) -> None:
        """Each session folder of a group at start-up, by one ``inotify_add_watch``
        through the group's descriptor with ``IN_DONT_FOLLOW`` (a link in its place is
        not followed; ``IN_ONLYDIR`` refuses a non-folder), its inode from the listing:
        100 000 sessions were 400 000 calls (open, add, fstat, close). A folder swapped
        between the listing and the add has another inode than noted: the health check
        finds it unwatched and restarts the watch. A big group (``bulk_add.big_group``,
        told by its link count before any listing) is listed and added by a child."""
        tried = big_group(os.fstat(group_fd))
        if tried and self._sessions_by_child(group_fd, group, found):
            return
        try:
            entries = [(e.name, e.inode()) for e in os.scandir(group_fd)
                       if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        if not tried and len(entries) >= CHILD_FROM and self._sessions_by_child(
                group_fd, group, found):
            return
        base = f"/proc/self/fd/{group_fd}/"
        for name, ino in entries:
            path = f"{group}/{name}"
            found.append(path)
            if self.limit is not None and len(self.paths) >= self.limit:
                self.polled.add(path, ino)
                continue
            wd = self._add(self.fd, (base + name).encode(), MASK | IN_DONT_FOLLOW)
            if wd < 0:
                if ctypes.get_errno() == errno.ENOSPC:
                    self._kernel_full(path, ino)
                continue  # a link, gone, EACCES: watch_health says so
            self._session_watched(wd, path, ino)

    def _kernel_full(self, path: str, ino: int) -> None:
        """The kernel refused a session's watch (ENOSPC): the budget is what is held
        now, and this session and the rest are polled."""
        self.kernel_refused = True
        self.limit = len(self.paths)
        self.polled.add(path, ino)

    def _session_watched(self, wd: int, path: str, ino: int) -> None:
        self.paths[wd] = (path, 2)
        self.inodes[wd] = ino
        self._by_inode[ino] = wd
        self.sessions[path] = wd

    def _sessions_by_child(self, group_fd: int, group: str, found: list[str]) -> bool:
        """``_sessions_at_start`` for a big group, its listing and adds in a child
        process (``bulk_add``); the ``lstat`` it took after each add is kept in
        ``seen``, its listing in ``listed``. False: the child failed (nothing recorded;
        the caller lists and adds them)."""
        room = (1 << 62) if self.limit is None else max(0, self.limit - len(self.paths))
        got = add_in_child(self.fd, group_fd, MASK | IN_DONT_FOLLOW, room)
        if got is None:
            return False
        names, values = got.names, got.values
        seen: dict[str, int] = {}  # session name → its record's offset in ``values``
        if self._keep_seen:
            self.seen[group] = (values, seen, (got.idents, got.times))
            self.listed[group] = names + got.links
        paths, inodes, by_inode, sessions = self.paths, self.inodes, self._by_inode, self.sessions
        wds = values[0::FIELDS]
        if (min(wds, default=0) >= 0 and 0 not in values[2::FIELDS]
                and (self.limit is None or len(paths) + len(wds) <= self.limit)):
            # the common case, every add and lstat done: recorded by C loops (100 000
            # sessions: ~0.1 s instead of ~0.35 s of the GIL, which the imports need)
            inos = values[FIELDS - 1::FIELDS]
            where = [f"{group}/{n}" for n in names]
            paths.update(zip(wds, zip(where, repeat(2), strict=False), strict=True))
            inodes.update(zip(wds, inos, strict=True))
            by_inode.update(zip(inos, wds, strict=True))
            sessions.update(zip(where, wds, strict=True))
            seen.update(zip(names, range(0, len(values), FIELDS), strict=True))
            found += where
            return True
        at = -FIELDS
        for name in names:
            at += FIELDS
            ino = values[at + FIELDS - 1]
            path = f"{group}/{name}"
            found.append(path)
            wd = values[at]
            if wd < 0 or (self.limit is not None and len(paths) >= self.limit):
                if wd == -errno.ENOSPC and len(paths) < (self.limit or 1 << 62):
                    self._kernel_full(path, ino)
                elif wd == -errno.ENOSPC or wd >= 0:
                    if wd >= 0:  # (past a limit lowered meanwhile: not ours to keep)
                        self._rm(self.fd, wd)
                    self.polled.add(path, ino)
                continue  # a link, gone, EACCES: watch_health says so
            self._session_watched(wd, path, ino)
            if values[at + 2]:
                seen[name] = at
        return True
