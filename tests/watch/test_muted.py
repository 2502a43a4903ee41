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
