"""The event log behind ``GET /v1/events``: durable, numbered, replayable.

Every status change and every delivered or failed reply (and failed message) gets
a row in ``<data_dir>/events.db`` with an AUTOINCREMENT id, so ids only grow, across
restarts too, and a client that reconnects with ``Last-Event-ID`` is sent every row
after it before the live ones. The log keeps the newest ``keep`` events and at most
``keep_seconds`` of them; a client further behind than that is told so (a ``gap``
event) instead of silently missing events.

Live delivery is a bounded queue per subscriber: a client that falls more than
``QUEUE_MAX`` events behind is disconnected (it reconnects and replays from the log)
rather than letting one slow reader hold memory or slow the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from orchestrator.contract.schema import format_ts
from orchestrator.host.private import make_dirs, private_file
from orchestrator.host.schema_version import Migration, migrate, script

QUEUE_MAX = 10_000
PRUNE_EVERY = 1000

DDL = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL);
"""

# the event store's schema versions (host.schema_version): append only
MIGRATIONS: tuple[Migration, ...] = (script(DDL),)  # 1: the events table
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: str
    kind: str
    data: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The event as its ``data`` line (and ``/v1/events`` as JSON) shows it."""
        return {"id": self.id, "at": self.at, "kind": self.kind, **self.data}

    def sse(self) -> str:
        """One Server-Sent Events message (``data`` is a single JSON line)."""
        payload = json.dumps(self.record(), ensure_ascii=False, separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n"


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_MAX)
        self.dropped = False


class EventStore:
    def __init__(self, path: Path, *, keep: int = 100_000, keep_seconds: float = 86400.0) -> None:
        try:
            self._conn = self._open(path)
        except (sqlite3.Error, OSError) as exc:  # e.g. a full disk: serve, but say so
            logger.warning("event log {}: cannot open ({}); events are kept in memory "
                           "until the next start", path, exc)
            self._conn = self._open(None)
        self.keep = keep
        self.keep_seconds = keep_seconds
        self._subs: set[Subscription] = set()
        self._appended = 0
        self.prune()

    @staticmethod
    def _open(path: Path | None) -> sqlite3.Connection:
        if path is not None:
            make_dirs(path.parent)
            if not path.exists():
                private_file(path)  # 0600 whatever the umask; its -wal/-shm follow it
        conn = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, path or ":memory:", MIGRATIONS)  # newer: SchemaTooNew, refused
        except BaseException:
            conn.close()
            raise
        return conn

    # --- writing ------------------------------------------------------------------------

    def append(self, kind: str, data: dict[str, Any]) -> Event:
        at = format_ts(datetime.now(timezone.utc))
        cur = self._conn.execute("INSERT INTO events (at, kind, data) VALUES (?,?,?)",
                                 (at, kind, json.dumps(data, ensure_ascii=False)))
        if cur.lastrowid is None:  # an INSERT always sets it; say so if it ever does not
            raise sqlite3.DatabaseError("event log: the insert returned no row id")
        event = Event(cur.lastrowid, at, kind, data)
        for sub in list(self._subs):
            if sub.dropped:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:  # too far behind: it reconnects and replays
                sub.dropped = True
        self._appended += 1
        if self._appended % PRUNE_EVERY == 0:
            self.prune()
        return event

    def prune(self) -> None:
        cutoff = format_ts(datetime.now(timezone.utc) - timedelta(seconds=self.keep_seconds))
        self._conn.execute("DELETE FROM events WHERE at < ? OR id <= "
                           "(SELECT COALESCE(MAX(id), 0) FROM events) - ?", (cutoff, self.keep))

    def forget_sessions(self, session_ids: list[str], chunk: int = 5000) -> int:
        """Retention removed these sessions: their events go too. Called in a worker
        thread, a ``chunk`` of ids at a time (each a few ms on the shared connection), so
        the loop's appends wait at most one chunk. Returns how many went."""
        if not session_ids:
            return 0
        marks = ",".join("?" * len(session_ids))
        low, high = self._conn.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
        removed = 0
        for start in range(low or 0, (high or -1) + 1, chunk):
            cur = self._conn.execute(
                f"DELETE FROM events WHERE id >= ? AND id < ? AND"
                f" json_extract(data, '$.session_id') IN ({marks})",
                (start, start + chunk, *session_ids))
            removed += cur.rowcount
        return removed

    # --- reading ------------------------------------------------------------------------

    def since(self, last_id: int, limit: int = 1000) -> list[Event]:
        rows = self._conn.execute(
            "SELECT id, at, kind, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, limit)).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def oldest_id(self) -> int | None:
        return self._conn.execute("SELECT MIN(id) FROM events").fetchone()[0]

    def last_id(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        return row[0] if row else 0

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def close(self) -> None:
        self.end_streams()
        self._conn.close()

    def end_streams(self) -> None:
        for sub in list(self._subs):  # ends every open stream
            sub.dropped = True
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
        self._subs.clear()


def gap_after(last_id: int, oldest: int | None) -> bool:
    """Whether events after ``last_id`` were pruned before the client came back."""
    return oldest is not None and last_id + 1 < oldest
