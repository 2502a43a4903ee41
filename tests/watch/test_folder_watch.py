"""The host's inotify watch (watch.folder_watch, watch_table): real inotify on real folders."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.contract.inotify import IN_ATTRIB, IN_CREATE, IN_DELETE, IN_MOVED_TO
from orchestrator.watch import health as watch_health
from orchestrator.watch.folder_watch import (
    ADDED,
    DELETED,
    MODIFIED,
    FolderWatch,
    change_of,
    read_pause,
)
from orchestrator.watch.watch_table import watched_folders, watched_level
from tests.support.helpers import wait_for


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    (folder / "outbox").mkdir(parents=True)
    (folder / "inbox").mkdir()
    (folder / "inbound.db").write_bytes(b"")
    return root, folder


def _outside(tmp_path: Path) -> Path:
    """A folder tree outside the sessions root: 30 folders an agent would like watched."""
    out = tmp_path / "host"
    for i in range(10):
        (out / f"d{i}" / "a" / "b").mkdir(parents=True)
    return out


def _collect(watch: FolderWatch, want, timeout: float = 5.0) -> set[tuple[int, str]]:
    got: set[tuple[int, str]] = set()

    def more() -> bool:
        raw = watch.watch(debounce_ms=50, step_ms=5, timeout_ms=50, stop_event=None)
        if isinstance(raw, set):
            got.update(raw)
        return want(got)

    wait_for(more, timeout=timeout, interval=0, message="the expected changes")
    return got


def _watch(root: Path) -> FolderWatch:
    return FolderWatch(root)


def _overflow(folder: Path) -> None:
    """More events than the kernel queues while nobody reads: the queue overflows."""
    files = [folder / ".heartbeat", folder / "outbound.db"]
    for f in files:
        f.touch()
    for i in range(watch_health.queue_limit() + 100):
        os.utime(files[i % 2])  # (the kernel merges an event equal to the last one)


@pytest.mark.parametrize("mask,change", [
    (IN_CREATE, ADDED), (IN_MOVED_TO, ADDED), (IN_DELETE, DELETED),
    (IN_ATTRIB, MODIFIED), (0, None)])
def test_change_of(mask: int, change: int | None) -> None:
    assert change_of(mask) == change


@pytest.mark.parametrize("depth,name,watched", [
    (1, "grp", True), (2, "sess-1", True), (3, "outbox", True), (3, "inbox", False),
    (3, "x", False), (4, "r-1", False), (4, "outbox", False)])
def test_watched_level(depth: int, name: str, watched: bool) -> None:
    assert watched_level(depth, name) is watched


def test_watches_the_root_groups_sessions_and_outboxes_only(tmp_path: Path) -> None:
    """A session present at start costs one watch; its outbox/ gets one at its first
    event, before that event is returned (a dormant session: 1 watch, not 2)."""
    root, folder = _tree(tmp_path)
    (folder / "outbox" / "r-1").mkdir()
    with _watch(root) as watch:
        assert watched_folders(watch) == [str(root), str(root / "grp"), str(folder)]
        assert len(watch_health.watched_inodes(watch.fd)) == 3
        (folder / ".heartbeat").touch()
        _collect(watch, lambda g: (ADDED, str(folder / ".heartbeat")) in g)
        assert watched_folders(watch) == [str(root), str(root / "grp"), str(folder),
                                          str(folder / "outbox")]
        assert len(watch_health.watched_inodes(watch.fd)) == 4
        (folder / "outbox" / "r-2").mkdir()
        _collect(watch, lambda g: (ADDED, str(folder / "outbox" / "r-2")) in g)


def test_a_link_to_a_folder_present_at_start_is_not_followed(tmp_path: Path) -> None:
    root, folder = _tree(tmp_path)
    outside = _outside(tmp_path)
    (folder / "outbox" / "x").symlink_to(outside)
    (folder / "evil").symlink_to(outside)
    (folder / "outbox" / "r-1").mkdir()
    (folder / "outbox" / "r-1" / "y").symlink_to(outside)
    with _watch(root) as watch:
        assert len(watch_health.watched_inodes(watch.fd)) == 3
        (outside / "d0" / "touched").write_text("x")
        (folder / ".heartbeat").touch()
        got = _collect(watch, lambda g: any(p.endswith(".heartbeat") for _, p in g))
        assert len(watch_health.watched_inodes(watch.fd)) == 4  # + its outbox/, no more
        (outside / "d1" / "touched").write_text("x")
        (folder / "outbox" / "r-3").mkdir()
        got |= _collect(watch, lambda g: any(p.endswith("r-3") for _, p in g))
    assert not any("touched" in p for _, p in got), got


def test_a_folder_renamed_in_with_links_inside_adds_no_watch_outside(tmp_path: Path) -> None:
    """The attack on a recursive watch: build a folder holding a link elsewhere, then
    rename it into outbox/ (and a whole session folder into the group)."""
    root, folder = _tree(tmp_path)
    outside = _outside(tmp_path)
    with _watch(root) as watch:
        (folder / ".heartbeat").touch()  # active: its outbox/ is watched
        _collect(watch, lambda g: (ADDED, str(folder / ".heartbeat")) in g)
        staged = tmp_path / "staged"
        staged.mkdir()
        (staged / "x").symlink_to(outside)
        os.rename(staged, folder / "outbox" / "r-2")
        sess = tmp_path / "sess-2"
        (sess / "outbox").mkdir(parents=True)
        (sess / "outbox" / "z").symlink_to(outside)
        (sess / "ln").symlink_to(outside)
        os.rename(sess, root / "grp" / "sess-2")
        got = _collect(watch, lambda g: (ADDED, str(root / "grp" / "sess-2" / "outbox")) in g)
        assert (ADDED, str(folder / "outbox" / "r-2")) in got
        assert watched_folders(watch) == sorted([
            str(root), str(root / "grp"), str(folder), str(folder / "outbox"),
            str(root / "grp" / "sess-2"), str(root / "grp" / "sess-2" / "outbox")])
        assert len(watch_health.watched_inodes(watch.fd)) == 6


def test_a_link_in_place_of_a_session_folder_is_not_watched(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    outside = _outside(tmp_path)
    (root / "grp" / "sess-linked").symlink_to(outside)
    (root / "linked-group").symlink_to(outside)
    with _watch(root) as watch:
        assert len(watch_health.watched_inodes(watch.fd)) == 3
        (root / "grp" / "sess-late").symlink_to(outside)
        (outside / "d1" / "touched").write_text("x")
        got = _collect(watch, lambda g: (ADDED, str(root / "grp" / "sess-late")) in g)
        assert len(watch_health.watched_inodes(watch.fd)) == 3
    assert not any("touched" in p for _, p in got)


def test_a_new_session_is_watched_before_its_event_is_returned(tmp_path: Path) -> None:
    """Whatever is written in a new folder after the batch that reports it has an
    event of its own: the watch was added while that batch was read."""
    root, _ = _tree(tmp_path)
    with _watch(root) as watch:
        new = root / "grp" / "sess-9"
        new.mkdir()
        (new / "outbox").mkdir()
        _collect(watch, lambda g: (ADDED, str(new)) in g)
        (new / "outbound.db").write_bytes(b"x")
        (new / "outbox" / "r-1").mkdir()
        got = _collect(watch, lambda g: {(ADDED, str(new / "outbound.db")),
                                         (ADDED, str(new / "outbox" / "r-1"))} <= g)
        assert got


def test_a_removed_session_drops_its_watches(tmp_path: Path) -> None:
    root, folder = _tree(tmp_path)
    with _watch(root) as watch:
        for sub in ("outbox", "inbox"):
            (folder / sub).rmdir()
        (folder / "inbound.db").unlink()
        folder.rmdir()
        _collect(watch, lambda g: (DELETED, str(folder)) in g)
        wait_for(lambda: watch.watch(debounce_ms=5, step_ms=1, timeout_ms=5,
                                     stop_event=None) is not None
                 and watched_folders(watch) == [str(root), str(root / "grp")], timeout=5,
                 interval=0, message="the removed folders' watches gone")


def test_a_queue_overflow_is_reported(tmp_path: Path) -> None:
    root, folder = _tree(tmp_path)
    with _watch(root) as watch:
        _overflow(folder)
        watch.watch(debounce_ms=20, step_ms=5, timeout_ms=20, stop_event=None)
        assert watch.take_lost() == "the kernel's inotify queue overflowed"
        assert watch.take_lost() is None


def test_a_stop_event_ends_the_wait(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)

    class Stop:
        calls = 0

        def is_set(self) -> bool:
            Stop.calls += 1
            return Stop.calls > 3

    with _watch(root) as watch:
        assert watch.watch(debounce_ms=50, step_ms=1, timeout_ms=0, stop_event=Stop()) == "stop"
        assert watch.watch(debounce_ms=50, step_ms=1, timeout_ms=10, stop_event=None) == "timeout"


def test_a_folder_made_while_events_were_lost_is_watched_after_the_overflow(
        tmp_path: Path) -> None:
    """Its creation event is among the lost: the overflow makes the watch walk its
    folders again, so the new session is watched (and reported) all the same."""
    root, folder = _tree(tmp_path)
    with _watch(root) as watch:
        _overflow(folder)
        new = root / "grp" / "sess-new"
        (new / "outbox").mkdir(parents=True)  # the queue is full: no event for these
        got = watch.watch(debounce_ms=20, step_ms=5, timeout_ms=20, stop_event=None)
        assert watch.take_lost() == "the kernel's inotify queue overflowed"
        assert {(ADDED, str(new)), (ADDED, str(new / "outbox"))} <= got
        assert {str(new), str(new / "outbox")} <= set(watched_folders(watch))
        assert watch.watched_inodes() == watch_health.watched_inodes(watch.fd)


def test_a_root_that_cannot_be_watched_leaves_no_descriptor(tmp_path: Path) -> None:
    before = watch_health.inotify_fds()
    with pytest.raises(FileNotFoundError):
        FolderWatch(tmp_path / "missing")
    assert watch_health.inotify_fds() == before


def test_a_batch_ends_one_step_after_the_last_change_not_at_the_debounce(
        tmp_path: Path) -> None:
    """(A step with nothing new ends the batch: holding it to ``debounce_ms`` added
    ~20 ms to every reply.)"""
    import time

    root, folder = _tree(tmp_path)
    with _watch(root) as watch:
        (folder / ".heartbeat").touch()
        t0 = time.monotonic()
        got = watch.watch(debounce_ms=3000, step_ms=5, timeout_ms=0, stop_event=None)
        assert isinstance(got, set) and got
        assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("first, read_at, now, expected", [
    # no batch open, nothing read for a gap: wait for the kernel (poll), read at once
    (None, -1e9, 10.0, None),
    (None, 9.990, 10.0, None),  # 10 ms ago: past the 3 ms gap
    (None, 9.999, 10.0, 0.002),  # events read 1 ms ago (all dropped): 2 ms more
    # a batch open since 10.000: the next read a step (5 ms) after the last one ...
    (10.000, 10.001, 10.002, 0.004),
    (10.000, 10.010, 10.010, 0.005),
    (10.000, 10.030, 10.031, 0.004),
    # ... never past the batch's debounce (50 ms after its first event)
    (10.000, 10.048, 10.048, 0.002),
    (10.000, 10.049, 10.060, 0.0),  # late already: read at once
])
def test_read_pause(first: float | None, read_at: float, now: float,
                    expected: float | None) -> None:
    got = read_pause(3, 5, 50, first, read_at, now)
    assert got == expected if expected is None else got == pytest.approx(expected, abs=1e-9)


def test_a_burst_of_writes_is_one_change_and_scratch_files_none(tmp_path: Path) -> None:
    """A session folder's scratch files are not reported (no pass reads them), and a
    file written many times in a batch is one change."""
    root = tmp_path / "sessions"
    folder = root / "grp" / "sess-1"
    folder.mkdir(parents=True)
    with FolderWatch(root) as watch:
        with open(folder / "outbound.db", "wb") as fh:
            for _ in range(50):
                fh.write(b"x")
                fh.flush()
        for name in ("scratch.txt", "outbound.db-wal"):
            (folder / name).write_bytes(b"y")
            os.unlink(folder / name)
        got: set = set()
        wait_for(lambda: (got.update(r) if isinstance(
            r := watch.watch(debounce_ms=50, step_ms=5, timeout_ms=50, stop_event=None), set)
            else None) or (2, f"{folder}/outbound.db") in got, timeout=5, interval=0,
            message="the write")
        assert all(p == f"{folder}/outbound.db" for _, p in got), got


class _CountingWatch(FolderWatch):
    """FolderWatch that counts its reads of the queue (each one is a wake-up)."""

    reads = 0

    def _read(self, changes: set) -> bool:
        self.reads += 1
        return super()._read(changes)


def test_a_busy_batch_reads_less_often_as_it_grows(tmp_path: Path) -> None:
    """Many sessions writing without a pause (a busy host): the batch runs to its
    debounce either way, and reads the queue every 3, 6, then 12 ms
    (``commits.stretch_after``), not every 3 ms. A writer process keeps 40 sessions
    busy for longer than the batch lasts."""
    root = tmp_path / "sessions"
    folders = [root / "grp" / f"sess-{i}" for i in range(40)]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "outbound.db").write_bytes(b"")
    script = ("import os, sys, time\n"
              "end = time.monotonic() + 3\n"
              "paths = sys.argv[1:]\n"
              "while time.monotonic() < end:\n"
              "    for p in paths:\n"
              "        os.utime(p)\n"
              "    time.sleep(0.0005)\n")
    with _CountingWatch(root) as watch:
        writer = subprocess.Popen([sys.executable, "-c", script,
                                   *(str(f / "outbound.db") for f in folders)])
        try:
            first = watch.watch(debounce_ms=100, step_ms=3, timeout_ms=2000, stop_event=None)
            assert isinstance(first, set) and first  # (the writer's first touches)
            watch.reads = 0
            t0 = time.monotonic()
            got = watch.watch(debounce_ms=100, step_ms=3, timeout_ms=2000, stop_event=None)
            took = time.monotonic() - t0
        finally:
            writer.kill()
            writer.wait()
    assert isinstance(got, set) and len({p for _, p in got}) == 40
    if took >= 0.09:  # the batch ran to its debounce: the writer kept it growing
        # every 3 ms: ~33 reads; stretched: 3, 6, 12, 12, … ms: ~10
        assert watch.reads <= 16, watch.reads
