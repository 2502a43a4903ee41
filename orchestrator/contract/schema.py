"""The two per-session SQLite schemas, exactly as the session-folder contract.

Both sides of the contract use this module: the host (``store.inbound``,
``store.outbound``) and the reference agent, which runs in a container with
nothing but python3 — so it is stdlib-only.

Invariants carried here (see docs/contract.md §2):
- ``journal_mode=DELETE`` on both files, never WAL: WAL's mmapped ``-shm`` does
  not refresh across a bind mount.
- ``CREATE TABLE IF NOT EXISTS`` and additive upgrades only: an older folder gets
  its missing columns added (nullable or defaulted), never a destructive migration.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

TYPE_CHECKING = False  # the agent's cold start loads neither typing nor pathlib
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Callable, Iterator, Protocol, TypeAlias

    class Opener(Protocol):
        """A database file that opens itself (the host's ``safefs.SafeDb``)."""

        def connect(self, readonly: bool) -> sqlite3.Connection: ...

    DbFile: TypeAlias = "Path | str | Opener"  # what ``opened`` and the stores accept

BUSY_TIMEOUT_MS = 5000

# (table, [(column, declaration used by CREATE and by ALTER TABLE ADD COLUMN)], extra DDL)
INBOUND_TABLES: dict[str, list[tuple[str, str]]] = {
    "messages_in": [
        ("id", "TEXT PRIMARY KEY"),
        ("seq", "INTEGER UNIQUE"),
        ("kind", "TEXT NOT NULL"),
        ("timestamp", "TEXT NOT NULL"),
        ("status", "TEXT DEFAULT 'pending'"),
        ("process_after", "TEXT"),
        ("recurrence", "TEXT"),
        ("series_id", "TEXT"),
        ("tries", "INTEGER DEFAULT 0"),
        ('"trigger"', "INTEGER NOT NULL DEFAULT 1"),
        ("platform_id", "TEXT"),
        ("channel_type", "TEXT"),
        ("thread_id", "TEXT"),
        ("content", "TEXT NOT NULL"),
        ("source_session_id", "TEXT"),
        ("on_wake", "INTEGER NOT NULL DEFAULT 0"),
    ],
    "delivered": [
        ("message_out_id", "TEXT PRIMARY KEY"),
        ("platform_message_id", "TEXT"),
        ("status", "TEXT NOT NULL DEFAULT 'delivered'"),
        ("delivered_at", "TEXT NOT NULL"),
    ],
    "destinations": [
        ("name", "TEXT PRIMARY KEY"),
        ("display_name", "TEXT"),
        ("type", "TEXT NOT NULL"),
        ("channel_type", "TEXT"),
        ("platform_id", "TEXT"),
        ("agent_group_id", "TEXT"),
    ],
    "session_routing": [
        ("id", "INTEGER PRIMARY KEY CHECK (id = 1)"),
        ("channel_type", "TEXT"),
        ("platform_id", "TEXT"),
        ("thread_id", "TEXT"),
    ],
}
INBOUND_EXTRA = ["CREATE INDEX IF NOT EXISTS idx_messages_in_series ON messages_in(series_id)"]

OUTBOUND_TABLES: dict[str, list[tuple[str, str]]] = {
    "messages_out": [
        ("id", "TEXT PRIMARY KEY"),
        ("seq", "INTEGER UNIQUE"),
        ("in_reply_to", "TEXT"),
        ("timestamp", "TEXT NOT NULL"),
        ("deliver_after", "TEXT"),
        ("recurrence", "TEXT"),
        ("kind", "TEXT NOT NULL"),
        ("platform_id", "TEXT"),
        ("channel_type", "TEXT"),
        ("thread_id", "TEXT"),
        ("content", "TEXT NOT NULL"),
    ],
    "processing_ack": [
        ("message_id", "TEXT PRIMARY KEY"),
        ("status", "TEXT NOT NULL"),
        ("status_changed", "TEXT NOT NULL"),
    ],
    "session_state": [
        ("key", "TEXT PRIMARY KEY"),
        ("value", "TEXT NOT NULL"),
        ("updated_at", "TEXT NOT NULL"),
    ],
    "container_state": [
        ("id", "INTEGER PRIMARY KEY CHECK (id = 1)"),
        ("current_tool", "TEXT"),
        ("tool_declared_timeout_ms", "INTEGER"),
        ("tool_started_at", "TEXT"),
        ("updated_at", "TEXT NOT NULL"),
    ],
}
OUTBOUND_EXTRA: list[str] = []


def _column_name(col: str) -> str:
    return col.strip('"')


def _add_column_decl(decl: str) -> str | None:
    """The declaration usable in ALTER TABLE ADD COLUMN, or None if it cannot be added.

    SQLite refuses PRIMARY KEY / UNIQUE columns in ALTER TABLE; NOT NULL needs a
    default. Such columns are part of every shape of the table that ever existed.
    """
    upper = decl.upper()
    if "PRIMARY KEY" in upper or "UNIQUE" in upper:
        return None
    if "NOT NULL" in upper and "DEFAULT" not in upper:
        return None
    return decl


def ensure_schema(
    conn: sqlite3.Connection, tables: dict[str, list[tuple[str, str]]], extra: list[str]
) -> list[str]:
    """Create missing tables and add missing columns; return the columns added."""
    added: list[str] = []
    for table, columns in tables.items():
        cols = ", ".join(f"{name} {decl}" for name, decl in columns)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns:
            if _column_name(name) in present:
                continue
            add = _add_column_decl(decl)
            if add is None:
                raise sqlite3.DatabaseError(
                    f"table {table} lacks required column {_column_name(name)}"
                )
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {add}")
            added.append(f"{table}.{_column_name(name)}")
    for ddl in extra:
        conn.execute(ddl)
    return added


_URI_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


def file_uri(abs_path: str) -> str:
    """``file:`` URI of an absolute path, as ``Path.as_uri()`` writes it but without
    importing pathlib (and urllib.parse, ipaddress behind it) on the agent's start."""
    return "file://" + "".join(chr(b) if b in _URI_SAFE else f"%{b:02X}"
                               for b in os.fsencode(abs_path))


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a session DB the way the contract requires.

    Read-only opens use the URI ``mode=ro`` so a reader can never become a
    second writer. Autocommit mode: transactions are explicit (``BEGIN IMMEDIATE``).
    A symlink in place of a DB is refused: SQLite would follow it out of the folder.
    """
    if os.path.islink(path):
        raise sqlite3.DatabaseError(f"{path} is a symlink; refusing to follow it out of the "
                                    "session folder (replace it with the real file)")
    # ``timeout`` is SQLite's busy timeout (sqlite3_busy_timeout): no PRAGMA needed.
    if readonly:
        # abspath, not resolve(): a URI needs an absolute path, not one with every
        # component lstat'ed (a third of a start-up pass at 1000 sessions)
        uri = file_uri(os.path.abspath(path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def opened(path: DbFile, *, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    """Open, use, and always close: no long-lived handles on a shared file.

    ``path`` may also be an object with ``connect(readonly)`` (the host's
    ``safefs.SafeDb``: a file in a session folder, opened without following links),
    and then with ``release(conn, failed)`` instead of the close: the host keeps the
    connections of its busiest sessions open between passes (``host.kept_dbs``), and
    drops one that failed.
    """
    opener = getattr(path, "connect", None)
    release: Callable[[sqlite3.Connection, bool], None] | None = None
    if opener is not None:
        conn = opener(readonly)
        release = getattr(path, "release", None)
    else:  # no connect(): a plain path (mypy cannot narrow the union by getattr)
        conn = connect(path, readonly=readonly)  # type: ignore[arg-type]
    try:
        yield conn
    except BaseException:
        if release is None:
            conn.close()
        else:
            release(conn, True)
        raise
    if release is None:
        conn.close()
    else:
        release(conn, False)


def is_busy(exc: BaseException) -> bool:
    """SQLite said "locked" (another connection holds a lock; try again shortly), or
    a read-only reader met a hot journal it may not roll back (the writer's next
    open does): both pass by themselves, neither means the file is unreadable."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    return code & 0xFF in (5, 6) or code == 776  # BUSY, LOCKED, READONLY_ROLLBACK


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL does): a second ROLLBACK
        # would raise "no transaction is active" and hide the real error
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init_inbound(path: DbFile) -> list[str]:
    with opened(path) as conn, transaction(conn):
        return ensure_schema(conn, INBOUND_TABLES, INBOUND_EXTRA)


def init_outbound(path: DbFile) -> list[str]:
    with opened(path) as conn, transaction(conn):
        return ensure_schema(conn, OUTBOUND_TABLES, OUTBOUND_EXTRA)


# --- timestamps -------------------------------------------------------------

TS_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def format_ts(when: datetime) -> str:
    """UTC, SQLite's own shape (``YYYY-MM-DD HH:MM:SS.mmm``), so that SQL string
    and ``julianday()`` comparisons against ``datetime('now')`` agree."""
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.strftime(TS_FORMAT)[:-3]


DUE_FORMAT = "%Y-%m-%d %H:%M:%S"


def ceil_second(when: datetime) -> datetime:
    """Round up to the whole second (a due time is never moved earlier)."""
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when


def format_due(when: datetime) -> str:
    """A due time (``process_after``) in whole seconds, rounded UP: ``YYYY-MM-DD HH:MM:SS``.

    NanoClaw's runner compares ``datetime(process_after) <= datetime('now')``, which
    drops fractions of a second; ours compares exact instants. In whole seconds,
    rounded up, both agree to the second and neither takes a message early. The
    one implementation: ``scheduling`` re-exports it.
    """
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return ceil_second(when).strftime(DUE_FORMAT)


def parse_ts(value: str | None) -> datetime | None:
    """Parse a contract timestamp as an aware UTC datetime.

    Accepts SQLite's ``datetime('now')`` (no zone: it IS UTC, never local time),
    ISO-8601 with ``T``, fractional seconds and a ``Z``/offset suffix. Anything
    else raises ValueError (an offset that moves it past year 9999 or before year 1
    too: agents write these, and callers catch ValueError only).
    """
    if value is None or value == "":
        return None
    text = value.strip().replace("T", " ")
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1]
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    try:
        return dt.astimezone(timezone.utc)
    except OverflowError:  # '9999-12-31T23:59:59-05:00' is past datetime.max in UTC
        raise ValueError(f"{value!r}: out of range in UTC") from None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def now_ts() -> str:
    return format_ts(utcnow())


def after(seconds: float, now: datetime | None = None) -> str:
    """A due time ``seconds`` from now, in ``format_due``'s whole-second shape."""
    return format_due((now or utcnow()) + timedelta(seconds=seconds))
