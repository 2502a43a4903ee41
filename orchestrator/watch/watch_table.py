"""Which folders of the sessions tree hold an inotify watch: one per folder, never
through a link, within the watch budget.

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
- nothing below ``outbox/`` and no other folder of a session is ever watched;
- a session's ``outbox/`` is watched only once the session shows activity (any event
  in its folder: a heartbeat, a commit, the host's own delivery record), before that
  event reaches the loop: a dormant session costs one watch, not two (100 000
  sessions: ~100 000 watches). An outbox file written before its watch existed is
  seen by the pass that event causes, as for a new folder;
- ``limit`` watches at most (``budget.usable``; the kernel's ENOSPC counts too): the
  session folders past it are polled (``polled.PolledSessions``), and one that shows
  activity there is promoted to a watch, taking the place of the outbox watch or
  session watch that went longest without an event.

``WatchTable`` is that bookkeeping (which folder each watch is on, the walk, the
budget); ``folder_watch.FolderWatch`` builds on it to read the events. Separate
because what is watched is decided apart from how an event is read: this side
changes when a folder appears or the budget runs out, the other on every event.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os

from orchestrator.contract.inotify import IN_CLOEXEC, IN_NONBLOCK, _libc
from orchestrator.contract.layout import OUTBOX
from orchestrator.host.safefs import open_dir
from orchestrator.watch.budget import Shortfall, poll_round
from orchestrator.watch.changes import Change
from orchestrator.watch.polled import PolledSessions
from orchestrator.watch.start_walk import MASK, Full, StartWalk

POLL_RATE = 4000.0  # polled sessions looked at per second, at most (2 lstat calls each)
POLL_INTERVAL = 1.0  # and none more often than once a second


def watched_level(depth: int, name: str) -> bool:
    """Whether a folder named ``name`` at ``depth`` below the root (1 = a group, 2 = a
    session, 3 = a session's entry) is one the host watches."""
    return depth in (1, 2) or (depth == 3 and name == OUTBOX)


class WatchTable(StartWalk):
    """The watches on the sessions root, its groups, sessions and their ``outbox/``:
    which folder each is on, added by a walk without links, within ``limit``."""

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None,
                 poll_rate: float = POLL_RATE, poll_interval: float = POLL_INTERVAL,
                 keep_seen: bool = False) -> None:
        self.root = os.path.normpath(root)
        self._keep_seen = keep_seen  # fill ``seen`` (someone will take it: ``head_start``)
        # session id → its folder, whose watch has another mask (``_set_mask``: a muted
        # session's, ``folder_watch``); a new watch on it has MASK again
        self._quieted: dict[str, str] = {}
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._add = libc.inotify_add_watch
        self._rm = libc.inotify_rm_watch
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            if code == errno.EMFILE:
                raise OSError(code, "inotify_init1: this user has all the inotify instances "
                              "the kernel allows; raise fs.inotify.max_user_instances "
                              "(e.g. 'sysctl -w fs.inotify.max_user_instances=1024')")
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.limit = limit  # most watches this instance adds (None: until ENOSPC)
        self.kernel_refused = False  # ENOSPC below ``limit``: other programs hold the rest
        self.paths: dict[int, tuple[str, int]] = {}  # wd → (path, depth)
        self.inodes: dict[int, int] = {}  # wd → the watched folder's inode
        self._by_inode: dict[int, int] = {}  # inode → wd
        self.sessions: dict[str, int] = {}  # session path → wd, least recently active first
        self.outboxes: dict[str, int] = {}  # session path → its outbox/'s wd, oldest first
        self.polled = PolledSessions(poll_rate, poll_interval)
        self._no_outbox: set[str] = set()  # sessions whose outbox/ is missing or unwatchable
        self._walking = True  # a walk fills up; a session found later makes room
        self._first_walk = True  # sessions found by the first walk: outbox/ once active
        self._known: set[str] = set()  # during a walk again: the folders covered before
        # group path → (``bulk_add`` records, session name → its offset there, the same
        # lstats as text: ``Listing.idents``, ``Listing.times``): each session folder's
        # lstat just after its watch was added (the start-up check's)
        self.seen: dict[str, tuple[array.array, dict[str, int],
                                   tuple[list[str], list[str]]]] = {}
        # group path → the names its child's listing found (session folders, links): the
        # start-up's look for folders not registered yet needs no listing of its own
        self.listed: dict[str, list[str]] = {}
        try:  # a root that cannot be opened, a used-up budget: no descriptor left behind
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._walk(root_fd, self.root, 0, [])
            finally:
                os.close(root_fd)
        except BaseException:
            self.close()
            raise
        self._walking = self._first_walk = False

    # --- watches ------------------------------------------------------------------------

    def _watch(self, dir_fd: int, path: str, depth: int) -> bool:
        """Watch the folder open as ``dir_fd``; False if it cannot be (e.g. EACCES:
        watch_health finds it unwatched and says so); ``Full`` past the budget."""
        if self.limit is not None and len(self.paths) >= self.limit:
            ino = os.fstat(dir_fd).st_ino
            wd = self._by_inode.get(ino)
            if wd is not None and self.paths.get(wd, ("",))[0] == path:
                return True  # watched already (a walk again after an overflow)
            if self._walking or not self._make_room(depth):
                raise Full
        wd = self._add(self.fd, f"/proc/self/fd/{dir_fd}".encode(), MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC:
                self.kernel_refused = True
                if self._walking or not self._make_room(depth):
                    raise Full
                wd = self._add(self.fd, f"/proc/self/fd/{dir_fd}".encode(), MASK)
                if wd < 0:
                    raise Full
            else:
                return False
        ino = os.fstat(dir_fd).st_ino
        self.paths[wd] = (path, depth)
        self.inodes[wd] = ino
        self._by_inode[ino] = wd
        if depth == 2:
            self.sessions[path] = wd
            self.polled.remove(path)
            self._quieted.pop(path[path.rfind("/") + 1:], None)  # (MASK again)
        elif depth == 3:
            parent = path.rsplit("/", 1)[0]
            self.outboxes[parent] = wd
            self._no_outbox.discard(parent)
        return True

    def _unwatch(self, wd: int) -> None:
        self._rm(self.fd, wd)
        self._forget(wd)

    def _forget(self, wd: int) -> None:
        path, depth = self.paths.pop(wd, ("", 0))
        ino = self.inodes.pop(wd, None)
        if ino is not None and self._by_inode.get(ino) == wd:
            del self._by_inode[ino]
        if depth == 2 and self.sessions.get(path) == wd:
            del self.sessions[path]
            self._no_outbox.discard(path)
            self._quieted.pop(path[path.rfind("/") + 1:], None)
        elif depth == 3:
            parent = path.rsplit("/", 1)[0]
            if self.outboxes.get(parent) == wd:
                del self.outboxes[parent]

    def _make_room(self, depth: int) -> bool:
        """Free one watch for a folder at ``depth`` (a session, its outbox): the outbox
        watch, else (for a session) the session watch, that went longest without an
        event. An evicted session is polled from here on (its baseline first)."""
        if self.outboxes:
            self._unwatch(next(iter(self.outboxes.values())))
            return True
        if depth != 2 or len(self.sessions) < 2:
            return False
        path, wd = next(iter(self.sessions.items()))
        self.polled.add(path, self.inodes.get(wd, 0))
        self._unwatch(wd)
        return True

    def _walk(self, dir_fd: int, path: str, depth: int, found: list[str]) -> None:
        """Watch the folder open as ``dir_fd``, then the folders below it the host
        watches; ``found`` collects the paths of the folders below it."""
        try:
            if not self._watch(dir_fd, path, depth):
                return
        except Full:
            if depth == 2:  # a session past the budget: polled
                self.polled.add(path, os.fstat(dir_fd).st_ino)
            elif depth == 3:  # its outbox: the sweep looks at a reply waiting for files
                self._no_outbox.add(path.rsplit("/", 1)[0])
            elif depth < 2:  # (a group past it: its sessions are found by the sweep)
                self._poll_below(dir_fd, path, depth)
            return
        if depth >= 2:  # a session folder: never a list of what is in it (an agent's
            # million files); its outbox/ now if it is new (``send`` just made it), else
            # once it shows activity (``_active``)
            if depth == 2 and not self._first_walk and path not in self._known:
                self._enter(dir_fd, path, depth, OUTBOX, found)
            return
        if depth == 1 and self._first_walk:  # the start-up walk: sessions in one call each
            self._sessions_at_start(dir_fd, path, found)
            return
        try:
            entries = [e.name for e in os.scandir(dir_fd)
                       if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name in entries:
            if watched_level(depth + 1, name):
                self._enter(dir_fd, path, depth, name, found)

    def _poll_below(self, dir_fd: int, path: str, depth: int) -> None:
        """A group (or root) that got no watch: poll the sessions in it."""
        try:
            entries = [(e.name, e.inode()) for e in os.scandir(dir_fd)
                       if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name, ino in entries:
            if depth == 1:
                self.polled.add(f"{path}/{name}", ino)

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
            wd = self._by_inode.get(os.fstat(parent_fd).st_ino)
            if wd is not None and self.paths.get(wd, (None,))[0] == parent:  # still ours
                self._enter(parent_fd, parent, depth, name, found)
        finally:
            os.close(parent_fd)
        return found

    def _active(self, session: str, wd: int) -> None:
        """An event in a watched session folder: it is the most recently active, and
        its ``outbox/`` gets a watch if it has none (before the batch reaches the loop,
        so the pass sees what was written there before)."""
        del self.sessions[session]
        self.sessions[session] = wd
        if session not in self.outboxes and session not in self._no_outbox:
            self._appeared(session, 2, OUTBOX)
            if session not in self.outboxes:
                self._no_outbox.add(session)  # its creation is an event: watched then

    def _promote(self, session: str) -> None:
        """A polled session changed: give it a watch (``_make_room``), if it can have one."""
        group, _, name = session.rpartition("/")
        self._appeared(group, 1, name)

    def _poll_due(self, changes: set[tuple[Change, str]]) -> bool:
        """Look at the polled sessions whose turn it is; whether any changed."""
        if not len(self.polled):
            return False
        changed = self.polled.due(changes)
        for session in changed:
            self._promote(session)
        return bool(changed)

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

    def _set_mask(self, session: str, wd: int, mask: int) -> bool:
        """Replace the mask of the watch ``wd`` on ``session`` (opened again without
        following a link; the very folder watched, by its inode, or nothing is done)."""
        fd = self._open(session)
        if fd is None:
            return False
        try:
            if os.fstat(fd).st_ino != self.inodes.get(wd):
                return False
            return self._add(self.fd, f"/proc/self/fd/{fd}".encode(), mask) == wd
        finally:
            os.close(fd)

    def _rewalk(self, changes: set[tuple[Change, str]]) -> None:
        """Watch every folder that should be (an existing watch is kept: same inode,
        same descriptor; no watch is taken from another folder); the ones newly
        watched or polled are reported as added."""
        before = {path for path, _ in self.paths.values()} | set(self.polled.marks)
        found: list[str] = []
        root_fd = self._open(self.root)
        if root_fd is None:
            return
        self._walking, self._known = True, before
        try:
            self._walk(root_fd, self.root, 0, found)
        finally:
            self._walking, self._known = False, set()
            os.close(root_fd)
        changes.update((Change.added, path) for path in found if path not in before)

    def watched_inodes(self) -> set[int]:
        """The inodes this instance covers: those it watches, from its own exact
        bookkeeping (the kernel's list in /proc/self/fdinfo says the same, at ~50 ms
        per 20 000), and the session folders it polls."""
        return set(self.inodes.values()) | set(self.polled.inodes.values())

    def counts(self) -> tuple[int, int]:
        """(watches held, session folders polled)."""
        return len(self.paths), len(self.polled)

    def shortfall(self) -> Shortfall | None:
        """The facts of the over-budget line, None while no session is polled."""
        if not len(self.polled):
            return None
        groups = sum(1 for _, depth in self.paths.values() if depth == 1)
        return Shortfall(sessions=len(self.sessions) + len(self.polled), groups=groups,
                         polled=len(self.polled), kernel_refused=self.kernel_refused,
                         poll_round=poll_round(len(self.polled), self.polled.rate,
                                               self.polled.interval))

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def watched_folders(watch: WatchTable) -> list[str]:
    """The folders ``watch`` holds a watch on, sorted."""
    return sorted(path for path, _ in watch.paths.values())
