"""A batch that is one session's finished commit ends at once (issue 28): the reply's
commit is delivered, and the message's commit starts its agent, a step sooner."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import LONE_COMMIT_MAX, FolderWatch, lone_commit

ROOT = "/data/sessions"
S1 = f"{ROOT}/grp/sess-1"
S2 = f"{ROOT}/grp/sess-2"
A, M, D = Change.added, Change.modified, Change.deleted
REPLY = {(M, f"{S1}/.heartbeat"), (A, f"{S1}/outbound.db-journal"),
         (M, f"{S1}/outbound.db"), (D, f"{S1}/outbound.db-journal")}


@pytest.mark.parametrize(("changes", "lone"), [
    (REPLY, True),  # an instant echo: heartbeat, then the reply's commit
    ({(A, f"{S1}/inbound.db-journal"), (M, f"{S1}/inbound.db"),
      (D, f"{S1}/inbound.db-journal")}, True),  # a message (or a delivery record)
    (REPLY | {(A, f"{S1}/outbox/out-1"), (M, f"{S1}/outbox/out-1")}, True),  # with files
    (REPLY - {(D, f"{S1}/outbound.db-journal")}, False),  # the commit is not over yet
    ({(M, f"{S1}/.heartbeat")}, False),  # a heartbeat alone: nothing committed
    ({(D, f"{S1}/outbox/outbound.db-journal")}, False),  # a file in outbox/ is no journal
    ({(D, f"{S1}/outbound.db")}, False),  # the database itself removed: no commit
    (REPLY | {(M, f"{S2}/.heartbeat")}, False),  # two sessions: the step coalesces them
    (REPLY | {(A, f"{ROOT}/grp/sess-3")}, False),  # a new session folder
    (REPLY | {(A, f"{ROOT}/grp2")}, False),  # a new group
    ({(D, "/data/sessionsX/grp/sess-1/outbound.db-journal")}, False),  # not under root
    ({(M, f"{S1}/f{i}") for i in range(LONE_COMMIT_MAX)}
     | {(D, f"{S1}/outbound.db-journal")}, False),  # a big batch keeps the step
    (set(), False),
])
def test_lone_commit(changes: set[tuple[Change, str]], lone: bool) -> None:
    assert lone_commit(ROOT, changes) is lone


def _commit(db: Path) -> None:
    """One write transaction as an agent or the host makes it (journal_mode=DELETE)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_real_commit_ends_the_batch_before_the_step(tmp_path: Path) -> None:
    """A real SQLite commit in a session folder returns well before a 2 s step; a
    heartbeat alone is held for the step (more may follow)."""
    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    (folder / "outbox").mkdir(parents=True)
    _commit(folder / "outbound.db")  # the file exists before the watch: only commits follow
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
