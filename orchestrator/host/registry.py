"""The central registry, ``<data_dir>/orchestrator.db``: host-only, so WAL is fine.

It knows agent groups, messaging groups, destinations and sessions, and keeps
what must survive an orchestrator restart: each session's container status with
its last reason, a log of status changes, and persistent delivery attempt counts
(a retry counter kept in memory resets on restart and retries forever).

This module holds the connection and the rows that say which sessions and groups
exist; the schema and its migrations are in ``registry_schema``, the per-session
records (start-up states, delivery attempts, agent settings, runs, series) in
``registry_records``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.contract.schema import format_ts, parse_ts, transaction, utcnow
from orchestrator.contract.session_status import Status
from orchestrator.host.private import make_dirs, private_file
from orchestrator.host.registry_records import SessionRecordsMixin
from orchestrator.host.registry_schema import MIGRATIONS
from orchestrator.host.schema_version import check, migrate
from orchestrator.support.errors import storage, storage_error

CONTAINER_STATUSES = tuple(Status)


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    agent_group_id: str
    messaging_group_id: str | None
    thread_id: str | None
    status: str
    container_status: str
    status_reason: str | None
    last_active: datetime | None
    last_heartbeat: datetime | None
    created_at: datetime | None
    queued_since: datetime | None = None  # waiting for an agent slot, due since then


def _session(row: sqlite3.Row) -> SessionRow:
    return SessionRow(
        row["id"], row["agent_group_id"], row["messaging_group_id"], row["thread_id"],
        row["status"], row["container_status"], row["status_reason"],
        parse_ts(row["last_active"]), parse_ts(row["last_heartbeat"]), parse_ts(row["created_at"]),
        parse_ts(row["queued_since"]) if "queued_since" in row.keys() else None)


class Registry(SessionRecordsMixin):
    """One connection per Registry; each method is one short transaction.

    The connection may be used from several threads (``check_same_thread=False``),
    so a lock serialises its transactions: two threads must never interleave a
    ``BEGIN`` on the same connection.
    """

    def __init__(self, path: Path, *, _conn: sqlite3.Connection | None = None) -> None:
        self.path = path
        self._lock = threading.RLock()
        if _conn is not None:  # see ``reader``
            self._conn = _conn
            return
        conn = None
        try:
            with storage(path, "open the registry"):
                make_dirs(path.parent)
                if not os.path.lexists(path):
                    private_file(path)  # 0600 whatever the umask; its -wal/-shm follow it
                conn = sqlite3.connect(str(path), isolation_level=None, timeout=10,
                                       check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=10000")
                migrate(conn, path, MIGRATIONS)  # a newer file: SchemaTooNew, left alone
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn

    @classmethod
    def reader(cls, path: Path) -> "Registry | None":
        """A registry opened read-only, for ``status``: it never writes, not even the
        schema, and works on a read-only or full disk. None if there is none yet.

        Even a ``mode=ro`` open of a WAL database creates its ``-wal`` and ``-shm``
        files (and fails where it cannot). With no ``-wal`` there, no connection
        has the file open and every commit is in the main file: ``immutable=1``
        reads it without creating anything. A writer that starts meanwhile writes
        to a new ``-wal``, not the main file, so the read stays consistent.
        """
        if not path.exists():
            return None
        uri = Path(os.path.abspath(path)).as_uri()
        last: Exception | None = None
        wal = os.path.exists(f"{path}-wal")
        for query in ("?mode=ro", "?mode=ro&immutable=1") if wal else ("?mode=ro&immutable=1",):
            conn = None
            try:
                conn = sqlite3.connect(uri + query, uri=True, isolation_level=None, timeout=10,
                                       check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("SELECT 1 FROM sessions LIMIT 1").fetchall()
                check(conn, path, MIGRATIONS)  # read with the columns it has, or refused
                return cls(path, _conn=conn)
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                if not isinstance(exc, sqlite3.Error):
                    raise
                last = exc
                if "no such table" in str(exc):
                    return None  # created but never used: no sessions
        raise storage_error(last, path, "read the registry")  # type: ignore[arg-type]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as c:
            yield c

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One transaction on the registry's connection, for the host modules that keep
        their own tables in it (``host.removals``)."""
        return self._tx()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- groups -----------------------------------------------------------------

    def ensure_agent_group(self, group_id: str, name: str | None = None) -> str:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO agent_groups (id, name, created_at) VALUES (?,?,?)",
                      (group_id, name or group_id, format_ts(utcnow())))
        return group_id

    def ensure_messaging_group(self, channel_type: str, platform_id: str) -> str:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO messaging_groups (id, channel_type, platform_id,"
                      " created_at) VALUES (?,?,?,?)",
                      ("mg-" + uuid.uuid4().hex[:12], channel_type, platform_id,
                       format_ts(utcnow())))
            (mg,) = c.execute("SELECT id FROM messaging_groups WHERE channel_type=? AND"
                              " platform_id=?", (channel_type, platform_id)).fetchone()
        return mg

    def messaging_group(self, mg_id: str) -> tuple[str, str] | None:
        with self._lock:
            row = self._conn.execute("SELECT channel_type, platform_id FROM messaging_groups"
                                     " WHERE id=?", (mg_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def set_destinations(self, agent_group_id: str, rows: list[dict]) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM destinations WHERE agent_group_id=?", (agent_group_id,))
            c.executemany(
                "INSERT INTO destinations (agent_group_id, name, display_name, type, channel_type,"
                " platform_id, target_agent_group_id) VALUES (?,?,?,?,?,?,?)",
                [(agent_group_id, r["name"], r.get("display_name"), r["type"],
                  r.get("channel_type"), r.get("platform_id"), r.get("agent_group_id"))
                 for r in rows])

    def destinations(self, agent_group_id: str) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(
                "SELECT * FROM destinations WHERE agent_group_id=? ORDER BY name",
                (agent_group_id,))]

    def record_chat(self, agent_group_id: str, channel_type: str, platform_id: str,
                    thread_id: str | None = None) -> bool:
        """Remember that a chat routes to a group (its automatic destination); True if new.

        ``thread_id`` only for a thread that is a session of its own (per-thread).
        """
        key = (agent_group_id, channel_type, platform_id, thread_id or "")
        with self._lock:  # known chats (nearly every message) cost a read, not a write
            if self._conn.execute(
                    "SELECT 1 FROM group_chats WHERE agent_group_id=? AND channel_type=? AND"
                    " platform_id=? AND thread_id=?", key).fetchone():
                return False
        with self._tx() as c:
            return c.execute(
                "INSERT OR IGNORE INTO group_chats (agent_group_id, channel_type, platform_id,"
                " thread_id, first_seen) VALUES (?,?,?,?,?)",
                (agent_group_id, channel_type, platform_id, thread_id or "",
                 format_ts(utcnow()))).rowcount == 1

    def group_chats(self, agent_group_id: str) -> list[tuple[str, str, str | None]]:
        """(channel_type, platform_id, thread_id or None) of every chat routing to the
        group: those recorded by ``record_chat`` and those its sessions are bound to."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT channel_type, platform_id, NULLIF(thread_id, '') FROM group_chats"
                " WHERE agent_group_id=? UNION SELECT m.channel_type, m.platform_id,"
                " s.thread_id FROM sessions s JOIN messaging_groups m"
                " ON m.id = s.messaging_group_id WHERE s.agent_group_id=?",
                (agent_group_id, agent_group_id)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    # --- sessions ---------------------------------------------------------------

    def get_or_create_session(self, *, resolution_key: str, agent_group_id: str,
                              messaging_group_id: str | None, thread_id: str | None,
                              new_id: str) -> tuple[SessionRow, bool]:
        """Race-free across processes: INSERT OR IGNORE on the unique key, then read."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO sessions (id, agent_group_id, messaging_group_id, thread_id,"
                " resolution_key, created_at) VALUES (?,?,?,?,?,?)",
                (new_id, agent_group_id, messaging_group_id, thread_id, resolution_key,
                 format_ts(utcnow())))
            created = cur.rowcount == 1
            row = c.execute("SELECT * FROM sessions WHERE resolution_key=?",
                            (resolution_key,)).fetchone()
        return _session(row), created

    def find_messaging_group(self, channel_type: str, platform_id: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT id FROM messaging_groups WHERE channel_type=? AND"
                                     " platform_id=?", (channel_type, platform_id)).fetchone()
        return row[0] if row else None

    def find_session(self, resolution_key: str) -> SessionRow | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM sessions WHERE resolution_key=?",
                                     (resolution_key,)).fetchone()
        return _session(row) if row else None

    def create_session(self, *, agent_group_id: str, chat: tuple[str, str] | None,
                       thread_id: str | None, key: Callable[[str | None], str], new_id: str,
                       place: Callable[[], None], unplace: Callable[[], None]
                       ) -> tuple[SessionRow, bool]:
        """Create a session's rows and put its folder in place as ONE step.

        ``place`` (the rename of a fully built folder) runs inside the transaction,
        so the row and the folder exist together or not at all: a failed rename
        rolls the rows back, a failed commit (a full disk) calls ``unplace``.
        Another process that created the same session first wins (INSERT OR
        IGNORE on the unique key); then ``place`` is not called.
        """
        now = format_ts(utcnow())
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            placed = False
            try:
                c.execute("INSERT OR IGNORE INTO agent_groups (id, name, created_at)"
                          " VALUES (?,?,?)", (agent_group_id, agent_group_id, now))
                mg_id = None
                if chat is not None:
                    c.execute("INSERT OR IGNORE INTO messaging_groups (id, channel_type,"
                              " platform_id, created_at) VALUES (?,?,?,?)",
                              ("mg-" + uuid.uuid4().hex[:12], chat[0], chat[1], now))
                    (mg_id,) = c.execute("SELECT id FROM messaging_groups WHERE channel_type=?"
                                         " AND platform_id=?", chat).fetchone()
                resolution = key(mg_id)
                created = c.execute(
                    "INSERT OR IGNORE INTO sessions (id, agent_group_id, messaging_group_id,"
                    " thread_id, resolution_key, created_at) VALUES (?,?,?,?,?,?)",
                    (new_id, agent_group_id, mg_id, thread_id, resolution, now)).rowcount == 1
                row = c.execute("SELECT * FROM sessions WHERE resolution_key=?",
                                (resolution,)).fetchone()
                if created:
                    place()
                    placed = True
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                if placed:
                    unplace()
                raise
        return _session(row), created

    def adopt_folder(self, agent_group_id: str, session_id: str) -> tuple[SessionRow, bool]:
        """Register a session folder found on disk (made by someone else), by its id.

        Selected by id, not by key: the folder may be a session another process is
        committing right now under its own key, and then that row is the one.
        """
        now = format_ts(utcnow())
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO agent_groups (id, name, created_at) VALUES (?,?,?)",
                      (agent_group_id, agent_group_id, now))
            created = c.execute(
                "INSERT OR IGNORE INTO sessions (id, agent_group_id, resolution_key, created_at)"
                " VALUES (?,?,?,?)", (session_id, agent_group_id,
                                      f"folder:{agent_group_id}/{session_id}", now)).rowcount == 1
            row = c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        return _session(row), created

    def routes(self) -> dict[str, tuple[str | None, str | None, str | None]]:
        """Each session's chat: (channel_type, platform_id, thread_id), for ``status``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT s.id, m.channel_type, m.platform_id, s.thread_id FROM sessions s"
                " LEFT JOIN messaging_groups m ON m.id = s.messaging_group_id").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM sessions WHERE id=?",
                                     (session_id,)).fetchone()
        return _session(row) if row else None

    def session_index(self) -> list[tuple[str, str, str]]:
        """(id, agent_group_id, container_status) of every session, unparsed: the
        reconcile sweep calls this for 1000s of sessions and needs nothing more."""
        with self._lock:
            return self._conn.execute(
                "SELECT id, agent_group_id, container_status FROM sessions").fetchall()

    def data_version(self) -> int:
        """SQLite's ``data_version``: it moves when another connection (another process:
        ``send``, ``sessions restore``) commits, never for this one's own commits."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def sessions(self) -> list[SessionRow]:
        with self._lock:
            return [_session(r) for r in self._conn.execute(
                "SELECT * FROM sessions ORDER BY agent_group_id, created_at, id")]

    def set_container_status(self, session_id: str, status: str, reason: str,
                             now: datetime | None = None) -> str | None:
        """Write the status and a status_changes row; returns the old status."""
        if status not in CONTAINER_STATUSES:
            raise ValueError(f"container status must be one of {CONTAINER_STATUSES}")
        at = format_ts(now or utcnow())
        with self._tx() as c:
            row = c.execute("SELECT container_status FROM sessions WHERE id=?",
                            (session_id,)).fetchone()
            if row is None:
                return None  # unknown session: nothing to record
            old = row[0]
            c.execute("UPDATE sessions SET container_status=?, status_reason=? WHERE id=?",
                      (status, reason, session_id))
            c.execute("INSERT INTO status_changes (session_id, at, old, new, reason)"
                      " VALUES (?,?,?,?,?)", (session_id, at, old, status, reason))
        return old

    def set_queued(self, session_id: str, since: datetime | None) -> None:
        """Mark a session as waiting for an agent slot (admission), or not any more."""
        with self._tx() as c:
            c.execute("UPDATE sessions SET queued_since=? WHERE id=?",
                      (format_ts(since) if since else None, session_id))

    def clear_queued(self) -> None:
        """At start-up: the queue is derived again from the session folders."""
        with self._tx() as c:
            c.execute("UPDATE sessions SET queued_since=NULL WHERE queued_since IS NOT NULL")

    def touch(self, session_id: str, *, active: datetime | None = None,
              heartbeat: datetime | None = None) -> None:
        sets, args = [], []
        if active is not None:
            sets.append("last_active=?")
            args.append(format_ts(active))
        if heartbeat is not None:
            sets.append("last_heartbeat=?")
            args.append(format_ts(heartbeat))
        if sets:
            with self._tx() as c:
                c.execute(f"UPDATE sessions SET {', '.join(sets)} WHERE id=?", (*args, session_id))

    def touch_many(self, rows: list[tuple[str, datetime | None, datetime | None]]) -> None:
        """``touch`` of several sessions, ``(session_id, active, heartbeat)`` (None: that
        column kept), in one transaction: the worker's touches of a second."""
        args = [(format_ts(a) if a else None, format_ts(h) if h else None, sid)
                for sid, a, h in rows if a is not None or h is not None]
        if args:
            with self._tx() as c:
                c.executemany("UPDATE sessions SET last_active=COALESCE(?, last_active),"
                              " last_heartbeat=COALESCE(?, last_heartbeat) WHERE id=?", args)

    def status_changes(self, session_id: str) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(
                "SELECT at, old, new, reason FROM status_changes WHERE session_id=? ORDER BY id",
                (session_id,))]

    # --- manual destinations (``orchestrator group destinations``) ------------------
    # Their own table: automatic ones (per chat) live elsewhere; both are merged when
    # a wake projects them into inbound.db (``Sessions.write_routing``).

    def add_manual_destination(self, agent_group_id: str, row: dict) -> bool:
        """Insert; False if the group already has a destination of that name."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO manual_destinations (agent_group_id, name, display_name,"
                " type, channel_type, platform_id, target_agent_group_id, created_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (agent_group_id, row["name"], row.get("display_name"), row["type"],
                 row.get("channel_type"), row.get("platform_id"), row.get("agent_group_id"),
                 format_ts(utcnow())))
        return cur.rowcount == 1

    def remove_manual_destination(self, agent_group_id: str, name: str) -> bool:
        with self._tx() as c:
            cur = c.execute("DELETE FROM manual_destinations WHERE agent_group_id=? AND name=?",
                            (agent_group_id, name))
        return cur.rowcount == 1

    def manual_destinations(self, agent_group_id: str) -> list[dict]:
        """Same keys as ``destinations``."""
        with self._lock:
            return [dict(r) for r in self._conn.execute(
                "SELECT agent_group_id, name, display_name, type, channel_type, platform_id,"
                " target_agent_group_id FROM manual_destinations WHERE agent_group_id=?"
                " ORDER BY name", (agent_group_id,))]
