"""Host-side reads of a session's outbound.db (the agent is its only writer).

Opened read-only (URI ``mode=ro``); a pass's read may use a connection kept open
between passes (``host.kept_dbs``). A missing file means "the agent
has written nothing yet"; a file that is not an outbound DB (corrupt, foreign,
half-copied) raises OutboundError with one line naming the file and the fix, so
the supervisor can log it and carry on with the other sessions.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from orchestrator.contract import schema
from orchestrator.host.safefs import SafeDb


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
    content: str  # "" when ``problem`` is set: the content was never loaded whole
    problem: str | None = None  # why this row can never be delivered (fails alone)


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
    rewound: bool = False  # the anchor row was gone: everything was read from seq 0


def _describe(path: Path | SafeDb, exc: Exception) -> OutboundError:
    return OutboundError(
        f"{path}: not a readable outbound.db ({exc}); the agent must recreate it — "
        "stop the agent, move the file aside, and it will be recreated on the next start"
    )


DEFAULT_MAX_CONTENT = 1 << 20


def _connect(path: Path | SafeDb) -> AbstractContextManager[sqlite3.Connection] | None:
    if not _exists(path):
        return None
    return schema.opened(path, readonly=True)


def _text(value: object) -> str | None:
    """A column read as bytes (every byte is the agent's): text, never a decode error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _content(conn: sqlite3.Connection, rowid: int, limit: int) -> tuple[str, str | None]:
    """(content, problem), reading the value through SQLite's blob API: its size is
    known before a byte is loaded, so a 500 MB row costs nothing but its refusal."""
    try:
        blob = conn.blobopen("messages_out", "content", rowid, readonly=True)
    except sqlite3.OperationalError as exc:
        if schema.is_busy(exc):
            raise
        return "", f"content is not text ({exc})"
    with blob:
        size = len(blob)
        if size > limit:
            return "", (f"content is {size} bytes, over [delivery] max_content_bytes "
                        f"({limit})")
        raw = blob.read()
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", f"content is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def _message(conn: sqlite3.Connection, row: tuple, limit: int) -> OutMessage:
    rowid, raw_id, seq = row[0], row[1], row[2]
    problem = None
    try:
        mid = raw_id.decode("utf-8") if isinstance(raw_id, bytes) else str(raw_id)
    except UnicodeDecodeError:
        mid, problem = _text(raw_id) or "", "id is not valid UTF-8"
    if not isinstance(seq, int):
        seq, problem = 0, problem or f"seq {_text(seq)!r} is not an integer"
    content = ""
    if problem is None:
        content, problem = _content(conn, rowid, limit)
    return OutMessage(mid, seq, _text(row[3]), _text(row[4]) or "", _parse(_text(row[5])),
                      _text(row[6]) or "", _text(row[7]), _text(row[8]), _text(row[9]),
                      content, problem)


def _parse(value: str | None) -> datetime | None:
    try:
        return schema.parse_ts(value)
    except ValueError:
        return None


def read(path: Path | SafeDb, after_seq: int = 0, acks_since: str | None = None,
         max_content_bytes: int = DEFAULT_MAX_CONTENT, anchor: str | None = None) -> Snapshot:
    """Acks, messages with ``seq > after_seq`` and tool state, in one read transaction.

    With ``acks_since`` (the newest ``status_changed`` seen before), only acks still
    ``processing`` or changed since then are returned: a pass costs what changed,
    not the session's whole history. The boundary tick is re-read (``>=``) because
    agents may stamp whole seconds.

    Every column is read as bytes and decoded here, and ``content`` through the blob
    API with a size limit: a row that is not UTF-8 or too big comes back with its
    ``problem`` instead of failing the whole read. A locked file raises the
    ``sqlite3.OperationalError`` that ``schema.is_busy`` recognises (open ``path``
    with a zero busy timeout and it never waits).

    ``anchor`` is the id of the row at ``after_seq``. If that row is not there any
    more, the file was replaced or rewritten (an inode number alone cannot tell:
    a file deleted and created again often gets the same one), so everything is
    read from seq 0 and every ack, and the snapshot says ``rewound``.
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
            conn.text_factory = bytes
            conn.execute("BEGIN")
            rewound = False
            if anchor is not None and after_seq > 0:
                row = conn.execute("SELECT id FROM messages_out WHERE seq = ?",
                                   (after_seq,)).fetchone()
                if row is None or _text(row[0]) != anchor:
                    rewound, after_seq, ack_sql, ack_args = True, 0, ack_sql.split(" WHERE")[0], ()
            acks = {}
            for r in conn.execute(ack_sql, ack_args):
                mid = _text(r[0]) or ""
                acks[mid] = Ack(mid, _text(r[1]) or "", _parse(_text(r[2])))
            rows = conn.execute(
                "SELECT rowid, id, seq, in_reply_to, timestamp, deliver_after, kind,"
                " platform_id, channel_type, thread_id FROM messages_out WHERE seq > ?"
                " ORDER BY seq", (after_seq,)).fetchall()
            messages = [_message(conn, r, max_content_bytes) for r in rows]
            tool = None
            try:
                row = conn.execute(
                    # bounded: the agent writes these, and only a name and a time matter
                    "SELECT substr(current_tool, 1, 200), tool_declared_timeout_ms,"
                    " substr(tool_started_at, 1, 64) FROM container_state WHERE id=1"
                    ).fetchone()
            except sqlite3.OperationalError as exc:
                if schema.is_busy(exc):
                    raise
                row = None  # older agents have no container_state table: not an error
            if row is not None:
                ms = row[1] if isinstance(row[1], (int, float)) else None
                tool = ToolState(_text(row[0]), ms / 1000.0 if ms else None,
                                 _parse(_text(row[2])))
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None
    return Snapshot(acks, messages, tool, rewound)


def processing_ids(path: Path | SafeDb) -> list[str]:
    """Messages the agent has claimed and not finished (only those rows are read)."""
    ctx = _connect(path)
    if ctx is None:
        return []
    try:
        with ctx as conn:
            conn.text_factory = bytes
            rows = conn.execute("SELECT message_id FROM processing_ack"
                                " WHERE status = 'processing'").fetchall()
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None
    return [_text(r[0]) or "" for r in rows]


def max_seq(path: Path) -> int:
    ctx = _connect(path)
    if ctx is None:
        return 0
    try:
        with ctx as conn:
            (m,) = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None
    return m or 0


def clear_processing_claims(path: Path | SafeDb) -> int:
    """Delete leftover ``processing`` acks. Only when NO agent runs for the session
    (one writer per file); the reference agent does this itself at start too."""
    if not _exists(path):
        return 0
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            return conn.execute("DELETE FROM processing_ack WHERE status='processing'").rowcount
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None


def clear_acks(path: Path | SafeDb, ids: list[str]) -> int:
    """Delete the acks of messages given back for a retry (any status), so the next
    agent takes them up again. Only when NO agent runs for the session."""
    if not ids or not _exists(path):
        return 0
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            return sum(conn.execute("DELETE FROM processing_ack WHERE message_id=?",
                                    (mid,)).rowcount for mid in ids)
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None


def clear_tool_state(path: Path | SafeDb) -> None:
    """Forget a dead agent's ``container_state.current_tool`` before the next start:
    a tool left "running" by a killed agent must not keep its successor busy.
    Only when NO agent runs for the session."""
    if not _exists(path):
        return
    try:
        with schema.opened(path) as conn, schema.transaction(conn):
            conn.execute("UPDATE container_state SET current_tool=NULL,"
                         " tool_declared_timeout_ms=NULL, tool_started_at=NULL")
    except sqlite3.DatabaseError as exc:
        if schema.is_busy(exc):
            raise
        raise _describe(path, exc) from None


def _exists(path: Path | SafeDb) -> bool:
    """A plain path, or the supervisor's ``safefs.SafeDb`` (lstat: never a link's target)."""
    return path.exists() if isinstance(path, SafeDb) else path.is_file()
