"""status: one row per session from the registry, inbound.db and outbound.db."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.host import inbound, status
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup, Sessions

UTC = timezone.utc


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    reg = Registry(data / "orchestrator.db")
    yield Sessions(data, reg, 1024), reg, data
    reg.close()


def ack(sessions, row, mid, st):
    with closing(sqlite3.connect(sessions.paths(row).outbound_db)) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO processing_ack VALUES (?, ?, datetime('now'))",
                     (mid, st))


def test_collect_counts_per_session(env):
    s, reg, data = env
    a = s.resolve("alpha", MessagingGroup("cli", "A"), None, "shared")
    b = s.resolve("beta", None, None, "agent-shared")
    for i in range(4):
        s.write_message(a, {"text": str(i)}, message_id=f"a{i}")
    s.write_system_response(a, "q", "yes")  # system rows are not counted
    s.write_message(b, {"text": "x"}, message_id="b0")
    ack(s, a, "a0", "processing")  # claimed: processing, not pending
    ack(s, a, "a1", "completed")
    ack(s, a, "a2", "failed")
    inbound.settle(s.paths(a).inbound_db, (), {"a1": "completed", "a2": "failed"})
    reg.set_container_status(a.id, "running", "started")
    reg.touch(a.id, heartbeat=datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC))

    rows = {r.session_id: r for r in status.collect(data, reg)}
    assert set(rows) == {a.id, b.id}
    ra, rb = rows[a.id], rows[b.id]
    assert (ra.agent_group, ra.container_status, ra.status_reason) == ("alpha", "running", "started")
    assert (ra.pending, ra.processing, ra.completed, ra.failed) == (1, 1, 1, 1)
    assert ra.last_heartbeat == "2024-06-01T12:00:00+00:00"
    assert ra.error is None
    assert (rb.agent_group, rb.container_status, rb.pending, rb.processing) == (
        "beta", "stopped", 1, 0)
    assert rb.last_heartbeat is None


def test_one_broken_session_does_not_hide_the_others(env):
    s, reg, data = env
    good = s.resolve("g", MessagingGroup("cli", "A"), None, "shared")
    bad = s.resolve("g", MessagingGroup("cli", "B"), None, "shared")
    s.write_message(good, {"text": "x"})
    s.paths(bad).outbound_db.write_bytes(b"this is not sqlite" * 100)
    rows = {r.session_id: r for r in status.collect(data, reg)}
    assert rows[good.id].error is None and rows[good.id].pending == 1
    assert rows[bad.id].error is not None
    assert "not a readable outbound.db" in rows[bad.id].error
    assert "\n" not in rows[bad.id].error
    table = status.render_table(list(rows.values()))
    assert f"! {bad.id}: " in table


def test_missing_session_folder_is_reported_not_raised(env):
    s, reg, data = env
    reg.ensure_agent_group("g")
    reg.get_or_create_session(resolution_key="k", agent_group_id="g", messaging_group_id=None,
                              thread_id=None, new_id="ghost")
    (row,) = status.collect(data, reg)
    assert row.session_id == "ghost" and row.error.endswith("ghost/inbound.db is missing")
    assert not (data / "sessions" / "g" / "ghost").exists()


def test_render_table_header_and_one_row_per_session():
    rows = [status.StatusRow("alpha", "sess-1", "running", "started", 2, 1, 0, 5,
                             "2024-06-01T12:00:00+00:00", None),
            status.StatusRow("beta-group", "sess-22", "stopped", None, 0, 0, 3, 0, None, None)]
    lines = status.render_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["AGENT", "GROUP", "SESSION", "CONTAINER", "PENDING",
                                "PROCESSING", "FAILED", "LAST", "HEARTBEAT", "LAST", "ACTIVE",
                                "SETTINGS", "CHANNEL", "PLATFORM", "THREAD"]
    assert lines[1].split() == ["alpha", "sess-1", "running", "2", "1", "0",
                                "2024-06-01T12:00:00+00:00", "-", "-", "-", "-", "-"]
    assert lines[2].split() == ["beta-group", "sess-22", "stopped", "0", "0", "3", "-", "-",
                                "-", "-", "-", "-"]
    # columns line up: each value starts under its header
    for header in ("SESSION", "CONTAINER", "PENDING"):
        col = lines[0].index(header)
        assert lines[1][col - 1] == " " and lines[1][col] != " "
        assert lines[2][col - 1] == " " and lines[2][col] != " "


def test_render_table_empty():
    assert "no sessions yet" in status.render_table([])


def test_render_json_round_trips():
    rows = [status.StatusRow("alpha", "sess-1", "idle", "quiet", 0, 0, 1, 2, None, None)]
    data = json.loads(status.render_json(rows))
    assert data == [{"agent_group": "alpha", "session_id": "sess-1", "container_status": "idle",
                     "status_reason": "quiet", "pending": 0, "processing": 0, "failed": 1,
                     "completed": 2, "last_heartbeat": None, "last_active": None,
                     "error": None, "channel_type": None, "platform_id": None,
                     "thread_id": None, "queue_position": None, "queued_for": None,
                     "settings": None, "image": None, "settings_current": None,
                     "usage": None}]
    assert json.loads(status.render_json([])) == []


def test_status_never_creates_files(env):
    """status only reads: a session whose inbound.db is gone is reported, not recreated."""
    s, reg, data = env
    row = s.resolve("g", None, None, "agent-shared")
    s.paths(row).inbound_db.unlink()
    (got,) = status.collect(data, reg)
    assert got.error == f"sessions/g/{row.id}/inbound.db is missing"  # as the supervisor says
    assert not s.paths(row).inbound_db.exists()


def test_last_heartbeat_is_the_newer_of_file_and_record(env, tmp_path):
    """The supervisor records heartbeats only now and then (it mutes running agents'
    heartbeats): status reads the file too, without following a symlink."""
    s, reg, data = env
    row = s.resolve("g", None, None, "agent-shared")
    hb = s.paths(row).heartbeat
    recorded = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
    reg.touch(row.id, heartbeat=recorded)
    hb.touch()
    file_time = datetime(2024, 6, 1, 12, 0, 30, tzinfo=UTC)
    os.utime(hb, (file_time.timestamp(), file_time.timestamp()))
    assert status.collect(data, reg)[0].last_heartbeat == "2024-06-01T12:00:30+00:00"

    older = datetime(2024, 6, 1, 11, 0, 0, tzinfo=UTC)  # a record newer than the file wins
    os.utime(hb, (older.timestamp(), older.timestamp()))
    assert status.collect(data, reg)[0].last_heartbeat == "2024-06-01T12:00:00+00:00"

    hb.unlink()
    target = tmp_path / "elsewhere"
    target.touch()  # fresh mtime, but outside the session folder: never read through a link
    hb.symlink_to(target)
    assert status.collect(data, reg)[0].last_heartbeat == "2024-06-01T12:00:00+00:00"


@pytest.mark.parametrize(("container", "reason", "shown"), [
    ("idle", "paused after 60s idle", "idle (paused)"),
    ("idle", "resumed: 1 message(s) due", "idle"),
    ("idle", None, "idle"),
    ("running", "paused?", "running"),
])
def test_a_paused_agent_shows_as_a_detail_of_idle(container: str, reason: str | None,
                                                  shown: str) -> None:
    row = status.StatusRow("g", "s", container, reason, 0, 0, 0, 0, None, None)
    assert status.render_table([row]).splitlines()[1].split()[2:2 + len(shown.split())] \
        == shown.split()


def test_queued_sessions_show_their_place_and_wait(env):
    s, reg, data = env
    rows = [s.resolve(f"g{i}", None, None, "agent-shared") for i in range(4)]
    for r in rows:
        s.write_message(r, {"text": "x"})
    now = datetime.now(UTC)
    reg.set_queued(rows[0].id, now.replace(microsecond=0) - timedelta(seconds=30))
    reg.set_queued(rows[1].id, now.replace(microsecond=0) - timedelta(seconds=90))
    reg.set_queued(rows[3].id, now.replace(microsecond=0) - timedelta(seconds=90))
    reg.set_container_status(rows[3].id, "running", "agent started")  # left the queue

    got = {r.session_id: r for r in status.collect(data, reg)}
    assert got[rows[1].id].queue_position == 1 and got[rows[0].id].queue_position == 2
    assert 90 <= got[rows[1].id].queued_for < 100 and 30 <= got[rows[0].id].queued_for < 40
    assert got[rows[2].id].queue_position is None and got[rows[3].id].queue_position is None
    table = status.render_table(list(got.values()))
    assert "queued #1 (9" in table and "queued #2 (3" in table
    assert json.loads(status.render_json(list(got.values())))[0]["queue_position"] in (1, 2, None)
    reg.set_queued(rows[1].id, None)
    assert {r.session_id: r.queue_position for r in status.collect(data, reg)}[rows[0].id] == 1
