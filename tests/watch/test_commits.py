"""watch/commits.py, as folder_watch uses it: a batch of one session's changes that
ends a commit ends at once, and one with a commit under way waits for its end
(issue 28): the reply's commit is delivered, and the message's commit starts its
agent, a step sooner, and a slow fsync no longer splits one commit into two or three
passes."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from orchestrator.watch.changes import Change
from orchestrator.watch.commits import (
    COMMITTED,
    LONE_COMMIT_MAX,
    MAX_STRETCH,
    OPEN,
    STRETCH_FROM,
    commit_state,
    stretch_after,
)
from orchestrator.watch.folder_watch import FolderWatch

ROOT = "/data/sessions"
S1 = f"{ROOT}/grp/sess-1"
S2 = f"{ROOT}/grp/sess-2"
A, M, D = Change.added, Change.modified, Change.deleted
REPLY = {(M, f"{S1}/.heartbeat"), (A, f"{S1}/outbound.db-journal"),
         (M, f"{S1}/outbound.db"), (D, f"{S1}/outbound.db-journal")}


@pytest.mark.parametrize(("changes", "state"), [
    (REPLY, COMMITTED),  # an instant echo: heartbeat, then the reply's commit
    ({(A, f"{S1}/inbound.db-journal"), (M, f"{S1}/inbound.db"),
      (D, f"{S1}/inbound.db-journal")}, COMMITTED),  # a message (or a delivery record)
    ({(D, f"{S1}/outbound.db-journal")}, COMMITTED),  # the end of a commit seen before
    (REPLY | {(A, f"{S1}/outbox/out-1"), (M, f"{S1}/outbox/out-1")}, COMMITTED),  # files
    (REPLY - {(D, f"{S1}/outbound.db-journal")}, OPEN),  # the commit is not over yet
    ({(M, f"{S1}/outbound.db-journal")}, OPEN),  # a batch opened by the fsync's gap
    ({(M, f"{S1}/.heartbeat")}, None),  # a heartbeat alone: no commit at all
    ({(M, f"{S1}/outbound.db")}, None),
    ({(D, f"{S1}/outbox/outbound.db-journal")}, None),  # a file in outbox/ is no journal
    ({(D, f"{S1}/outbound.db")}, None),  # the database itself removed: no commit
    (REPLY | {(M, f"{S2}/.heartbeat")}, None),  # two sessions: the step coalesces them
    ({(A, f"{S1}/outbound.db-journal"), (M, f"{S2}/.heartbeat")}, None),  # nor waits
    (REPLY | {(A, f"{ROOT}/grp/sess-3")}, None),  # a new session folder
    (REPLY | {(A, f"{ROOT}/grp2")}, None),  # a new group
    ({(D, "/data/sessionsX/grp/sess-1/outbound.db-journal")}, None),  # not under root
    ({(M, f"{S1}/f{i}") for i in range(LONE_COMMIT_MAX)}
     | {(D, f"{S1}/outbound.db-journal")}, None),  # a big batch keeps the step
    (set(), None),
])
def test_commit_state(changes: set[tuple[Change, str]], state: str | None) -> None:
    assert commit_state(ROOT, changes) == state


@pytest.mark.parametrize(("stretch", "size", "fresh", "after"), [
    (0, STRETCH_FROM, True, 1),  # a busy host's batch, still growing: reads less often
    (1, 200, True, 2),
    (MAX_STRETCH, 500, True, MAX_STRETCH),  # never more than 12 ms between reads
    (1, 200, False, 1),  # nothing new: the batch ends anyway (``FolderWatch.watch``)
    (0, STRETCH_FROM - 1, True, 0),  # a paced load's batch: a commit or two per step
    (0, len(REPLY), True, 0),  # a round trip's: ends at its commit, never stretched
    (0, 1, True, 0),
])
def test_stretch_after(stretch: int, size: int, fresh: bool, after: int) -> None:
    assert stretch_after(stretch, size, fresh) == after


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    (folder / "outbox").mkdir(parents=True)
    _commit(folder / "outbound.db")  # the file exists before the watch: only commits follow
    return root, folder


def _commit(db: Path, hold: float = 0.0) -> None:
    """One write transaction as an agent or the host makes it (journal_mode=DELETE),
    ``hold`` s between its first write and its commit."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        time.sleep(hold)  # the transaction stays open: the test's point, not a wait
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_real_commit_ends_the_batch_before_the_step(tmp_path: Path) -> None:
    """A real SQLite commit in a session folder returns well before a 2 s step; a
    heartbeat alone is held for the step (more may follow)."""
    root, folder = _tree(tmp_path)
    with FolderWatch(root) as watch:
        _commit(folder / "outbound.db")
        t0 = time.monotonic()
        got = watch.watch(debounce_ms=10000, step_ms=2000, timeout_ms=0, stop_event=None)
        took = time.monotonic() - t0
        assert isinstance(got, set)
        assert (Change.deleted, f"{folder}/outbound.db-journal") in got
        assert took < 1.5, took

        (folder / ".heartbeat").touch()
        t0 = time.monotonic()
        got = watch.watch(debounce_ms=10000, step_ms=2000, timeout_ms=0, stop_event=None)
        assert isinstance(got, set) and got
        assert time.monotonic() - t0 >= 1.9


def test_a_batch_with_a_commit_under_way_waits_for_its_end(tmp_path: Path) -> None:
    """A transaction held open for 0.5 s, steps of 20 ms: the batch is returned once,
    with the commit's end in it, not in the quiet of the open transaction."""
    root, folder = _tree(tmp_path)
    with FolderWatch(root) as watch:
        writer = threading.Thread(target=_commit, args=(folder / "outbound.db", 0.5))
        writer.start()
        try:
            got = watch.watch(debounce_ms=10000, step_ms=20, timeout_ms=0, stop_event=None)
        finally:
            writer.join()
        assert isinstance(got, set)
        assert (Change.added, f"{folder}/outbound.db-journal") in got
        assert (Change.deleted, f"{folder}/outbound.db-journal") in got


def test_an_open_commit_is_waited_for_no_longer_than_the_debounce(tmp_path: Path) -> None:
    """A journal left behind (a writer that died mid-commit) holds a batch for the
    debounce at most."""
    root, folder = _tree(tmp_path)
    with FolderWatch(root) as watch:
        (folder / "outbound.db-journal").write_bytes(b"x")
        t0 = time.monotonic()
        got = watch.watch(debounce_ms=300, step_ms=20, timeout_ms=0, stop_event=None)
        took = time.monotonic() - t0
        assert isinstance(got, set) and got
        assert 0.25 <= took < 2.0, took
