"""schema: the two session DBs match the contract exactly, on real SQLite files.

The expected columns are written out here by hand from docs/contract.md (not
copied from schema.py), so a drift on either side fails this test.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.contract import schema
from tests.support.helpers import journal_mode, table_columns, tables

# (name, declared type, notnull, default, pk) per column, from the contract
CONTRACT_INBOUND = {
    "messages_in": [
        ("id", "TEXT", 0, None, 1), ("seq", "INTEGER", 0, None, 0),
        ("kind", "TEXT", 1, None, 0), ("timestamp", "TEXT", 1, None, 0),
        ("status", "TEXT", 0, "'pending'", 0), ("process_after", "TEXT", 0, None, 0),
        ("recurrence", "TEXT", 0, None, 0), ("series_id", "TEXT", 0, None, 0),
        ("tries", "INTEGER", 0, "0", 0), ("trigger", "INTEGER", 1, "1", 0),
        ("platform_id", "TEXT", 0, None, 0), ("channel_type", "TEXT", 0, None, 0),
        ("thread_id", "TEXT", 0, None, 0), ("content", "TEXT", 1, None, 0),
        ("source_session_id", "TEXT", 0, None, 0), ("on_wake", "INTEGER", 1, "0", 0),
    ],
    "delivered": [
        ("message_out_id", "TEXT", 0, None, 1), ("platform_message_id", "TEXT", 0, None, 0),
        ("status", "TEXT", 1, "'delivered'", 0), ("delivered_at", "TEXT", 1, None, 0),
    ],
    "destinations": [
        ("name", "TEXT", 0, None, 1), ("display_name", "TEXT", 0, None, 0),
        ("type", "TEXT", 1, None, 0), ("channel_type", "TEXT", 0, None, 0),
        ("platform_id", "TEXT", 0, None, 0), ("agent_group_id", "TEXT", 0, None, 0),
    ],
    "session_routing": [
        ("id", "INTEGER", 0, None, 1), ("channel_type", "TEXT", 0, None, 0),
        ("platform_id", "TEXT", 0, None, 0), ("thread_id", "TEXT", 0, None, 0),
    ],
}
CONTRACT_OUTBOUND = {
    "messages_out": [
        ("id", "TEXT", 0, None, 1), ("seq", "INTEGER", 0, None, 0),
        ("in_reply_to", "TEXT", 0, None, 0), ("timestamp", "TEXT", 1, None, 0),
        ("deliver_after", "TEXT", 0, None, 0), ("recurrence", "TEXT", 0, None, 0),
        ("kind", "TEXT", 1, None, 0), ("platform_id", "TEXT", 0, None, 0),
        ("channel_type", "TEXT", 0, None, 0), ("thread_id", "TEXT", 0, None, 0),
        ("content", "TEXT", 1, None, 0),
    ],
    "processing_ack": [
        ("message_id", "TEXT", 0, None, 1), ("status", "TEXT", 1, None, 0),
        ("status_changed", "TEXT", 1, None, 0),
    ],
    "session_state": [
        ("key", "TEXT", 0, None, 1), ("value", "TEXT", 1, None, 0),
        ("updated_at", "TEXT", 1, None, 0),
    ],
    "container_state": [
        ("id", "INTEGER", 0, None, 1), ("current_tool", "TEXT", 0, None, 0),
        ("tool_declared_timeout_ms", "INTEGER", 0, None, 0), ("tool_started_at", "TEXT", 0, None, 0),
        ("updated_at", "TEXT", 1, None, 0),
    ],
}


@contextmanager
def _db(path):
    """A plain autocommit connection that is really closed afterwards."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _pragma_columns(path, table):
    with _db(path) as conn:
        return [(r[1], r[2], r[3], r[4], r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]


def _unique_columns(path, table):
    with _db(path) as conn:
        out = set()
        for idx in conn.execute(f"PRAGMA index_list({table})"):
            if idx[2]:  # unique
                cols = [r[2] for r in conn.execute(f"PRAGMA index_info({idx[1]})")]
                if len(cols) == 1:
                    out.add(cols[0])
        return out


@pytest.mark.parametrize("init, contract", [
    (schema.init_inbound, CONTRACT_INBOUND),
    (schema.init_outbound, CONTRACT_OUTBOUND),
], ids=["inbound", "outbound"])
def test_fresh_schema_is_exactly_the_contract(tmp_path, init, contract):
    db = tmp_path / "x.db"
    assert init(db) == []  # nothing "added": created whole
    assert tables(db) == set(contract)
    for table, columns in contract.items():
        assert _pragma_columns(db, table) == columns, table
    assert "seq" in _unique_columns(db, next(iter(contract)))
    assert journal_mode(db) == "delete"


def test_inbound_has_series_index(tmp_path):
    db = tmp_path / "inbound.db"
    schema.init_inbound(db)
    with _db(db) as conn:
        idx = {r[1]: r for r in conn.execute("PRAGMA index_list(messages_in)")}
        assert "idx_messages_in_series" in idx
        cols = [r[2] for r in conn.execute("PRAGMA index_info(idx_messages_in_series)")]
    assert cols == ["series_id"]


def test_singleton_tables_refuse_a_second_row(tmp_path):
    db = tmp_path / "inbound.db"
    schema.init_inbound(db)
    with _db(db) as conn:
        conn.execute("INSERT INTO session_routing (id) VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO session_routing (id) VALUES (2)")


def test_init_is_idempotent_and_keeps_rows(tmp_path):
    db = tmp_path / "inbound.db"
    schema.init_inbound(db)
    with _db(db) as conn:
        conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) "
                     "VALUES ('m', 2, 'chat', 't', '{}')")
    assert schema.init_inbound(db) == []
    assert schema.init_inbound(db) == []
    with _db(db) as conn:
        assert conn.execute("SELECT id, seq FROM messages_in").fetchall() == [("m", 2)]


def test_old_inbound_gets_missing_columns_added_rows_intact(tmp_path):
    db = tmp_path / "inbound.db"
    with _db(db) as conn:  # an older NanoClaw shape
        conn.execute("CREATE TABLE messages_in (id TEXT PRIMARY KEY, seq INTEGER UNIQUE, "
                     "kind TEXT NOT NULL, timestamp TEXT NOT NULL, status TEXT DEFAULT 'pending', "
                     "process_after TEXT, recurrence TEXT, tries INTEGER DEFAULT 0, "
                     "platform_id TEXT, channel_type TEXT, thread_id TEXT, content TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, status, content) VALUES "
                     "('old-1', 2, 'chat', '2024-01-01 00:00:00', 'completed', '{\"text\":\"a\"}')")
        conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES "
                     "('old-2', 4, 'chat', '2024-01-01 00:00:01', '{\"text\":\"b\"}')")
    added = schema.init_inbound(db)
    assert sorted(added) == ["messages_in.on_wake", "messages_in.series_id",
                             "messages_in.source_session_id", "messages_in.trigger"]
    assert set(table_columns(db, "messages_in")) == {c[0] for c in CONTRACT_INBOUND["messages_in"]}
    assert tables(db) == set(CONTRACT_INBOUND)  # missing tables created too
    with _db(db) as conn:
        rows = conn.execute('SELECT id, seq, status, content, "trigger", on_wake, series_id, '
                            "source_session_id FROM messages_in ORDER BY seq").fetchall()
        idx = [r[1] for r in conn.execute("PRAGMA index_list(messages_in)")]
    assert rows == [("old-1", 2, "completed", '{"text":"a"}', 1, 0, None, None),
                    ("old-2", 4, "pending", '{"text":"b"}', 1, 0, None, None)]
    assert "idx_messages_in_series" in idx
    assert journal_mode(db) == "delete"
    assert schema.init_inbound(db) == []  # second open: nothing left to add


def test_old_outbound_gets_missing_columns_and_tables(tmp_path):
    db = tmp_path / "outbound.db"
    with _db(db) as conn:  # no deliver_after/recurrence, no container_state
        conn.execute("CREATE TABLE messages_out (id TEXT PRIMARY KEY, seq INTEGER UNIQUE, "
                     "in_reply_to TEXT, timestamp TEXT NOT NULL, kind TEXT NOT NULL, "
                     "platform_id TEXT, channel_type TEXT, thread_id TEXT, content TEXT NOT NULL)")
        conn.execute("CREATE TABLE processing_ack (message_id TEXT PRIMARY KEY, "
                     "status TEXT NOT NULL, status_changed TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                     "VALUES ('o1', 3, 't', 'chat', '{}')")
        conn.execute("INSERT INTO processing_ack VALUES ('m1', 'completed', 't')")
    added = schema.init_outbound(db)
    assert sorted(added) == ["messages_out.deliver_after", "messages_out.recurrence"]
    assert tables(db) == set(CONTRACT_OUTBOUND)
    with _db(db) as conn:
        assert conn.execute("SELECT id, seq, deliver_after FROM messages_out").fetchall() == [
            ("o1", 3, None)]
        assert conn.execute("SELECT * FROM processing_ack").fetchall() == [("m1", "completed", "t")]


def test_missing_key_column_is_refused_not_rebuilt(tmp_path):
    """seq is UNIQUE: it cannot be added; the file is left exactly as it was."""
    db = tmp_path / "inbound.db"
    with _db(db) as conn:
        conn.execute("CREATE TABLE messages_in (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                     "timestamp TEXT NOT NULL, content TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_in VALUES ('x', 'chat', 't', '{}')")
    with pytest.raises(sqlite3.DatabaseError, match="lacks required column seq"):
        schema.init_inbound(db)
    assert table_columns(db, "messages_in") == ["id", "kind", "timestamp", "content"]
    assert tables(db) == {"messages_in"}  # the failed upgrade was rolled back whole


@pytest.mark.parametrize("decl, expected", [
    ("TEXT", "TEXT"),
    ("INTEGER DEFAULT 0", "INTEGER DEFAULT 0"),
    ("INTEGER NOT NULL DEFAULT 1", "INTEGER NOT NULL DEFAULT 1"),
    ("TEXT NOT NULL", None),  # NOT NULL without a default cannot be added
    ("TEXT PRIMARY KEY", None),
    ("INTEGER UNIQUE", None),
    ("integer primary key check (id = 1)", None),
])
def test_add_column_decl(decl, expected):
    assert schema._add_column_decl(decl) == expected


def test_wal_file_is_switched_back_to_delete(tmp_path):
    db = tmp_path / "inbound.db"
    with _db(db) as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE t (x)")
    schema.init_inbound(db)
    assert journal_mode(db) == "delete"
    assert not (tmp_path / "inbound.db-wal").exists()
    assert not (tmp_path / "inbound.db-shm").exists()


def test_readonly_connection_cannot_write(tmp_path):
    db = tmp_path / "outbound.db"
    schema.init_outbound(db)
    before = db.read_bytes()
    with schema.opened(db, readonly=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages_out").fetchone()[0] == 0
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("INSERT INTO session_state VALUES ('k', 'v', 't')")
    assert db.read_bytes() == before


def test_readonly_open_works_with_awkward_path_characters(tmp_path):
    folder = tmp_path / "a b#c%20?d"
    folder.mkdir()
    db = folder / "outbound.db"
    schema.init_outbound(db)
    with schema.opened(db, readonly=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM processing_ack").fetchone()[0] == 0


def test_readonly_open_never_creates_a_file(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        with schema.opened(tmp_path / "missing.db", readonly=True) as conn:
            conn.execute("SELECT 1 FROM sqlite_master").fetchall()
    assert not (tmp_path / "missing.db").exists()


def test_transaction_rolls_back_on_error(tmp_path):
    db = tmp_path / "inbound.db"
    schema.init_inbound(db)
    with schema.opened(db) as conn:
        with pytest.raises(RuntimeError):
            with schema.transaction(conn):
                conn.execute("INSERT INTO destinations (name, type) VALUES ('a', 'channel')")
                raise RuntimeError("boom")
        assert conn.execute("SELECT COUNT(*) FROM destinations").fetchone()[0] == 0
        assert conn.in_transaction is False


# --- timestamps ----------------------------------------------------------------------

UTC = timezone.utc


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01 12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # datetime('now') shape
    ("2024-05-01 12:00:00.250", datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)),
    ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("2024-05-01T12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("2024-05-01T07:30:00-04:30", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    (" 2024-05-01 12:00:00 ", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    (None, None),
    ("", None),
])
def test_parse_ts(text, expected):
    got = schema.parse_ts(text)
    assert got == expected
    if got is not None:
        assert got.utcoffset() == timedelta(0)


def test_parse_ts_rejects_garbage():
    with pytest.raises(ValueError):
        schema.parse_ts("yesterday")


@pytest.mark.parametrize("when, expected", [
    (datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), "2024-05-01 12:00:00.123"),
    (datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2))), "2024-05-01 12:00:00.000"),
    (datetime(2024, 5, 1, 12, 0, 0), "2024-05-01 12:00:00.000"),  # naive = already UTC
])
def test_format_ts(when, expected):
    assert schema.format_ts(when) == expected
    assert schema.parse_ts(schema.format_ts(when)).replace(microsecond=0) == (
        when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    ).replace(microsecond=0)


def test_format_ts_compares_correctly_with_sqlite_now():
    """Our strings and datetime('now') must order the same in SQL."""
    past = schema.format_ts(schema.utcnow() - timedelta(seconds=5))
    future = schema.format_ts(schema.utcnow() + timedelta(seconds=5))
    with _db(":memory:") as conn:
        (a, b, c, d) = conn.execute(
            "SELECT julianday(?) < julianday('now'), julianday(?) > julianday('now'), "
            "? < datetime('now'), ? > datetime('now')", (past, future, past, future)).fetchone()
    assert (a, b, c, d) == (1, 1, 1, 1)


def test_sqlite_now_is_parsed_as_utc_even_on_a_non_utc_host():
    """A fresh datetime('now') must look fresh whatever the local time zone is."""
    code = (
        "import sqlite3; from orchestrator.contract import schema; "
        "ts = sqlite3.connect(':memory:').execute(\"SELECT datetime('now')\").fetchone()[0]; "
        "print(abs((schema.utcnow() - schema.parse_ts(ts)).total_seconds()))"
    )
    for tz in ("Asia/Kathmandu", "America/St_Johns", "UTC"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "TZ": tz}, check=True, timeout=60)
        assert float(out.stdout) < 5.0, (tz, out.stdout)


def test_after_is_now_plus_seconds():
    now = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert schema.after(90, now) == "2024-01-01 00:01:30"
    assert schema.after(0.5, now) == "2024-01-01 00:00:01"  # rounded up: never early


@pytest.mark.parametrize(("when", "text"), [
    (datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC), "2024-01-01 00:00:00"),
    (datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "2024-01-01 00:00:01"),
    (datetime(2024, 1, 1, 23, 59, 59, 999999, tzinfo=UTC), "2024-01-02 00:00:00"),
    (datetime(2024, 1, 1, 2, 0, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
     "2024-01-01 00:00:01"),
])
def test_format_due_is_whole_seconds_rounded_up(when, text):
    """NanoClaw's runner: datetime(process_after) <= datetime('now'); ours: exact. In
    whole seconds both agree, and rounding up means neither takes a message early."""
    assert schema.format_due(when) == text
    with sqlite3.connect(":memory:") as conn:
        (due_for_sqlite,) = conn.execute("SELECT datetime(?) <= datetime(?)",
                                         (text, schema.format_ts(when))).fetchone()
    assert due_for_sqlite == (schema.parse_ts(text) <= when)
    assert schema.parse_ts(text) >= when
