"""Every reader is contained (docs/contract.md §11): ``status.collect`` and
``series``, run over session folders an agent has made hostile — a FIFO, a symlink
to another session's file, a directory, a device, a huge file, a FIFO journal or a
locked database in place of each agent-writable thing — return within a bound, give
the bad session's row a one-line error and every other row in full."""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import pytest

from orchestrator.contract.layout import registry_path, session_paths
from orchestrator.host import safefs, status
from orchestrator.host.registry import Registry
from tests.support.hostile import build_world, release_fifos, table

BOUND = 5.0  # seconds: the whole command, every session included


def bounded(fn: Callable[[], Any], root: Path) -> Any:
    """``fn()`` in a daemon thread; fails if it has not returned within BOUND (and
    frees whatever FIFO caught it, so the thread ends)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(BOUND)
    if t.is_alive():
        release_fifos(root)
        t.join(BOUND)
        pytest.fail(f"the reader did not return within {BOUND}s (blocked)")
    assert time.monotonic() - start < BOUND
    if "error" in box:
        raise box["error"]
    return box["value"]


def collect(data_dir: Path) -> dict[str, status.StatusRow]:
    with Registry(registry_path(data_dir)) as reg:
        return {r.session_id: r for r in status.collect(data_dir, reg)}


def assert_good_rows_complete(rows: dict[str, status.StatusRow], world) -> None:
    for g in world.good:
        r = rows[g.id]
        assert r.error is None, r.error
        assert (r.pending, r.processing, r.failed, r.completed) == (1, 0, 0, 0)
        assert r.last_heartbeat is not None


CASES = table(Path("/tmp"))


@pytest.mark.parametrize(("target", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_status_collect_contains_one_hostile_session(tmp_path: Path, target: str,
                                                     kind: str) -> None:
    world = build_world(tmp_path / "data", [(target, kind)])
    bad = world.bad[(target, kind)]
    rows = bounded(lambda: collect(world.data_dir), tmp_path)
    assert set(rows) == {g.id for g in world.good} | {bad.id}
    assert_good_rows_complete(rows, world)
    err = rows[bad.id].error
    assert err and "\n" not in err, err
    if target == "session" and kind == "symlink":  # never the linked session's numbers
        assert rows[bad.id].pending == 0


@pytest.mark.parametrize("name", ["inbound.db", "outbound.db"])
def test_a_locked_database_costs_its_row_not_a_wait(tmp_path: Path, name: str) -> None:
    """Readers use busy timeout 0: an agent holding an exclusive lock forever is an
    error in its row at once, not 5 s per session."""
    world = build_world(tmp_path / "data", [])
    victim = world.good[1]
    db = session_paths(world.data_dir, "good", victim.id).root / name
    with closing(sqlite3.connect(db, isolation_level=None)) as lock:
        lock.execute("BEGIN EXCLUSIVE")
        start = time.monotonic()
        rows = bounded(lambda: collect(world.data_dir), tmp_path)
        assert time.monotonic() - start < 1.0
        lock.execute("ROLLBACK")
    assert "locked" in (rows[victim.id].error or "")
    for g in (world.good[0], world.good[2]):
        assert rows[g.id].error is None and rows[g.id].pending == 1


def test_a_reader_query_stops_at_its_deadline(tmp_path: Path) -> None:
    """A huge table (or any slow query) in an agent's DB: the reader's query is
    interrupted at its deadline instead of running as long as the agent likes."""
    world = build_world(tmp_path / "data", [])
    with safefs.SessionDir(world.data_dir, "good", world.good[0].id) as folder:
        conn = folder.reader("outbound.db", deadline=0.1).connect(readonly=True)
        start = time.monotonic()
        with closing(conn), pytest.raises(sqlite3.OperationalError, match="interrupted"):
            conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)"
                         " SELECT count(*) FROM n").fetchone()
        assert time.monotonic() - start < 2.0


def test_status_never_reads_through_a_linked_session_folder(tmp_path: Path) -> None:
    """The symlinked folder points at a good session with messages: the bad row shows
    an error and zeros, never the other session's counts or heartbeat."""
    world = build_world(tmp_path / "data", [("session", "symlink")])
    bad = world.bad[("session", "symlink")]
    row = bounded(lambda: collect(world.data_dir), tmp_path)[bad.id]
    assert "symlink" in (row.error or "")
    assert (row.pending, row.last_heartbeat) == (0, None)
