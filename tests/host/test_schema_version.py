"""Schema versions of the registry and the event store, on real SQLite files: ordered
migrations each run once, a crash in one resumes there, a file from before versions
(an older commit's registry) is migrated with its rows kept, and a newer file is
refused with one line, unchanged (``run`` and ``status`` saying so: tests/cli/test_backup.py;
the event store: tests/api/test_api_events.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.contract.layout import registry_path
from orchestrator.host import registry_schema
from orchestrator.host.registry import Registry
from orchestrator.host.registry_schema import SCHEMA_VERSION
from orchestrator.host.schema_version import SchemaTooNew, migrate, version_of
from tests.support.helpers import table_columns


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return version_of(conn)


def set_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


def recording(n: int, ran: list[int], fail_at: int | None = None) -> list:
    def step(k: int):
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(f"CREATE TABLE t{k} (x)")
            if k == fail_at:
                raise sqlite3.OperationalError(f"migration {k} failed")
            ran.append(k)
        return run
    return [step(k) for k in range(1, n + 1)]


@pytest.mark.parametrize(("start", "expected"), [
    (0, [1, 2, 3, 4]),  # a file from before versions: every migration (each must hold)
    (1, [2, 3, 4]),
    (3, [4]),
    (4, []),  # up to date: nothing written
])
def test_only_the_migrations_after_the_files_version_run_in_order(
        tmp_path: Path, start: int, expected: list[int]) -> None:
    db = tmp_path / "x.db"
    set_version(db, start)
    ran: list[int] = []
    conn = sqlite3.connect(db, isolation_level=None)
    for k in range(1, start + 1):  # what those migrations made
        conn.execute(f"CREATE TABLE t{k} (x)")
    assert migrate(conn, db, recording(4, ran)) == start
    assert ran == expected and version_of(conn) == 4
    conn.close()


def test_a_failed_migration_keeps_the_last_version_and_the_next_open_resumes(
        tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db, isolation_level=None)
    ran: list[int] = []
    with pytest.raises(sqlite3.OperationalError, match="migration 3 failed"):
        migrate(conn, db, recording(4, ran, fail_at=3))
    assert ran == [1, 2] and version_of(conn) == 2
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"t1", "t2"}  # migration 3's table rolled back with it
    ran.clear()
    migrate(conn, db, recording(4, ran))
    assert ran == [3, 4] and version_of(conn) == 4
    conn.close()


def test_a_newer_file_is_refused_with_one_line_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    set_version(db, 7)
    conn = sqlite3.connect(db, isolation_level=None)
    ran: list[int] = []
    with pytest.raises(SchemaTooNew) as info:
        migrate(conn, db, recording(4, ran))
    text = str(info.value)
    assert "\n" not in text and str(db) in text
    assert "schema version 7 is newer than this orchestrator knows (4)" in text
    assert "restore a backup" in text
    assert ran == [] and version_of(conn) == 7
    conn.close()


# --- the registry -----------------------------------------------------------------------

OLD_SESSIONS = """
CREATE TABLE agent_groups (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, agent_group_id TEXT NOT NULL REFERENCES agent_groups(id),
    messaging_group_id TEXT, thread_id TEXT, resolution_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'active', container_status TEXT NOT NULL DEFAULT 'stopped',
    status_reason TEXT, last_active TEXT, last_heartbeat TEXT, created_at TEXT NOT NULL);
INSERT INTO agent_groups VALUES ('g', 'g', '2026-01-01T00:00:00.000Z');
INSERT INTO sessions (id, agent_group_id, resolution_key, status_reason, created_at)
    VALUES ('sess-old', 'g', 'k', 'kept', '2026-01-01T00:00:00.000Z');
"""


def test_a_registry_from_before_versions_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SESSIONS)  # an older commit's file: no queued_since, version 0
    conn.close()
    assert user_version(path) == 0
    with Registry(path) as reg:
        row = reg.session("sess-old")
        assert row is not None and row.status_reason == "kept"
    assert user_version(path) == SCHEMA_VERSION == len(registry_schema.MIGRATIONS)
    assert "queued_since" in table_columns(path, "sessions")
    assert "series" in {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_new_registry_carries_the_current_version(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    Registry(path).close()
    assert user_version(path) == SCHEMA_VERSION >= 2
    Registry(path).close()  # opening it again changes nothing
    assert user_version(path) == SCHEMA_VERSION


def test_a_newer_registry_is_refused_and_left_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = registry_path(data)
    Registry(path).close()
    set_version(path, SCHEMA_VERSION + 1)
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        Registry(path)
    with pytest.raises(SchemaTooNew):
        Registry.reader(path)
    assert path.read_bytes() == before  # nothing migrated, nothing written


def test_a_sessions_status_log_is_read_through_its_index(tmp_path: Path) -> None:
    """Migration 4: the timeline of one session among many is an index search, not a
    scan of every session's changes (the plan SQLite chooses says so)."""
    reg = Registry(tmp_path / "orchestrator.db")
    reg.close()
    with sqlite3.connect(tmp_path / "orchestrator.db") as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT at, old, new, reason FROM status_changes"
            " WHERE session_id=? ORDER BY id", ("s",)))
    assert "USING INDEX idx_status_changes_session" in plan, plan


def test_a_version_4_registry_gains_the_removals_journal_with_its_rows(tmp_path: Path) -> None:
    """Migration 5 (retention's journal): a registry written at version 4 keeps its
    sessions and gains ``removals``, which a removal then uses."""
    from orchestrator.host import removals

    path = registry_path(tmp_path)
    conn = sqlite3.connect(path, isolation_level=None)
    for step in registry_schema.MIGRATIONS[:4]:
        step(conn)
    conn.executescript(OLD_SESSIONS.split("CREATE TABLE sessions")[1].split(";", 1)[1]
                       .replace("INSERT INTO agent_groups", "INSERT OR IGNORE INTO agent_groups"))
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    assert "removals" not in {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    with Registry(path) as reg:
        assert user_version(path) == SCHEMA_VERSION == 5
        assert reg.session("sess-old") is not None
        assert removals.begin(reg, "sess-old", "delete") is not None
        assert reg.session("sess-old") is None and len(removals.pending(reg)) == 1
    assert table_columns(path, "removals") == ["session_id", "agent_group_id", "action",
                                               "rows", "started_at"]
