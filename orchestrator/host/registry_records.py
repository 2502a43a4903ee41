"""What the registry keeps about each session beside its row: a mixin of ``Registry``.

The session rows (``registry.py``) say which sessions exist, where they route and
their container status; these tables are records the engine writes about a session
as it runs and reads back after a restart: its saved start-up state, the delivery
attempts of its replies, the settings and image its agent was started with, what
each agent run used, and its recurring series. They are separate from the rows'
code because each is a small table of its own with its own readers (delivery,
status, retention, ``series``), and none decides whether a session exists.

A mixin with no state of its own: ``Registry.__init__`` makes ``_conn`` and
``_lock``, and ``Registry._tx`` is the transaction these methods run in.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING

from orchestrator.contract.schema import format_ts, parse_ts, utcnow


class SessionRecordsMixin:
    # Registry's, used here (see registry.py)
    _conn: sqlite3.Connection
    _lock: threading.RLock

    if TYPE_CHECKING:
        def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...

    # --- start-up states (``orchestrator.engine.startup_state``) ----------------------

    def saved_states(self) -> dict[str, str]:
        """session id → the start-up state saved after its last settled pass
        (``orchestrator.engine.startup_state``)."""
        with self._lock:
            return dict(self._conn.execute("SELECT session_id, state FROM session_state"))

    def save_states(self, rows: dict[str, str | None]) -> None:
        """Many sessions' start-up states in one transaction (None removes the row)."""
        now = format_ts(utcnow())
        with self._tx() as c:
            c.executemany("DELETE FROM session_state WHERE session_id=?",
                          [(sid,) for sid, text in rows.items() if text is None])
            c.executemany("INSERT OR REPLACE INTO session_state (session_id, state, saved_at)"
                          " VALUES (?,?,?)",
                          [(sid, text, now) for sid, text in rows.items() if text is not None])


    # --- delivery attempts --------------------------------------------------------

    def delivery_attempt(self, session_id: str, out_id: str) -> tuple[int, datetime | None]:
        with self._lock:
            row = self._conn.execute(
                "SELECT attempts, next_attempt_at FROM delivery_attempts WHERE session_id=? AND"
                " message_out_id=?", (session_id, out_id)).fetchone()
        return (row[0], parse_ts(row[1])) if row else (0, None)

    def delivery_attempts(self, session_id: str) -> dict[str, tuple[int, datetime | None]]:
        """Every reply of the session with failed attempts (usually none): one query per
        pass instead of one per reply."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT message_out_id, attempts, next_attempt_at FROM delivery_attempts"
                " WHERE session_id=?", (session_id,)).fetchall()
        return {r[0]: (r[1], parse_ts(r[2])) for r in rows}

    def record_attempt_failure(self, session_id: str, out_id: str, attempts: int,
                               next_at: datetime | None, error: str) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO delivery_attempts (session_id, message_out_id, attempts,"
                " next_attempt_at, last_error) VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " attempts=excluded.attempts, next_attempt_at=excluded.next_attempt_at,"
                " last_error=excluded.last_error",
                (session_id, out_id, attempts, format_ts(next_at) if next_at else None, error))

    def clear_attempts(self, session_id: str, out_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM delivery_attempts WHERE session_id=? AND message_out_id=?",
                      (session_id, out_id))

    # --- which settings an agent was started with -----------------------------------

    def record_agent_settings(self, session_id: str, agent_group_id: str, digest: str,
                              image: str | None, now: datetime | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO agent_settings (session_id, agent_group_id, digest, image,"
                      " started_at) VALUES (?,?,?,?,?) ON CONFLICT(session_id) DO UPDATE SET"
                      " agent_group_id=excluded.agent_group_id, digest=excluded.digest,"
                      " image=excluded.image, started_at=excluded.started_at",
                      (session_id, agent_group_id, digest, image, format_ts(now or utcnow())))

    def agent_settings(self) -> dict[str, dict]:
        """session id → {digest, image, started_at} of its last started agent."""
        try:
            with self._lock:
                return {r["session_id"]: dict(r) for r in self._conn.execute(
                    "SELECT session_id, digest, image, started_at FROM agent_settings")}
        except sqlite3.OperationalError as exc:  # a read-only open of an older registry
            if "no such table" in str(exc):
                return {}
            raise

    # --- what each agent run used (issue 26.4) -----------------------------------------

    def record_run(self, session_id: str, agent_group_id: str, started_at: datetime | None,
                   ended_at: datetime, exit_reason: str, cpu_seconds: float | None,
                   peak_memory_bytes: int | None, wall_seconds: float | None = None) -> None:
        """``wall_seconds``: the runtime's own (a container's start to end), else from
        ``started_at`` to ``ended_at``."""
        wall = wall_seconds if wall_seconds is not None else (
            (ended_at - started_at).total_seconds() if started_at else None)
        with self._tx() as c:
            c.execute("INSERT INTO agent_runs (session_id, agent_group_id, started_at,"
                      " ended_at, wall_seconds, cpu_seconds, peak_memory_bytes, exit_reason)"
                      " VALUES (?,?,?,?,?,?,?,?)",
                      (session_id, agent_group_id, format_ts(started_at) if started_at
                       else None, format_ts(ended_at), wall, cpu_seconds, peak_memory_bytes,
                       exit_reason))

    def run_usage(self) -> dict[str, dict]:
        """session id → its last run (``last_*``) and its totals over every run."""
        try:
            with self._lock:
                totals = self._conn.execute(
                    "SELECT session_id, COUNT(*), SUM(wall_seconds), SUM(cpu_seconds),"
                    " MAX(peak_memory_bytes), MAX(id) FROM agent_runs GROUP BY session_id"
                ).fetchall()
                last = {r["id"]: r for r in self._conn.execute(
                    "SELECT * FROM agent_runs WHERE id IN (SELECT MAX(id) FROM agent_runs"
                    " GROUP BY session_id)")}
        except sqlite3.OperationalError as exc:  # a read-only open of an older registry
            if "no such table" in str(exc):
                return {}
            raise
        out = {}
        for sid, runs, wall, cpu, peak, last_id in totals:
            row = last[last_id]
            out[sid] = {"runs": runs, "wall_seconds": wall, "cpu_seconds": cpu,
                        "peak_memory_bytes": peak, "last_run": {
                            "started_at": row["started_at"], "ended_at": row["ended_at"],
                            "wall_seconds": row["wall_seconds"],
                            "cpu_seconds": row["cpu_seconds"],
                            "peak_memory_bytes": row["peak_memory_bytes"],
                            "exit_reason": row["exit_reason"]}}
        return out

    # --- recurring series -------------------------------------------------------------

    def add_series(self, series_id: str, session_id: str, agent_group_id: str,
                   recurrence: str, timezone: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO series (id, session_id, agent_group_id, recurrence, timezone,"
                      " created_at) VALUES (?,?,?,?,?,?)",
                      (series_id, session_id, agent_group_id, recurrence, timezone,
                       format_ts(utcnow())))

    def series(self, series_id: str | None = None) -> list[dict]:
        sql = "SELECT * FROM series"
        args: tuple = ()
        if series_id is not None:
            sql, args = sql + " WHERE id=?", (series_id,)
        try:
            with self._lock:
                return [dict(r) for r in self._conn.execute(sql + " ORDER BY created_at, id",
                                                            args)]
        except sqlite3.OperationalError as exc:  # a read-only open of an older registry
            if "no such table" in str(exc):
                return []
            raise

    def cancel_series(self, series_id: str, now: datetime | None = None) -> None:
        with self._tx() as c:
            c.execute("UPDATE series SET cancelled_at=? WHERE id=? AND cancelled_at IS NULL",
                      (format_ts(now or utcnow()), series_id))
