"""A session's database connections kept open between passes, for its busy spells.

Why (issue 28): a pass that finds one reply opened two SQLite connections (the
reply's ``outbound.db`` read, the delivery record's ``inbound.db`` commit), and each
open is a ``connect``, a ``verify`` of the file SQLite reached, a ``PRAGMA`` and a
parse of the schema by its first statement, then a close: about half of a pass's
CPU when it finds one reply. In events mode a busy session's pass finds one reply,
in poll mode several, so events mode paid these opens per reply. Measured with the
real pass over a real session folder (``python -m bench.passcost``, sizes alternated,
two code versions alternated, load ~5 on 2 cores): a one-reply pass took 2.8–3.6 ms
of CPU with fresh connections, 1.9–2.3 ms with kept ones (then with ``inbound.db``
kept read-write; its write now opens afresh, see below).

What is kept, per session folder: a duplicate of the folder's descriptor (SQLite
names its files through ``/proc/self/fd/<it>``, so it must stay the very folder it
was opened in), and ``outbound.db`` and ``inbound.db`` connections, both read-only
(the pass's reads; its writes to ``inbound.db``, the delivery records, open afresh).
Never read-write: closing a descriptor opened for writing raises ``IN_CLOSE_WRITE``
for the file, which the host's own watch reads as a change of an idle session. When
``inbound.db`` was kept read-write, every eviction (more than ``sessions`` folders
passed: a first start, a sweep at 1 000 sessions) and every idle close caused a pass,
which kept the session again and evicted another: measured, a first start of 1 000
sessions took 60 s at 100 % of a core and never went idle (the quick bench's idle row).
Nothing else: not a session's start nor any reader, only a pass an agent's write
caused (``SessionWorker``'s ``KEEPS``: not a full or sweep pass, or a first start
would keep each session's connections and evict another's; ``SessionDir(kept=...)``
and ``SessionDir.db``).

The folder is the agent's, so a kept connection is trusted again on each use only
after the checks a fresh open makes (``SafeDb.connect``), done on the folder that pass
opened from the sessions root without following a link:

- the folder is the same one (device and inode) the connection was opened in;
- the name is still the regular, singly linked file whose inode the connection holds
  (a kept descriptor keeps its inode allocated, so a file with that inode *is* it);
  a file replaced, removed or turned into a link drops the connection, and a fresh
  open then says what is wrong as it always did;
- the files SQLite opens beside it by name (``-journal``, ``-wal``, ``-shm``) are
  regular files or absent.

A connection is dropped after any error in its use (a busy file, a bad one: the next
use opens afresh) or when a use leaves a transaction open. Between uses a kept
connection holds no lock (autocommit: every transaction is ended by its store
function), so it never blocks the agent and a raw ``open``/``close`` of the file
(``commit_mark``) cannot drop a lock SQLite holds. Reads stay current: in rollback
journal mode SQLite compares the file change counter at the start of each read and
forgets its cached pages when another process committed.

Bounded: at most ``sessions`` folders (least recently used dropped first, three
descriptors each) and each closed ``idle`` seconds after its last use
(``close_idle``, called by the reconcile sweep's ticks).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB


class FolderLike(Protocol):  # what is used of ``safefs.SessionDir`` (which imports this)
    where: str
    fd: int
    identity: tuple[int, int]


class DbLike(Protocol):  # what is used of ``safefs.SafeDb``
    name: str

    @property
    def folder(self) -> FolderLike: ...

    def checked(self) -> os.stat_result | None: ...

KEPT_NAMES = frozenset({OUTBOUND_DB, INBOUND_DB})  # kept read-only (see the module)
KEPT_SESSIONS = 128  # folders with connections open at once: 3 descriptors each
KEPT_IDLE = 10.0  # s without a pass before a folder's connections are closed


def keeps(name: str, readonly: bool, busy_ms: int, create: bool) -> bool:
    """Whether a request for ``name`` may be served by a kept connection: the pass's
    own plain reads only (no write, no create, no wait of the caller's choice)."""
    return name in KEPT_NAMES and readonly and not create and busy_ms == 0


@dataclass(slots=True)
class _Folder:
    dir_fd: int  # a duplicate of the folder's descriptor, named in every kept URI
    identity: tuple[int, int]  # (st_dev, st_ino) of that folder
    used: float
    conns: dict[str, tuple[sqlite3.Connection, tuple[int, int]]] = field(default_factory=dict)

    def close(self) -> None:
        for conn, _ in self.conns.values():
            conn.close()
        self.conns.clear()
        os.close(self.dir_fd)


class KeptDbs:
    """The kept connections of the sessions passed most recently (see the module)."""

    def __init__(self, sessions: int = KEPT_SESSIONS, idle: float = KEPT_IDLE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.idle = idle
        self.clock = clock
        self._folders: OrderedDict[str, _Folder] = OrderedDict()
        self.opened = 0  # connections opened (a figure for the tests and the bench)

    def __len__(self) -> int:
        return len(self._folders)

    def connection(self, db: DbLike, open_fresh: Callable[[int], tuple[
            sqlite3.Connection, os.stat_result]]) -> sqlite3.Connection:
        """``db``'s kept connection, checked again (see the module), or a new one
        made by ``open_fresh(dir_fd)`` (which verifies what it opened and returns the
        file's stat) and kept. Raises like a fresh open when the file is not usable."""
        folder = db.folder
        key = folder.where
        now = self.clock()
        entry = self._folders.get(key)
        if entry is not None and entry.identity != folder.identity:
            self.drop(key)  # another folder under that name now
            entry = None
        try:
            st = db.checked()  # the file and its side files, as a fresh open checks them
        except BaseException:
            self.drop(key)  # a link or a FIFO now: nothing of this folder is used again
            raise
        if entry is not None:
            entry.used = now
            self._folders.move_to_end(key)
            kept = entry.conns.get(db.name)
            if kept is not None:
                if st is not None and (st.st_dev, st.st_ino) == kept[1]:
                    return kept[0]
                self._forget(entry, db.name)  # replaced or gone: never used again
        if st is None:
            raise sqlite3.OperationalError(f"{db}: no such file")
        if entry is None:
            entry = _Folder(os.dup(folder.fd), folder.identity, now)
            self._folders[key] = entry
            self._bound()
        conn, opened = open_fresh(entry.dir_fd)
        self.opened += 1
        entry.conns[db.name] = (conn, (opened.st_dev, opened.st_ino))
        return conn

    def release(self, db: DbLike, conn: sqlite3.Connection, failed: bool) -> None:
        """After a use: kept, unless it failed or left a transaction open."""
        if not failed and not conn.in_transaction:
            return
        entry = self._folders.get(db.folder.where)
        if entry is not None and entry.conns.get(db.name, (None,))[0] is conn:
            self._forget(entry, db.name)
        else:
            conn.close()

    @staticmethod
    def _forget(entry: _Folder, name: str) -> None:
        conn, _ = entry.conns.pop(name)
        conn.close()  # rolls back anything left open

    def drop(self, where: str) -> None:
        """Close a folder's connections (``sessions/<group>/<id>``): it is being
        removed, or another folder took its name."""
        entry = self._folders.pop(where, None)
        if entry is not None:
            entry.close()

    def drop_session(self, session_id: str) -> None:
        """``drop`` the folder of that session, in whichever group."""
        for where in [w for w in self._folders if w.rsplit("/", 1)[-1] == session_id]:
            self.drop(where)

    def _bound(self) -> None:
        while len(self._folders) > self.sessions:
            _, entry = self._folders.popitem(last=False)
            entry.close()

    def close_idle(self) -> int:
        """Close the folders not used for ``idle`` seconds; returns how many."""
        horizon = self.clock() - self.idle
        stale = [k for k, e in self._folders.items() if e.used < horizon]
        for key in stale:
            self.drop(key)
        return len(stale)

    def close(self) -> None:
        for key in list(self._folders):
            self.drop(key)
