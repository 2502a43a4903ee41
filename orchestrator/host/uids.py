"""Each session's agent as its own uid, when the orchestrator runs as root.

``[runtime] uid_range`` names the uids handed out; the mapping session -> uid is
kept in the registry (``session_uids``, its uid UNIQUE) so a session keeps its uid
across restarts, and a uid is never given to a second session (rows are never
deleted: sessions are not either). The gid is the same number.

``give_folder`` hands a session folder to its agent's uid: the folder itself
(0700) and what the agent writes (``outbound.db``, ``.heartbeat``, ``outbox/``)
become the agent's; ``inbound.db`` and ``inbox/`` stay the host's, readable by
the agent's gid only (0640, 02750: files made in the inbox take its group).

A group folder (``[docker] group_folder``) is shared by the group's sessions, so
it cannot be one session's: each agent group gets a gid of its own from the same
range (``group_gid``; kept in the same table under ``group:<name>``, a key no
session id can take), the folder is ``root:<that gid>`` 02770, and every agent of
the group runs with it as a supplementary group.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
from pathlib import Path

from loguru import logger

from orchestrator.contract import layout
from orchestrator.contract.schema import format_ts, transaction, utcnow
from orchestrator.host.private import DIR_MODE, make_dirs, private_file

DDL = """CREATE TABLE IF NOT EXISTS session_uids (
    session_id TEXT PRIMARY KEY, uid INTEGER NOT NULL UNIQUE, assigned_at TEXT NOT NULL)"""
_said_shared = False


GROUP_KEY = "group:"  # ':' is not allowed in a session id (layout.validate_id)


class NoUidLeft(RuntimeError):
    """Every uid of the range belongs to a session."""


class SessionUids:
    """The session -> uid map in the registry file (its own connection)."""

    def __init__(self, registry: Path, uid_range: tuple[int, int]) -> None:
        self.lo, self.hi = uid_range
        self._lock = threading.Lock()
        if not registry.exists():
            make_dirs(registry.parent)
            private_file(registry)
        self._conn = sqlite3.connect(str(registry), isolation_level=None, timeout=10,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute(DDL)

    def uid_for(self, session_id: str) -> int:
        """The session's uid: the one it had, else the lowest never given out."""
        with self._lock, transaction(self._conn) as c:
            row = c.execute("SELECT uid FROM session_uids WHERE session_id=?",
                            (session_id,)).fetchone()
            if row is not None:
                return int(row[0])
            uid = self._free(c)
            c.execute("INSERT INTO session_uids (session_id, uid, assigned_at) VALUES (?,?,?)",
                      (session_id, uid, format_ts(utcnow())))
        if session_id.startswith(GROUP_KEY):
            logger.info("agent group {} shares gid {}", session_id[len(GROUP_KEY):], uid)
        else:
            logger.info("session {} runs as uid {}", session_id, uid)
        return uid

    def group_gid(self, agent_group: str) -> int:
        """The gid the agents of one group share (for its group folder); never a
        session's uid, kept across restarts."""
        return self.uid_for(GROUP_KEY + layout.validate_id(agent_group, "agent group"))

    def _free(self, c: sqlite3.Connection) -> int:
        top = c.execute("SELECT MAX(uid) FROM session_uids WHERE uid BETWEEN ? AND ?",
                        (self.lo, self.hi)).fetchone()[0]
        if top is None:
            return self.lo
        if top < self.hi:
            return int(top) + 1
        taken = {r[0] for r in c.execute("SELECT uid FROM session_uids WHERE uid BETWEEN ? AND ?",
                                         (self.lo, self.hi))}
        for uid in range(self.lo, self.hi + 1):
            if uid not in taken:
                return uid
        raise NoUidLeft(f"every uid of [runtime] uid_range {self.lo}-{self.hi} belongs to a "
                        "session; widen the range")

    def close(self) -> None:
        self._conn.close()


def open_uids(data_dir: Path, uid_range: tuple[int, int] | None) -> SessionUids | None:
    """The uid map when this process may give uids away (root) and a range is set;
    None otherwise, said once: every agent then runs as one uid."""
    global _said_shared
    if uid_range is not None and os.geteuid() == 0:
        return SessionUids(layout.registry_path(data_dir), uid_range)
    if not _said_shared:
        _said_shared = True
        why = "not running as root" if uid_range is not None else "[runtime] uid_range is off"
        logger.info("{}: every agent runs as the same uid (the data dir's owner), not one "
                    "uid per session", why)
    return None


def give_folder(folder: Path, uid: int, gid: int) -> list[Path]:
    """Hand a session folder to its agent (root only; see the module doc); returns what
    changed. Symlinks are never followed; a link where a file should be is left alone."""
    if os.geteuid() != 0:
        return []
    paths = layout.SessionPaths(folder)
    host = os.geteuid()
    wanted: list[tuple[Path, int, int, int | None]] = [(folder, uid, gid, DIR_MODE)]
    for p in (paths.outbound_db, paths.heartbeat, paths.outbox):
        wanted.append((p, uid, gid, None))
    wanted += [(p, uid, gid, None) for p in _tree(paths.outbox)]
    wanted += [(paths.inbound_db, host, gid, 0o640),
               (Path(f"{paths.inbound_db}-journal"), host, gid, 0o640),
               (paths.inbox, host, gid, 0o2750)]
    wanted += [(p, host, gid, None) for p in _tree(paths.inbox)]
    return [p for p, u, g, m in wanted if _own(p, u, g, m)]


def _tree(top: Path) -> list[Path]:
    if not top.is_dir() or top.is_symlink():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        found += [Path(dirpath) / n for n in dirnames + filenames]
    return found


def _own(path: Path, uid: int, gid: int, mode: int | None) -> bool:
    """chown (and chmod) what ``path`` is, by descriptor: a link is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: not ours to change
            return False
        raise
    try:
        st = os.fstat(fd)
        changed = False
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            changed = True
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
            changed = True
        return changed
    finally:
        os.close(fd)
