"""Host-side reads of a session's outbound.db (the agent is its only writer).

Opened read-only (URI ``mode=ro``) per read. A missing file means "the agent
has written nothing yet"; a file that is not an outbound DB (corrupt, foreign,
half-copied) raises OutboundError with one line naming the file and the fix, so
the supervisor can log it and carry on with the other sessions.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from orchestrator.store import schema


class OutboundError(RuntimeError):
    """outbound.db exists but cannot be read as the contract's outbound DB."""


@dataclass(frozen=True, slots=True)
class Ack:
    message_id: str
    status: str
    status_changed: datetime | None


@dataclass(frozen=True, slots=True)
class OutMessage:
    id: str
    seq: int
    in_reply_to: str | None
    timestamp: str
    deliver_after: datetime | None
    kind: str
    platform_id: str | None
    channel_type: str | None
    thread_id: str | None
    content: str


@dataclass(frozen=True, slots=True)
class ToolState:
    """What the agent declared about the tool it is running (widens stuck windows)."""

    current_tool: str | None
    declared_timeout: float | None  # seconds
    started_at: datetime | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the host needs from outbound.db in one read."""

    acks: dict[str, Ack]
    messages: list[OutMessage]  # seq > the caller's watermark, ascending
    tool: ToolState | None


def _describe(path: Path, exc: Exception) -> OutboundError:
    return OutboundError(
        f"{path}: not a readable outbound.db ({exc}); the agent must recreate it — "
        "stop the agent, move the file aside, and it will be recreated on the next start"
    )


def _connect(path: Path) -> Iterator[sqlite3.Connection] | None:
    if not path.is_file():
        return None
    return schema.opened(path, readonly=True)


def _parse(value: str | None) -> datetime | None:
    try:
        return schema.parse_ts(value)
    except ValueError:
        return None


def read(path: Path, after_seq: int = 0, acks_since: str | None = None) -> Snapshot:
    """Acks, messages with ``seq > after_seq`` and tool state, in one read transaction.

    With ``acks_since`` (the newest ``status_changed`` seen before), only acks still
    ``processing`` or changed since then are returned: a pass costs what changed,
    not the session's whole history. The boundary tick is re-read (``>=``) because
    agents may stamp whole seconds.
    """
    ctx = _connect(path)
    if ctx is None:
        return Snapshot({}, [], None)
    ack_sql = "SELECT message_id, status, status_changed FROM processing_ack"
    ack_args: tuple = ()
    if acks_since is not None:
        ack_sql += (" WHERE status = 'processing' OR"
                    " julianday(status_changed) >= julianday(?)")
        ack_args = (acks_since,)
    try:
        with ctx as conn:
            conn.execute("BEGIN")
            acks = {r[0]: Ack(r[0], r[1], _parse(r[2]))
                    for r in conn.execute(ack_sql, ack_args)}
            messages = [
                OutMessage(r["id"], r["seq"], r["in_reply_to"], r["timestamp"],
                           _parse(r["deliver_after"]), r["kind"], r["platform_id"],
                           r["channel_type"], r["thread_id"], r["content"])
                for r in conn.execute(
                    "SELECT id, seq, in_reply_to, timestamp, deliver_after, kind, platform_id,"
                    " channel_type, thread_id, content FROM messages_out WHERE seq > ?"
                    " ORDER BY seq", (after_seq,))
            ]
            tool = None
            try:
                row = conn.execute(
                    "SELECT current_tool, tool_declared_timeout_ms, tool_started_at"
                    " FROM container_state WHERE id=1").fetchone()
            except sqlite3.OperationalError:
                row = None  # older agents have no container_state table: not an error
            if row is not None:
                ms = row[1]
                tool = ToolState(row[0], ms / 1000.0 if ms else None, _parse(row[2]))
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise _describe(path, exc) from None
    return Snapshot(acks, messages, tool)


def processing_ids(path: Path) -> list[str]:
    """Messages the agent has claimed and not finished."""
    return [a.message_id for a in read(path, after_seq=2**62).acks.values()
            if a.status == "processing"]


def max_seq(path: Path) -> int:
    ctx = _connect(path)
    if ctx is None:
        return 0
    try:
        with ctx as conn:
            (m,) = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
    except sqlite3.DatabaseError as exc:
        raise _describe(path, exc) from None
    return m or 0


def clear_processing_claims(path: Path) -> int:
    """Delete leftover ``processing`` acks. Only when NO agent runs for the session
    (one writer per file); the reference agent does this itself at start too."""
    if not path.is_file():
        return 0
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            return conn.execute("DELETE FROM processing_ack WHERE status='processing'").rowcount
    except sqlite3.DatabaseError as exc:
        raise _describe(path, exc) from None


def clear_acks(path: Path, ids: list[str]) -> int:
    """Delete the acks of messages given back for a retry (any status), so the next
    agent takes them up again. Only when NO agent runs for the session."""
    if not ids or not path.is_file():
        return 0
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            return sum(conn.execute("DELETE FROM processing_ack WHERE message_id=?",
                                    (mid,)).rowcount for mid in ids)
    except sqlite3.DatabaseError as exc:
        raise _describe(path, exc) from None


def clear_tool_state(path: Path) -> None:
    """Forget a dead agent's ``container_state.current_tool`` before the next start:
    a tool left "running" by a killed agent must not keep its successor busy.
    Only when NO agent runs for the session."""
    if not path.is_file():
        return
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            conn.execute("UPDATE container_state SET current_tool=NULL,"
                         " tool_declared_timeout_ms=NULL, tool_started_at=NULL")
    except sqlite3.DatabaseError as exc:
        raise _describe(path, exc) from None
