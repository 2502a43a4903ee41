"""watch.muted and the quiet watch of a muted session (folder_watch): a muted agent's
heartbeat touches wake nobody; once unmuted, its heartbeats are reported again, and one
is reported at once so that a touch made while nobody listened is not lost."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import FolderWatch
from orchestrator.watch.muted import Muted
from tests.support.helpers import wait_for


def test_muted_records_what_left_it_once() -> None:
    m = Muted()
    m.add("a")
    m.add("b")
    m.discard("a")
    m.discard("a")
    m.discard("never-muted")
    assert "a" not in m and "b" in m and len(m) == 1 and list(m) == ["b"]
    assert m.has_left() and m.take_left() == ["a"]
    assert not m.has_left() and m.take_left() == []


def _batch(watch: FolderWatch) -> set:
    raw = watch.watch(debounce_ms=20, step_ms=5, timeout_ms=60, stop_event=None)
    return raw if isinstance(raw, set) else set()


def test_a_muted_session_is_watched_quietly_until_unmuted(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    folder.mkdir(parents=True)
    beat = folder / ".heartbeat"
    beat.touch()
    muted = Muted()
    muted.add("sess-1")
    with FolderWatch(root, muted=muted) as watch:
        os.utime(beat)  # dropped as it is read; the watch then stops asking for them
        wait_for(lambda: "sess-1" in watch._quieted or bool(_batch(watch)), timeout=5,
                 interval=0, message="the watch quieted")
        assert _batch(watch) == set()
        got: set = set()
        read_at = watch._read_at
        for _ in range(5):  # nothing queued at all: not even a wake-up
            os.utime(beat)
            got |= _batch(watch)
        assert got == set() and watch._read_at == read_at
        (folder / "outbound.db").write_bytes(b"x")  # a write is still seen
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.modified, f"{folder}/outbound.db") in got),
                 timeout=5, interval=0, message="the write")
        assert (Change.modified, str(beat)) not in got
        muted.add("sess-1")
        muted.discard("sess-1")
        muted.add("sess-1")  # muted again before the watch looked: stays quiet
        os.utime(beat)
        assert _batch(watch) == set()
        muted.discard("sess-1")  # unmuted: one heartbeat at once, then every touch
        wait_for(lambda: (Change.modified, str(beat)) in _batch(watch), timeout=5,
                 interval=0, message="the heartbeat on unmute")
        assert "sess-1" not in watch._quieted
        os.utime(beat)
        wait_for(lambda: (Change.modified, str(beat)) in _batch(watch), timeout=5,
                 interval=0, message="a touch once unmuted")


def test_a_muted_sessions_inbound_writes_are_dropped(tmp_path: Path) -> None:
    """The host's own delivery records (a commit to inbound.db: its journal made,
    written, deleted, the database written) of a muted session wake nobody; its
    outbound.db commits do; inbound.db made anew is still reported; unmuted, every
    inbound.db write is reported again."""
    from orchestrator.contract import schema

    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    folder.mkdir(parents=True)
    schema.init_inbound(folder / "inbound.db")
    schema.init_outbound(folder / "outbound.db")
    muted = Muted()
    muted.add("sess-1")

    def commit(name: str) -> None:
        with schema.opened(folder / name) as conn, schema.transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
            conn.execute("INSERT INTO t VALUES (1)")

    def seen(name: str) -> set:
        got: set = set()
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.modified, f"{folder}/{name}") in got),
                 timeout=5, interval=0, message=f"{name} written")
        return got

    with FolderWatch(root, muted=muted) as watch:
        commit("inbound.db")
        commit("outbound.db")  # read after the inbound commit: it was read and dropped
        got = seen("outbound.db")
        assert not {p for _, p in got if "inbound.db" in p}, got
        (folder / "inbound.db").rename(folder / "old.db")
        (folder / "old.db").rename(folder / "inbound.db")  # made anew: reported
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.added, f"{folder}/inbound.db") in got),
                 timeout=5, interval=0, message="inbound.db made anew")
        muted.discard("sess-1")
        commit("inbound.db")
        got = seen("inbound.db")
        assert (Change.deleted, f"{folder}/inbound.db-journal") in got


def test_a_session_whose_queued_pass_reads_outbound_has_its_commits_dropped(
        tmp_path: Path) -> None:
    """``Muted.reading`` (a pass is queued that will read outbound.db): its outbound.db
    writes and journal are dropped as they are read; once its pass begins (out of the
    set) a commit is reported again, and outbound.db made anew always is."""
    from orchestrator.contract import schema

    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    folder.mkdir(parents=True)
    schema.init_outbound(folder / "outbound.db")
    muted = Muted()
    muted.reading.add("sess-1")

    def commit() -> None:
        with schema.opened(folder / "outbound.db") as conn, schema.transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
            conn.execute("INSERT INTO t VALUES (1)")

    with FolderWatch(root, muted=muted) as watch:
        commit()
        (folder / "inbox").mkdir()  # read after the commit: the commit was dropped
        got: set = set()
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.added, f"{folder}/inbox") in got),
                 timeout=5, interval=0, message="inbox/ made")
        assert not {p for _, p in got if "outbound.db" in p}, got
        (folder / "outbound.db").rename(folder / "old.db")
        (folder / "old.db").rename(folder / "outbound.db")
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.added, f"{folder}/outbound.db") in got),
                 timeout=5, interval=0, message="outbound.db made anew")
        muted.reading.discard("sess-1")  # its pass began
        commit()
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.deleted, f"{folder}/outbound.db-journal") in got),
                 timeout=5, interval=0, message="the commit after the pass began")
