"""The watch budget: what the host may use, what it says, and the sessions past it
(orchestrator.watch.budget, .polled, FolderWatch's ``limit``), on real inotify."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.watch import budget
from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import FolderWatch
from orchestrator.watch.polled import GONE, PolledSessions, changes_between, mark_of
from orchestrator.watch.watch_table import watched_folders
from tests.support.helpers import wait_for


@pytest.mark.parametrize(("limit", "allowed"), [
    (None, None), (192_540, 192_540 - 9627), (8192, 8192 - 512), (100, 1)])
def test_usable_leaves_a_reserve(limit: int | None, allowed: int | None) -> None:
    assert budget.usable(limit) == allowed


@pytest.mark.parametrize(("sessions", "groups", "value"), [
    (0, 0, 65536), (10_000, 1, 65536), (100_000, 1, 524288), (200_000, 10, 1048576)])
def test_suggested_covers_every_session_and_its_outbox(sessions: int, groups: int,
                                                       value: int) -> None:
    assert budget.suggested(sessions, groups) == value
    assert value >= 2 * (1 + groups + 2 * sessions)


@pytest.mark.parametrize(("polled", "rate", "interval", "seconds"), [
    (0, 4000, 1.0, 1.0), (100, 4000, 1.0, 1.0), (40_000, 4000, 1.0, 10.0)])
def test_poll_round(polled: int, rate: float, interval: float, seconds: float) -> None:
    assert budget.poll_round(polled, rate, interval) == seconds


def test_warning_names_the_sysctl_and_the_value() -> None:
    line = budget.warning(sessions=100_000, groups=1, polled=40_000,
                          limit=budget.Limit(63_000, "user.max_inotify_watches"),
                          allowed=60_000, kernel_refused=False, poll_round=10.0)
    assert line is not None
    assert "user.max_inotify_watches=63000" in line and "40000 sessions" in line
    assert "'sysctl -w user.max_inotify_watches=524288'" in line and "10.0s" in line
    assert budget.warning(sessions=5, groups=1, polled=0, limit=None, allowed=None,
                          kernel_refused=False, poll_round=1.0) is None


def _sessions(root: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        folder = root / "grp" / f"s{i}"
        (folder / "outbox").mkdir(parents=True)
        out.append(folder)
    return out


def test_marks_and_changes(tmp_path: Path) -> None:
    folder = _sessions(tmp_path, 1)[0]
    before = mark_of(str(folder))
    (folder / "outbound.db-journal").write_bytes(b"")  # a commit's side file
    (folder / "outbound.db-journal").unlink()
    after = mark_of(str(folder))
    assert changes_between(str(folder), before, after) == [
        (Change.modified, f"{folder}/outbound.db"), (Change.modified, f"{folder}/inbound.db")]
    (folder / "outbox" / "r-1").mkdir()
    assert changes_between(str(folder), after, mark_of(str(folder))) == [
        (Change.added, f"{folder}/outbox")]
    assert mark_of(str(tmp_path / "nope")) == GONE
    assert changes_between(str(folder), after, GONE) == [(Change.deleted, str(folder))]


def test_polled_sessions_are_looked_at_no_faster_than_the_rate(tmp_path: Path) -> None:
    folders = _sessions(tmp_path, 10)
    now = [0.0]
    polled = PolledSessions(rate=4, interval=1.0, clock=lambda: now[0])
    for f in folders:
        polled.add(str(f), f.stat().st_ino)
    for f in folders:
        (f / "x").write_bytes(b"")
    changes: set = set()
    now[0] = 1.0  # 4 looks a second: 4 of the 10 are seen
    assert len(polled.due(changes)) == 4
    now[0] = 2.0
    assert len(polled.due(changes)) == 4
    now[0] = 3.0
    assert len(polled.due(changes)) == 2  # the round's end; nothing else changed
    assert len(changes) == 20


def test_sessions_past_the_limit_are_polled_and_promoted_on_activity(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    folders = _sessions(root, 6)
    # the root, the group and 3 sessions: the other 3 are polled
    with FolderWatch(root, limit=5, poll_interval=0.05) as watch:
        assert watch.counts() == (5, 3)
        polled = sorted(watch.polled.marks)
        # every folder is covered: the health check finds none unwatched
        covered = {f.stat().st_ino for f in folders} | {root.stat().st_ino,
                                                        (root / "grp").stat().st_ino}
        assert watch.watched_inodes() == covered
        target = Path(polled[0])
        (target / "inbound.db-journal").write_bytes(b"")
        got: set = set()

        def seen() -> bool:
            raw = watch.watch(debounce_ms=20, step_ms=5, timeout_ms=50, stop_event=None)
            if isinstance(raw, set):
                got.update(raw)
            return (Change.modified, f"{target}/inbound.db") in got

        wait_for(seen, timeout=5, interval=0, message="the polled session's change")
        # promoted: it holds a watch now, one that went longest without an event does not
        assert str(target) in watched_folders(watch)
        assert watch.counts() == (5, 3)
        (target / "inbound.db").write_bytes(b"")  # its events come from inotify now
        got.clear()
        wait_for(seen, timeout=5, interval=0, message="the promoted session's event")


def test_a_new_session_past_the_limit_takes_the_place_of_a_dormant_one(
        tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    _sessions(root, 3)
    with FolderWatch(root, limit=5) as watch:
        assert watch.counts() == (5, 0)
        new = root / "grp" / "s-new"
        new.mkdir()
        got: set = set()
        wait_for(lambda: (got.update(r) if isinstance(
            r := watch.watch(debounce_ms=20, step_ms=5, timeout_ms=50, stop_event=None), set)
            else None) or (Change.added, str(new)) in got, timeout=5, interval=0,
            message="the new session")
        assert str(new) in watched_folders(watch)
        assert watch.counts() == (5, 1)  # the least recently active one is polled
