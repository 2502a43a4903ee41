"""Lost inotify events: the signs (pure, as a table), the kernel's view of our own
instance (real inotify), and the watcher's restart-and-rescan path driven branch by
branch with a stand-in notifier (a scripted ``inotify_thread.Notifier``)."""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import shutil
from pathlib import Path

import pytest
from loguru import logger

from bench.overflow import overflow_run
from orchestrator.config.sections import WatchConfig
from orchestrator.contract.layout import Kind
from orchestrator.host.sessions import create_folder
from orchestrator.watch import health as watch_health
from orchestrator.watch.activity import RESCAN, Activity
from orchestrator.watch.folder_watch import FolderWatch
from orchestrator.watch.inotify_thread import PROBE
from orchestrator.watch.watcher import inotify_batches
from tests.support.e2e import run
from tests.support.fakes import FakeNotify
from tests.support.helpers import until, wait_for

Q = 16384


@pytest.mark.parametrize(("gap", "pending", "batch", "sign"), [
    (0.003, 0, 1, None),                      # a normal step
    (1.9, 0, 1, None),                        # a slow step on a loaded host, not a stall
    (2.0, 0, 0, "did not run for 2.0s"),      # stopped or starved: agents went on writing
    (30.0, 0, 0, "did not run for 30.0s"),
    (0.003, Q * 8 - 1, 0, None),              # the watch is a little behind
    (0.003, Q * 8, 0, "queue is filling up"),  # half the queue, were events the smallest
    (0.003, 0, Q // 2 - 1, None),
    (0.003, 0, Q // 2, "changes in one batch"),
])
def test_loss_sign(gap: float, pending: int, batch: int, sign: str | None) -> None:
    found = watch_health.loss_sign(gap=gap, pending=pending, batch=batch, queue=Q)
    assert (found is None) if sign is None else (found is not None and sign in found), found


def test_loss_sign_with_a_tiny_queue() -> None:
    assert watch_health.loss_sign(gap=0, pending=0, batch=1, queue=1) is not None
    assert watch_health.loss_sign(gap=0, pending=8, batch=0, queue=1) is not None


@pytest.mark.parametrize(("events", "expected"), [
    # (time, sign) in order -> the rescans made: (time, warned)
    ([(0.0, "s")], [(0.0, True)]),
    ([(0.0, "s"), (0.3, "s"), (0.6, None), (1.0, None)], [(0.0, True), (1.0, False)]),
    ([(0.0, "s"), (0.5, "s"), (1.2, "s"), (2.1, None), (2.2, None)],
     [(0.0, True), (1.2, False)]),  # the rescan at 1.2 comes after its sign: none owed
    ([(0.0, "s"), (5.0, "s")], [(0.0, True), (5.0, True)]),  # a new episode: warned again
    ([(0.0, "s"), (4.0, "s"), (8.0, "s")],  # one long episode: warned once
     [(0.0, True), (4.0, False), (8.0, False)]),
    ([(0.0, None), (1.0, None)], []),
])
def test_loss_episodes(events: list, expected: list) -> None:
    episodes = watch_health.Episodes()
    made = []
    for now, sign in events:
        rescan = episodes.step(sign, now)
        if rescan is not None:
            made.append((now, rescan[1]))
    assert made == expected


def test_an_owed_rescan_says_when_it_is_due() -> None:
    episodes = watch_health.Episodes()
    assert episodes.due_in(0.0) is None
    episodes.step("s", 10.0)
    episodes.step("s", 10.25)
    assert episodes.due_in(10.25) == 0.75
    assert episodes.step(None, 11.0) == ("events were still being lost", False)
    assert episodes.due_in(11.0) is None


# --- the kernel's view of our instance (real inotify) --------------------------------------


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    paths = create_folder(tmp_path / "data", "grp", "sess-1")
    return tmp_path / "data" / "sessions", paths.root


def test_fdinfo_names_every_watched_folder_and_a_recreated_one(tmp_path: Path) -> None:
    root, folder = _tree(tmp_path)
    before = watch_health.inotify_fds()
    with FolderWatch(root) as notify:
        fd = notify.fd
        assert watch_health.inotify_fds() - before == {fd}
        folders = watch_health.session_folders(root)
        assert sorted(folders.values()) == [".", "grp", "grp/sess-1"]
        assert watch_health.unwatched(folders, watch_health.watched_inodes(fd)) == {}
        # nothing reads the instance here: FIONREAD counts what is queued, and a change
        # queues one more event (16 bytes of header at least)
        queued = watch_health.pending_bytes(fd)
        os.utime(folder / "inbound.db")
        assert watch_health.pending_bytes(fd) >= queued + 16

        shutil.rmtree(folder)  # deleted and recreated: the watch covers the new one
        create_folder(tmp_path / "data", "grp", "sess-1")
        notify.watch(debounce_ms=50, step_ms=5, timeout_ms=2000, stop_event=None)
        folders = watch_health.session_folders(root)
        assert watch_health.unwatched(folders, watch_health.watched_inodes(fd)) == {}
        os.utime(folder / "inbound.db")
        assert notify.watch(debounce_ms=50, step_ms=5, timeout_ms=2000, stop_event=None) \
            == {(2, str(folder / "inbound.db"))}
    wait_for(lambda: fd not in watch_health.inotify_fds(), message="the instance closed")


def _rm_watch(fd: int, inode: int) -> None:
    """Drop the kernel watch on ``inode`` behind the watch's back: the folder is then
    really unwatched, as one the watch failed to add is (EACCES, ENOSPC)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("inotify ") and f" ino:{inode:x} " in line:
                wd = int(line.split()[1].split(":")[1], 16)
                assert libc.inotify_rm_watch(fd, wd) == 0, ctypes.get_errno()
                return
    raise AssertionError(f"inode {inode} is not watched")


def test_an_unwatched_session_folder_is_watched_again_within_one_dormant_cycle(
        tmp_path: Path) -> None:
    root, folder = _tree(tmp_path)
    other = create_folder(tmp_path / "data", "grp", "sess-2").root  # stays watched
    cfg = WatchConfig(sweep_interval=0.5, dormant_sweep_interval=0.5)
    warnings: list[str] = []
    made: list[Path] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")

    async def body() -> None:
        stop, started = asyncio.Event(), asyncio.Event()
        got: list[Activity] = []
        before = watch_health.inotify_fds()

        def recording(root: Path) -> FolderWatch:  # the real one, its argument noted
            made.append(root)
            return FolderWatch(root)

        async def consume() -> None:
            async for batch in inotify_batches(root, cfg, stop, started, notifier=recording):
                got.extend(batch)

        task = asyncio.create_task(consume())
        await until(started.is_set, timeout=10, message="watch started")
        [fd] = watch_health.inotify_fds() - before
        _rm_watch(fd, folder.stat().st_ino)
        hb = Activity("grp", "sess-1", Kind.HEARTBEAT)
        (folder / ".heartbeat").touch()
        # the window has passed once a later change of a watched folder came through: one
        # inotify instance queues its events in order, the watcher batches them in order
        (other / ".heartbeat").touch()
        await until(lambda: Activity("grp", "sess-2", Kind.HEARTBEAT) in got, timeout=5,
                    message="the later heartbeat of the watched folder")
        assert hb not in got  # really unwatched
        await until(lambda: RESCAN in got, timeout=5, message="the rescan after the restart")
        n = len(got)
        os.utime(folder / ".heartbeat")
        await until(lambda: hb in got[n:], timeout=5, message="the folder watched again")
        stop.set()
        await asyncio.wait_for(task, 10)

    try:
        run(body())
    finally:
        logger.remove(sink)
    assert len(warnings) == 1 and "1 folder(s) not watched (grp/sess-1)" in warnings[0], warnings
    assert "restarting the watch" in warnings[0]
    # restarted: the new instance walks the folders again (and watches sess-1)
    assert made == [root, root]


# --- the watch thread's branches, with a stand-in notifier ---------------------------------


def test_the_stand_in_has_the_notifiers_shape() -> None:
    """What the watch thread calls, on the real watch and on the stand-in alike."""
    assert (list(inspect.signature(FakeNotify.watch).parameters)
            == list(inspect.signature(FolderWatch.watch).parameters))
    # the thread makes it from the root alone (the budget is bound in beforehand)
    assert list(inspect.signature(FakeNotify.__init__).parameters)[:2] == \
        list(inspect.signature(FolderWatch.__init__).parameters)[:2]
    for name in ("watched_inodes", "take_lost", "counts", "shortfall", "__enter__",
                 "__exit__"):
        assert callable(getattr(FakeNotify, name)) and callable(getattr(FolderWatch, name))


DEFAULT_WATCH = WatchConfig()


def _drive(root: Path, scripts: list[list], cfg: WatchConfig = DEFAULT_WATCH,
           until_batches: int = 1) -> tuple[list[list[Activity]], list[str]]:
    FakeNotify.scripts = scripts
    FakeNotify.made = []
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"),
                      level="DEBUG")

    async def body() -> list[list[Activity]]:
        stop, started = asyncio.Event(), asyncio.Event()
        got: list[list[Activity]] = []

        async def consume() -> None:
            async for batch in inotify_batches(root, cfg, stop, started, notifier=FakeNotify):
                got.append(batch)

        task = asyncio.create_task(consume())
        await until(lambda: len(got) >= until_batches, timeout=10, message="batches")
        stop.set()
        await asyncio.wait_for(task, 10)
        return got

    try:
        return run(body()), lines
    finally:
        logger.remove(sink)


def test_a_failed_watch_restarts_and_rescans(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    probe = (1, str(root / PROBE))
    hb = (2, str(root / "grp" / "sess-1" / ".heartbeat"))
    got, lines = _drive(root, [[{probe}, {hb}, OSError("inotify went away")], [{probe}]],
                        until_batches=2)
    assert got == [[Activity("grp", "sess-1", Kind.HEARTBEAT)], [RESCAN]]
    assert FakeNotify.made == [root] * 2
    assert [line for line in lines if line.startswith(("WARNING", "ERROR"))] == [
        f"ERROR {root}: inotify watch failed (inotify went away); restarting in 1s"]


def test_an_ended_watch_restarts_and_rescans(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    probe = (1, str(root / PROBE))
    got, lines = _drive(root, [[{probe}, "signal"], [{probe}]])
    assert got == [[RESCAN]]
    assert [line for line in lines if line.startswith(("WARNING", "ERROR"))] == [
        f"WARNING {root}: watch ended (was the folder removed?); restarting it"]


def test_a_batch_as_big_as_half_the_queue_rescans_with_one_warning(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    probe = (1, str(root / PROBE))
    queue = watch_health.queue_limit()
    flood = {(2, str(root / "grp" / "sess-1" / f"scratch-{i}")) for i in range(queue // 2)}
    hb = (2, str(root / "grp" / "sess-1" / ".heartbeat"))
    got, lines = _drive(root, [[{probe}, flood, flood | {hb}, {hb}]], until_batches=4)
    # the first sign: a rescan and one warning; the second, within the episode: a
    # rescan owed, made LOSS_RESCAN_EVERY after the first (a timeout brings it, or the
    # next batch if classifying the flood took that long), at debug only
    beat = [Activity("grp", "sess-1", Kind.HEARTBEAT)]
    assert got[0] == [RESCAN] and got[1] == beat, got
    assert sorted(got[2:], key=repr) == sorted([beat, [RESCAN]], key=repr), got
    assert sum("events were still being lost" in line for line in lines) == 1, lines
    warned = [line for line in lines if line.startswith("WARNING")]
    assert warned == [f"WARNING {root}: inotify events may have been lost: {queue // 2} changes"
                      f" in one batch (the inotify queue holds {queue} events); rescanning"
                      " every session"], warned


# --- a real overflow, end to end -----------------------------------------------------------


def test_an_overflow_is_noticed_and_every_reply_delivered_at_once(tmp_path: Path,
                                                                  reap_agents) -> None:
    """The real orchestrator (a process) is stopped while more events than its inotify
    queue holds arrive, then the agents' replies (dropped by the kernel). Resumed, it
    notices, warns once, rescans, and delivers every reply once — long before the
    120 s sweep that alone found them before (bench.overflow measures the time)."""
    result = overflow_run(tmp_path, sessions=5, per_session=20, sweep=120.0, timeout=30.0)
    assert result["replies"] == 5 * 21
    assert (result["delivered"], result["distinct"], result["duplicated"]) == (105, 105, 0)
    assert result["warnings"] == 1, Path(result["log"]).read_text()
    assert result["resume_to_last_reply_s"] < 30.0


def test_a_stalled_watch_rescans_with_one_warning(tmp_path: Path) -> None:
    """The watch asks its stop event every step; a gap of two seconds or more means
    the process did not run while agents may have overflowed the queue."""
    root, _ = _tree(tmp_path)
    probe = (1, str(root / PROBE))
    hb = (2, str(root / "grp" / "sess-1" / ".heartbeat"))
    got, lines = _drive(root, [[{probe}, 2.2, {hb}]], until_batches=2)
    assert got == [[RESCAN], [Activity("grp", "sess-1", Kind.HEARTBEAT)]]
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 1 and "the watch did not run for 2.2s" in warned[0], warned
