"""store.registry: the host's central DB, on a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.host.registry import Registry

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "orchestrator.db")
    yield r
    r.close()


def session(reg, key="k", group="g", new_id="s-1", mg=None, thread=None):
    reg.ensure_agent_group(group)
    return reg.get_or_create_session(resolution_key=key, agent_group_id=group,
                                     messaging_group_id=mg, thread_id=thread, new_id=new_id)


def test_creates_its_folder_and_tables(tmp_path):
    path = tmp_path / "nested" / "orchestrator.db"
    with Registry(path) as r:
        names = {row[0] for row in r._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
    assert path.is_file()
    assert {"agent_groups", "messaging_groups", "destinations", "sessions", "status_changes",
            "delivery_attempts"} <= names


def test_agent_group_is_idempotent(reg):
    assert reg.ensure_agent_group("g", "Group G") == "g"
    assert reg.ensure_agent_group("g", "Other name") == "g"
    rows = reg._conn.execute("SELECT id, name FROM agent_groups").fetchall()
    assert [tuple(r) for r in rows] == [("g", "Group G")]


def test_messaging_group_is_stable_per_channel_and_platform(reg):
    a = reg.ensure_messaging_group("slack", "C1")
    assert reg.ensure_messaging_group("slack", "C1") == a
    b = reg.ensure_messaging_group("slack", "C2")
    c = reg.ensure_messaging_group("discord", "C1")
    assert len({a, b, c}) == 3
    assert reg.messaging_group(a) == ("slack", "C1")
    assert reg.messaging_group(c) == ("discord", "C1")
    assert reg.messaging_group("mg-nope") is None


def test_get_or_create_session(reg):
    mg = reg.ensure_messaging_group("cli", "local")
    row, created = session(reg, key="shared:g:x", new_id="s-1", mg=mg, thread="t")
    assert created is True
    assert (row.id, row.agent_group_id, row.messaging_group_id, row.thread_id) == (
        "s-1", "g", mg, "t")
    assert (row.status, row.container_status, row.status_reason) == ("active", "stopped", None)
    assert row.created_at is not None and row.created_at.tzinfo is not None
    again, created2 = session(reg, key="shared:g:x", new_id="s-2", mg=mg)
    assert created2 is False
    assert again.id == "s-1" and again.thread_id == "t"  # the first row wins, unchanged
    other, created3 = session(reg, key="shared:g:y", new_id="s-3")
    assert created3 is True and other.id == "s-3"
    assert [s.id for s in reg.sessions()] == ["s-1", "s-3"]
    assert reg.session("s-3").id == "s-3"
    assert reg.session("nope") is None


def test_container_status_is_constrained_in_sql(reg):
    """container_status is constrained in SQL, not only in Python."""
    session(reg)
    with pytest.raises(sqlite3.IntegrityError):
        reg._conn.execute("UPDATE sessions SET container_status='dancing' WHERE id='s-1'")


def test_set_container_status_logs_each_change_with_reason(reg):
    session(reg)
    t1, t2 = NOW, NOW + timedelta(seconds=30)
    assert reg.set_container_status("s-1", "running", "container started", now=t1) == "stopped"
    assert reg.set_container_status("s-1", "idle", "no heartbeat for 30s", now=t2) == "running"
    row = reg.session("s-1")
    assert (row.container_status, row.status_reason) == ("idle", "no heartbeat for 30s")
    assert reg.status_changes("s-1") == [
        {"at": "2024-06-01 12:00:00.000", "old": "stopped", "new": "running",
         "reason": "container started"},
        {"at": "2024-06-01 12:00:30.000", "old": "running", "new": "idle",
         "reason": "no heartbeat for 30s"},
    ]
    assert reg.status_changes("other") == []


@pytest.mark.parametrize("bad", ["starting", "RUNNING", "", "dead"])
def test_set_container_status_refuses_unknown_statuses(reg, bad):
    session(reg)
    with pytest.raises(ValueError, match="running"):
        reg.set_container_status("s-1", bad, "x")
    assert reg.session("s-1").container_status == "stopped"
    assert reg.status_changes("s-1") == []


def test_touch_updates_times(reg):
    session(reg)
    reg.touch("s-1")  # nothing to set: no change, no error
    assert reg.session("s-1").last_active is None
    reg.touch("s-1", active=NOW)
    reg.touch("s-1", heartbeat=NOW + timedelta(seconds=1))
    row = reg.session("s-1")
    assert row.last_active == NOW
    assert row.last_heartbeat == NOW + timedelta(seconds=1)


def test_touch_many_sets_what_each_row_gives_in_one_go(reg):
    session(reg)
    reg.touch("s-1", active=NOW, heartbeat=NOW)
    later = NOW + timedelta(seconds=5)
    reg.touch_many([("s-1", None, later), ("gone", later, later)])  # (no row: nothing)
    row = reg.session("s-1")
    assert (row.last_active, row.last_heartbeat) == (NOW, later)  # None keeps the column
    reg.touch_many([("s-1", later, None), ("s-1", None, None)])
    row = reg.session("s-1")
    assert (row.last_active, row.last_heartbeat) == (later, later)


def test_destinations_are_replaced_per_group(reg):
    reg.ensure_agent_group("g")
    reg.ensure_agent_group("h")
    reg.set_destinations("g", [{"name": "main", "type": "channel", "channel_type": "cli",
                                "platform_id": "local"}])
    reg.set_destinations("h", [{"name": "peer", "type": "agent", "agent_group_id": "g"}])
    reg.set_destinations("g", [{"name": "other", "type": "channel", "display_name": "O"}])
    assert [d["name"] for d in reg.destinations("g")] == ["other"]
    (peer,) = reg.destinations("h")
    assert (peer["name"], peer["type"], peer["target_agent_group_id"]) == ("peer", "agent", "g")


def test_delivery_attempts_roundtrip(reg):
    assert reg.delivery_attempt("s", "o") == (0, None)
    reg.record_attempt_failure("s", "o", 1, NOW, "timeout")
    assert reg.delivery_attempt("s", "o") == (1, NOW)
    reg.record_attempt_failure("s", "o", 2, None, "refused")
    assert reg.delivery_attempt("s", "o") == (2, None)
    assert reg.delivery_attempt("s", "other") == (0, None)
    reg.clear_attempts("s", "o")
    assert reg.delivery_attempt("s", "o") == (0, None)


def test_state_survives_a_restart(tmp_path):
    path = tmp_path / "orchestrator.db"
    with Registry(path) as r:
        session(r)
        r.set_container_status("s-1", "running", "started", now=NOW)
        r.record_attempt_failure("s-1", "o", 3, NOW, "boom")
    with Registry(path) as r:
        assert r.session("s-1").container_status == "running"
        assert r.delivery_attempt("s-1", "o") == (3, NOW)
        assert len(r.status_changes("s-1")) == 1


# --- races ----------------------------------------------------------------------------------

def _race_threads(resolve, n=8):
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def work(i):
        try:
            barrier.wait(timeout=30)
            results[i] = resolve(i)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    return results


def test_threads_with_their_own_registries_get_one_session(tmp_path):
    path = tmp_path / "orchestrator.db"
    with Registry(path) as r:
        r.ensure_agent_group("g")
    regs = [Registry(path) for _ in range(8)]
    try:
        results = _race_threads(lambda i: regs[i].get_or_create_session(
            resolution_key="k", agent_group_id="g", messaging_group_id=None, thread_id=None,
            new_id=f"s-{i}"))
    finally:
        for r in regs:
            r.close()
    ids = {row.id for row, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1


def test_threads_sharing_one_registry_get_one_session_each_key(reg):
    """One Registry used from several threads (check_same_thread=False) must not
    interleave transactions on its single connection."""
    reg.ensure_agent_group("g")

    def resolve(i):
        out = []
        for k in range(25):
            row, _ = reg.get_or_create_session(resolution_key=f"k{k}", agent_group_id="g",
                                               messaging_group_id=None, thread_id=None,
                                               new_id=f"s-{i}-{k}")
            reg.set_container_status(row.id, "idle", f"thread {i}")
            out.append(row.id)
        return out

    results = _race_threads(resolve)
    for k in range(25):
        assert len({r[k] for r in results}) == 1, k
    assert len(reg.sessions()) == 25


RESOLVER = r"""
import json, sys
from pathlib import Path
from orchestrator.host.registry import Registry
reg = Registry(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
row, created = reg.get_or_create_session(resolution_key="shared:g:mg", agent_group_id="g",
                                         messaging_group_id=None, thread_id=None,
                                         new_id=sys.argv[2])
print(json.dumps([row.id, created]), flush=True)
reg.close()
"""


def test_processes_resolving_the_same_key_get_the_same_session(tmp_path):
    path = tmp_path / "orchestrator.db"
    with Registry(path) as r:
        r.ensure_agent_group("g")
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVER, str(path), f"s-proc-{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(6)]
    try:
        for p in procs:  # all connected and waiting before any of them resolves
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()
    assert len({sid for sid, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with Registry(path) as r:
        assert [s.id for s in r.sessions()] == [results[0][0]]


def test_adopting_a_folder_a_sender_is_committing_returns_the_senders_row(tmp_path):
    """The supervisor may see a new folder (renamed into place inside the sender's
    transaction) before the row commits: adoption selects by id, not by key."""
    with Registry(tmp_path / "r.db") as sender, Registry(tmp_path / "r.db") as sup:
        row, created = sender.create_session(
            agent_group_id="g", chat=("cli", "local"), thread_id=None,
            key=lambda mg: f"shared:g:{mg}", new_id="sess-1", place=lambda: None,
            unplace=lambda: None)
        assert created
        adopted, fresh = sup.adopt_folder("g", "sess-1")
        assert (adopted, fresh) == (row, False)
        found, fresh = sup.adopt_folder("g", "sess-on-disk")  # really found on disk
        assert fresh and found.id == "sess-on-disk" and found.messaging_group_id is None
        assert [s.id for s in sup.sessions()] == ["sess-1", "sess-on-disk"]


def test_create_session_rolls_back_when_placing_fails(tmp_path):
    events = []
    with Registry(tmp_path / "r.db") as reg:
        def place():
            events.append("place")
            raise OSError(39, "Directory not empty")

        with pytest.raises(OSError):
            reg.create_session(agent_group_id="g", chat=None, thread_id=None,
                               key=lambda mg: "agent-shared:g", new_id="s1", place=place,
                               unplace=lambda: events.append("unplace"))
        assert reg.sessions() == [] and events == ["place"]  # never placed: nothing to undo


def test_create_session_undoes_the_placed_folder_when_the_commit_fails(tmp_path):
    """A full disk at COMMIT: the folder already renamed into place is moved out again,
    so there is never a folder without its row (on a real, filled tmpfs)."""
    from tests.support.mounts import fill, tmpfs

    events = []
    with tmpfs(tmp_path / "disk", "1m") as disk, Registry(disk / "r.db") as reg:
        def place():
            events.append("place")
            fill(disk)  # the disk fills up between the rename and the commit

        with pytest.raises(sqlite3.OperationalError, match="full"):
            reg.create_session(agent_group_id="g", chat=("cli", "local"), thread_id=None,
                               key=lambda mg: f"shared:g:{mg}", new_id="s1", place=place,
                               unplace=lambda: events.append("unplace"))
        assert events == ["place", "unplace"]
        (disk / "filler").unlink()
        assert reg.sessions() == [] and reg.find_messaging_group("cli", "local") is None


def test_reader_is_read_only_and_none_without_a_registry(tmp_path):
    assert Registry.reader(tmp_path / "none.db") is None
    with Registry(tmp_path / "r.db") as reg:
        reg.ensure_agent_group("g")
        reg.get_or_create_session(resolution_key="k", agent_group_id="g",
                                  messaging_group_id=None, thread_id=None, new_id="s1")
    reader = Registry.reader(tmp_path / "r.db")
    assert reader is not None
    with reader:
        assert [s.id for s in reader.sessions()] == ["s1"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.ensure_agent_group("h")


def test_group_chats_are_recorded_once_and_include_the_sessions_own(tmp_path):
    """Every chat that routes to a group: recorded ones plus the chats its sessions are
    bound to (folders made before chats were recorded), each once."""
    reg = Registry(tmp_path / "orchestrator.db")
    assert reg.record_chat("g", "cli", "local") is True
    assert reg.record_chat("g", "cli", "local") is False
    assert reg.record_chat("g", "slack", "C1", "t1") is True
    assert reg.record_chat("h", "cli", "local") is True
    mg = reg.ensure_messaging_group("web", "w1")
    reg.get_or_create_session(resolution_key="shared:g:web", agent_group_id="g",
                              messaging_group_id=mg, thread_id=None, new_id="s1")
    assert sorted(reg.group_chats("g"), key=str) == sorted(
        [("cli", "local", None), ("slack", "C1", "t1"), ("web", "w1", None)], key=str)
    assert reg.group_chats("h") == [("cli", "local", None)]
    assert reg.group_chats("nobody") == []
    reg.close()


def test_data_version_moves_for_another_process_s_commit_only(tmp_path):
    """The supervisor reads the session index again at start-up only if another
    process (``send``) wrote the registry since its last read."""
    reg = Registry(tmp_path / "orchestrator.db")
    try:
        first = reg.data_version()
        session(reg, new_id="own")  # this connection's own commit
        assert reg.data_version() == first
        other = Registry(tmp_path / "orchestrator.db")
        try:
            session(other, key="k2", new_id="theirs")
        finally:
            other.close()
        assert reg.data_version() != first
        assert {row[0] for row in reg.session_index()} == {"own", "theirs"}
    finally:
        reg.close()
