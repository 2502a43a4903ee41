"""host.outbound: the host's read-only view of the agent's outbound.db."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.host import outbound
from orchestrator.host.outbound import OutboundError
from tests.support.helpers import open_fds_to, query

UTC = timezone.utc


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "outbound.db"
    schema.init_outbound(path)
    return path


def agent_sql(db, sql, params=()):
    """Write as the agent does: its own connection, one transaction, closed."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, params)


def add_reply(db, out_id, seq, **kw):
    agent_sql(db, "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, deliver_after, "
                  "kind, platform_id, channel_type, thread_id, content) VALUES (?,?,?,?,?,?,?,?,?,?)",
              (out_id, seq, kw.get("in_reply_to"), kw.get("timestamp", "2024-06-01 12:00:00"),
               kw.get("deliver_after"), kw.get("kind", "chat"), kw.get("platform_id"),
               kw.get("channel_type"), kw.get("thread_id"), kw.get("content", "{}")))


def test_missing_file_is_an_empty_snapshot(tmp_path):
    path = tmp_path / "outbound.db"
    assert outbound.read(path) == outbound.Snapshot({}, [], None)
    assert outbound.max_seq(path) == 0
    assert outbound.clear_processing_claims(path) == 0
    assert not path.exists()  # reading never creates it


def test_fresh_db_reads_empty(db):
    assert outbound.read(db) == outbound.Snapshot({}, [], None)
    assert outbound.max_seq(db) == 0


def test_read_returns_acks_messages_and_tool_state(db):
    add_reply(db, "o1", 3, in_reply_to="m1", content='{"text":"one"}', platform_id="p",
              channel_type="cli", thread_id="t")
    add_reply(db, "o2", 5, deliver_after="2024-06-01T13:00:00Z")
    add_reply(db, "o3", 9)
    agent_sql(db, "INSERT INTO processing_ack VALUES ('m1', 'completed', '2024-06-01 12:00:05')")
    agent_sql(db, "INSERT INTO processing_ack VALUES ('m2', 'processing', '2024-06-01 12:00:06')")
    agent_sql(db, "INSERT INTO container_state VALUES (1, 'Bash', 120000, "
                  "'2024-06-01 12:00:07', '2024-06-01 12:00:07')")
    snap = outbound.read(db)
    assert [m.id for m in snap.messages] == ["o1", "o2", "o3"]
    assert [m.seq for m in snap.messages] == [3, 5, 9]
    o1 = snap.messages[0]
    assert (o1.in_reply_to, o1.content, o1.platform_id, o1.channel_type, o1.thread_id,
            o1.kind, o1.deliver_after) == ("m1", '{"text":"one"}', "p", "cli", "t", "chat", None)
    assert snap.messages[1].deliver_after == datetime(2024, 6, 1, 13, tzinfo=UTC)
    assert snap.acks == {
        "m1": outbound.Ack("m1", "completed", datetime(2024, 6, 1, 12, 0, 5, tzinfo=UTC)),
        "m2": outbound.Ack("m2", "processing", datetime(2024, 6, 1, 12, 0, 6, tzinfo=UTC)),
    }
    assert snap.tool == outbound.ToolState("Bash", 120.0,
                                           datetime(2024, 6, 1, 12, 0, 7, tzinfo=UTC))
    assert outbound.max_seq(db) == 9


def test_after_seq_is_a_watermark(db):
    for out_id, seq in (("a", 1), ("b", 3), ("c", 7)):
        add_reply(db, out_id, seq)
    assert [m.id for m in outbound.read(db, after_seq=3).messages] == ["c"]
    assert outbound.read(db, after_seq=7).messages == []
    assert [m.id for m in outbound.read(db, after_seq=0).messages] == ["a", "b", "c"]


def test_tool_state_without_declared_timeout(db):
    agent_sql(db, "INSERT INTO container_state (id, current_tool, updated_at) "
                  "VALUES (1, NULL, '2024-06-01 12:00:00')")
    assert outbound.read(db).tool == outbound.ToolState(None, None, None)


def test_unparseable_timestamps_become_none_not_errors(db):
    add_reply(db, "o1", 1, deliver_after="soon")
    agent_sql(db, "INSERT INTO processing_ack VALUES ('m1', 'processing', 'garbage')")
    snap = outbound.read(db)
    assert snap.messages[0].deliver_after is None
    assert snap.acks["m1"].status_changed is None


def test_older_agent_without_container_state_table(tmp_path):
    path = tmp_path / "outbound.db"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE messages_out (id TEXT PRIMARY KEY, seq INTEGER UNIQUE, "
                     "in_reply_to TEXT, timestamp TEXT NOT NULL, deliver_after TEXT, "
                     "recurrence TEXT, kind TEXT NOT NULL, platform_id TEXT, channel_type TEXT, "
                     "thread_id TEXT, content TEXT NOT NULL)")
        conn.execute("CREATE TABLE processing_ack (message_id TEXT PRIMARY KEY, "
                     "status TEXT NOT NULL, status_changed TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                     "VALUES ('o', 1, 't', 'chat', '{}')")
    snap = outbound.read(path)
    assert [m.id for m in snap.messages] == ["o"] and snap.tool is None


def _assert_one_line_error(path, call):
    with pytest.raises(OutboundError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a readable outbound.db")
    assert "move the file aside" in message
    return message


@pytest.mark.parametrize("call", [outbound.read, outbound.max_seq,
                                  outbound.clear_processing_claims],
                         ids=["read", "max_seq", "clear_processing_claims"])
def test_corrupt_file_is_a_one_line_outbound_error(tmp_path, call):
    path = tmp_path / "outbound.db"
    path.write_bytes(random.Random(1234).randbytes(4096))  # fixed seed: reproducible
    before = path.read_bytes()
    message = _assert_one_line_error(path, call)
    assert "not a database" in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("call", [outbound.read, outbound.max_seq],
                         ids=["read", "max_seq"])
def test_foreign_sqlite_db_is_a_one_line_outbound_error(tmp_path, call):
    path = tmp_path / "outbound.db"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE recipes (name TEXT)")
        conn.execute("INSERT INTO recipes VALUES ('soup')")
    message = _assert_one_line_error(path, call)
    assert "no such table" in message
    assert query(path, "SELECT name FROM recipes") == [("soup",)]


def test_outbound_error_is_not_a_sqlite_error():
    """Callers catch OutboundError per session; it must not masquerade as sqlite3's."""
    assert not issubclass(OutboundError, sqlite3.Error)


AGENT_KILLED_MID_WRITE = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=1")  # spill changed pages into the file before commit
conn.execute("BEGIN IMMEDIATE")
for i in range(200):
    conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                 " VALUES (?, ?, '2024-06-01 12:00:00', 'chat', hex(randomblob(2000)))",
                 (f"half-{i}", 100 + 2 * i))
os.kill(os.getpid(), signal.SIGKILL)  # the agent dies mid-write
"""


def test_reads_never_write_the_agents_file_not_even_a_rollback(db):
    """Every read is a read-only connection, so it can never become a writer: an agent
    killed mid-write leaves a hot journal, and the host's reads leave it to the agent's
    own next open (a busy read, tried again later) instead of rolling the agent's file
    back themselves. A read-write connection would roll it back and read on."""
    add_reply(db, "o1", 1)
    proc = subprocess.run([sys.executable, "-c", AGENT_KILLED_MID_WRITE, str(db)])
    assert proc.returncode == -signal.SIGKILL
    journal = db.with_name("outbound.db-journal")
    before = (db.read_bytes(), journal.read_bytes())
    assert before[1]  # a hot journal
    for call in (outbound.read, outbound.max_seq):
        with pytest.raises(sqlite3.OperationalError) as info:
            call(db)
        assert schema.is_busy(info.value), info.value
    assert (db.read_bytes(), journal.read_bytes()) == before  # not a byte written
    agent_sql(db, "SELECT count(*) FROM messages_out")  # its next open rolls it back
    assert [m.id for m in outbound.read(db).messages] == ["o1"]
    assert outbound.max_seq(db) == 1


def test_read_only_connection_refuses_writes_and_leaves_the_file_untouched(db):
    add_reply(db, "o1", 1)
    agent_sql(db, "INSERT INTO processing_ack VALUES ('m1', 'processing', 't')")
    before, mtime = db.read_bytes(), db.stat().st_mtime_ns
    with schema.opened(db, readonly=True) as conn:
        for sql in ("INSERT INTO processing_ack VALUES ('x', 'completed', 't')",
                    "DELETE FROM messages_out", "CREATE TABLE t (x)"):
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute(sql)
    for _ in range(3):
        outbound.read(db)
        outbound.max_seq(db)
    assert db.read_bytes() == before and db.stat().st_mtime_ns == mtime
    assert not db.with_name("outbound.db-journal").exists()
    assert open_fds_to(db) == []


def test_read_sees_the_agents_latest_commit(db):
    """A fresh connection per read: no stale snapshot across reads."""
    add_reply(db, "o1", 1)
    assert outbound.max_seq(db) == 1
    add_reply(db, "o2", 3)
    assert outbound.max_seq(db) == 3
    assert [m.id for m in outbound.read(db).messages] == ["o1", "o2"]


def test_clear_processing_claims_removes_only_processing(db):
    for mid, status in (("a", "processing"), ("b", "completed"), ("c", "failed"),
                        ("d", "processing")):
        agent_sql(db, "INSERT INTO processing_ack VALUES (?, ?, 't')", (mid, status))
    assert outbound.clear_processing_claims(db) == 2
    assert query(db, "SELECT message_id, status FROM processing_ack ORDER BY 1") == [
        ("b", "completed"), ("c", "failed")]
    assert outbound.clear_processing_claims(db) == 0


def test_acks_since_returns_only_changed_and_open_claims(db):
    rows = [("old-done", "completed", "2026-01-01 10:00:00"),
            ("old-claim", "processing", "2026-01-01 10:00:00"),
            ("same-tick", "failed", "2026-01-01 10:00:05"),
            ("new-done", "completed", "2026-01-01T10:00:06.250Z")]
    for mid, st, ts in rows:
        agent_sql(db, "INSERT INTO processing_ack VALUES (?,?,?)", (mid, st, ts))
    assert set(outbound.read(db).acks) == {m for m, _, _ in rows}
    since = outbound.read(db, acks_since="2026-01-01 10:00:05.000").acks
    assert set(since) == {"old-claim", "same-tick", "new-done"}
    assert outbound.processing_ids(db) == ["old-claim"]


def test_clear_acks_and_tool_state_for_a_retry(db, tmp_path):
    """With no agent running, the host deletes the acks of messages it gives back and
    forgets a dead agent's running tool, so the next agent starts clean."""
    agent_sql(db, "INSERT INTO processing_ack VALUES ('a', 'completed', '2024-06-01 12:00:05')")
    agent_sql(db, "INSERT INTO processing_ack VALUES ('b', 'completed', '2024-06-01 12:00:05')")
    agent_sql(db, "INSERT INTO container_state VALUES (1, 'Bash', 60000, 't', 't')")
    assert outbound.read(db).tool.current_tool == "Bash"
    assert outbound.clear_acks(db, ["a", "ghost"]) == 1
    assert outbound.clear_acks(db, []) == 0
    outbound.clear_tool_state(db)
    snap = outbound.read(db)
    assert list(snap.acks) == ["b"]
    assert (snap.tool.current_tool, snap.tool.declared_timeout) == (None, None)
    assert outbound.clear_acks(tmp_path / "none.db", ["a"]) == 0
    outbound.clear_tool_state(tmp_path / "none.db")  # no file: nothing to do
    assert not (tmp_path / "none.db").exists()


def test_a_huge_tool_name_is_read_bounded(tmp_path: Path) -> None:
    """container_state is the agent's: a 20 MB tool name is read as its first 200
    characters, never whole."""
    db = tmp_path / "outbound.db"
    schema.init_outbound(db)
    with schema.opened(db) as conn:
        conn.execute("INSERT INTO container_state (id, current_tool, updated_at)"
                     " VALUES (1, ?, '2026-01-01 00:00:00')", ("B" * 20_000_000,))
    tool = outbound.read(db).tool
    assert tool is not None and tool.current_tool == "B" * 200
