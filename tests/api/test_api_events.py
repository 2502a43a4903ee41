"""api.events and api.idempotency: real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.api.events import SCHEMA_VERSION, EventStore, gap_after
from orchestrator.api.idempotency import IdempotencyKeys, check_key, fingerprint
from orchestrator.host.schema_version import SchemaTooNew


def test_ids_only_grow_across_a_reopen(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    a = store.append("status", {"session_id": "s1", "status": "running"})
    b = store.append("reply_delivered", {"session_id": "s1", "message_id": "o1"})
    assert b.id == a.id + 1 and store.last_id() == b.id
    store.close()
    again = EventStore(tmp_path / "events.db")
    c = again.append("status", {"session_id": "s1", "status": "stopped"})
    assert c.id == b.id + 1
    assert [(e.id, e.kind, e.data) for e in again.since(a.id)] == [
        (b.id, "reply_delivered", {"session_id": "s1", "message_id": "o1"}),
        (c.id, "status", {"session_id": "s1", "status": "stopped"})]
    again.close()


def test_prune_keeps_the_newest_and_ids_never_reused(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db", keep=3)
    for i in range(10):
        store.append("status", {"n": i})
    store.prune()
    assert [e.data["n"] for e in store.since(0)] == [7, 8, 9]
    assert store.oldest_id() == 8
    assert gap_after(5, store.oldest_id()) and not gap_after(7, store.oldest_id())
    assert store.append("status", {"n": 10}).id == 11  # AUTOINCREMENT: no reuse
    store.close()


def test_sse_format_is_one_data_line() -> None:
    from orchestrator.api.events import Event

    text = Event(7, "2030-01-01 00:00:00.000", "status", {"reason": "a\nb"}).sse()
    lines = text.split("\n")
    assert lines[0] == "id: 7" and lines[1] == "event: status"
    assert lines[2].startswith("data: {") and text.endswith("\n\n") and len(lines) == 5


async def test_a_subscriber_that_falls_behind_is_dropped_not_blocking(tmp_path: Path,
                                                               monkeypatch) -> None:
    from orchestrator.api import events as events_mod

    monkeypatch.setattr(events_mod, "QUEUE_MAX", 2)

    store = EventStore(tmp_path / "events.db")
    sub = store.subscribe()
    for i in range(5):
        store.append("status", {"n": i})  # never waits
    assert sub.dropped and sub.queue.qsize() == 2
    store.close()


@pytest.mark.parametrize("key, ok", [("a", True), ("order-42", True), ("k" * 200, True),
                                     ("", False), ("k" * 201, False), ("é", False),
                                     ("a\tb", False)])
def test_check_key(key: str, ok: bool) -> None:
    assert (check_key(key) is None) is ok


def test_idempotency_keys_persist_and_replay(tmp_path: Path) -> None:
    db = tmp_path / "orchestrator.db"
    keys = IdempotencyKeys(db)
    fp = fingerprint(b"{}")
    assert keys.get("k") is None
    keys.begin("k", fp, "msg-1")
    entry = keys.get("k")
    assert entry.message_id == "msg-1" and not entry.done
    keys.begin("k", "other", "msg-2")  # a second begin never replaces the first
    assert keys.get("k").message_id == "msg-1"
    keys.finish("k", "sess-1")
    keys.close()
    again = IdempotencyKeys(db)
    assert again.get("k").done and again.get("k").session_id == "sess-1"
    again._conn.execute("UPDATE api_idempotency SET created_at='2000-01-01 00:00:00.000'")
    again.prune()
    assert again.get("k") is None
    again.close()


def test_the_event_store_carries_its_schema_version_and_refuses_a_newer_one(
        tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    old = sqlite3.connect(path)  # from before versions: the table and a row, version 0
    old.executescript("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT "
                      "NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL);"
                      "INSERT INTO events (at, kind, data) VALUES ('t', 'status', '{}');")
    old.close()
    store = EventStore(path)
    assert [e.kind for e in store.since(0)] == ["status"]
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="events.db: schema version 2 is newer than this "
                       "orchestrator knows \\(1\\)"):
        EventStore(path)
