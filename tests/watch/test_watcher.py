"""The watcher: real inotify batches from the host's watch on a real tmp dir, classified;
the poll scanner; the mode choice and the watch-budget arithmetic (pure)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from orchestrator.config.sections import WatchConfig
from orchestrator.contract import schema
from orchestrator.contract.layout import Kind
from orchestrator.host.sessions import create_folder
from orchestrator.watch.activity import (
    RESCAN,
    Activity,
    only_muted_heartbeats,
    to_activities,
    unmuted,
)
from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import FolderWatch
from orchestrator.watch.inotify_thread import watch_step
from orchestrator.watch.watcher import (
    batches,
    choose_mode,
    count_dirs,
    poll_once,
    watch_budget,
)
from tests.support.helpers import until


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "data"
    paths = create_folder(data_dir, "grp", "sess-1")
    paths.heartbeat.touch()
    schema.init_outbound(paths.outbound_db)
    return data_dir / "sessions", paths.root


class Recorder:
    """Collects raw batches from a ``FolderWatch`` on ``root``, run in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.batches: list[set[tuple[Change, str]]] = []
        self.stop = threading.Event()
        self.task = asyncio.create_task(asyncio.to_thread(self._run))

    def _run(self) -> None:
        with FolderWatch(self.root) as watch:
            while not self.stop.is_set():
                raw = watch.watch(debounce_ms=50, step_ms=5, timeout_ms=0,
                                  stop_event=self.stop)
                if isinstance(raw, set) and raw:
                    self.batches.append(raw)

    async def ready(self) -> None:
        """Touch a probe until its event comes back (a handshake, not a sleep): the
        same start-up check the watcher makes."""
        probe = self.root / ".probe"  # not a valid id: never an activity

        def seen() -> bool:
            probe.touch()
            return any(p == str(probe) for b in self.batches for _, p in b)

        await until(seen, timeout=10, interval=0.05, message="watch ready")
        await until(lambda: not self.task.done())

    async def next_with(self, predicate, start: int) -> tuple[int, set]:
        """The first batch at index >= ``start`` for which ``predicate`` holds."""
        def find():
            for i in range(start, len(self.batches)):
                if predicate(self.batches[i]):
                    return i + 1, self.batches[i]
            return None

        return await until(find, timeout=10, message="batch")

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def test_real_batches_are_classified(tmp_path: Path) -> None:
    root, folder = make_tree(tmp_path)

    rec = Recorder(root)
    await rec.ready()
    n = len(rec.batches)

    # a heartbeat touch (mtime only) → modified → HEARTBEAT
    os.utime(folder / ".heartbeat")
    n, batch = await rec.next_with(lambda b: any(p.endswith(".heartbeat") for _, p in b), n)
    assert (Change.modified, str(folder / ".heartbeat")) in batch
    assert to_activities(root, batch) == [Activity("grp", "sess-1", Kind.HEARTBEAT)]

    # one SQLite commit on outbound.db → OUTBOUND_DB; the -journal files drop out
    mark = n
    with schema.opened(folder / "outbound.db") as conn, schema.transaction(conn):
        conn.execute("INSERT INTO session_state (key, value, updated_at) VALUES"
                     " ('k', 'v', 'now')")
    n, batch = await rec.next_with(
        lambda b: (Change.modified, str(folder / "outbound.db")) in b, n)
    raw = set().union(*rec.batches[mark:n])
    assert any(p.endswith("outbound.db-journal") for _, p in raw)  # it was there...
    acts = [a for b in rec.batches[mark:n] for a in to_activities(root, b)]
    assert set(acts) == {Activity("grp", "sess-1", Kind.OUTBOUND_DB)}  # ...and dropped

    # an outbox folder for a reply → OUTBOX (added). What is written into a brand-new
    # folder right away may go unreported (field notes): the supervisor reads the
    # reply row and lists the folder itself, so the folder event is what counts.
    out = folder / "outbox" / "out-1"
    out.mkdir()
    (out / "a.png").write_bytes(b"png")
    n, batch = await rec.next_with(lambda b: (Change.added, str(out)) in b, n)
    assert Activity("grp", "sess-1", Kind.OUTBOX, added=True) in to_activities(root, batch)

    # a new session folder in an existing group → SESSION (added)
    create_folder(tmp_path / "data", "grp", "sess-2")
    n, batch = await rec.next_with(
        lambda b: (Change.added, str(root / "grp" / "sess-2")) in b, n)
    assert Activity("grp", "sess-2", Kind.SESSION, added=True) in to_activities(root, batch)
    # a new group folder → a group-level activity (added): its sessions, created
    # right after, may be unreported, so the supervisor lists the group
    create_folder(tmp_path / "data", "grp2", "sess-3")
    n, batch = await rec.next_with(
        lambda b: (Change.added, str(root / "grp2")) in b, n)
    assert Activity("grp2", None, Kind.GROUP, added=True) in to_activities(root, batch)

    # noise never becomes activity: the probe, junk names, scratch files
    (root / ".DS_Store").write_text("x")
    (root / "bad name!").mkdir()
    (folder / "scratch.tmp").write_text("x")
    os.utime(folder / ".heartbeat")
    n, _ = await rec.next_with(lambda b: any(p.endswith(".heartbeat") for _, p in b), n)
    late = [a for b in rec.batches[-3:] for a in to_activities(root, b)]
    assert late and all(a.kind is not Kind.OTHER and a.agent_group in ("grp", "grp2")
                        for a in late)
    await rec.close()


def test_to_activities_dedupes_and_filters() -> None:
    root = Path("/srv/data/sessions")
    s = "/srv/data/sessions/g/s"
    changes = {
        (Change.modified, f"{s}/.heartbeat"),
        (Change.added, f"{s}/outbound.db-journal"),
        (Change.deleted, f"{s}/outbound.db-journal"),
        (Change.modified, f"{s}/outbound.db"),
        (Change.added, f"{s}/outbox/out-1"),
        (Change.added, f"{s}/outbox/out-1/a.txt"),
        (Change.modified, f"{s}/inbox/m/x"),
        (Change.modified, "/elsewhere/g/s/.heartbeat"),
        (Change.modified, f"{root}/.hidden/s/.heartbeat"),
        (Change.modified, f"{s}/notes/deep/file"),
    }
    acts = to_activities(root, changes)
    assert sorted(acts, key=repr) == sorted([
        Activity("g", "s", Kind.HEARTBEAT),
        Activity("g", "s", Kind.OUTBOUND_DB),
        Activity("g", "s", Kind.OUTBOX, added=True),
        Activity("g", "s", Kind.INBOX),
    ], key=repr)
    assert RESCAN.session_id is None and RESCAN.kind is Kind.OTHER


HB, OUT = Activity("g", "a", Kind.HEARTBEAT), Activity("g", "a", Kind.OUTBOUND_DB)
HB_B = Activity("g", "b", Kind.HEARTBEAT)


@pytest.mark.parametrize("batch, muted, kept", [
    ([HB, OUT, HB_B], set(), [HB, OUT, HB_B]),
    ([HB, OUT, HB_B], {"a"}, [OUT, HB_B]),  # only heartbeats, only of muted sessions
    ([HB, HB_B], {"a", "b"}, []),
    ([OUT, RESCAN], {"a"}, [OUT, RESCAN]),
])
def test_unmuted(batch: list, muted: set, kept: list) -> None:
    assert unmuted(batch, muted) == kept


R = "/d/sessions/"


@pytest.mark.parametrize("paths, expected", [
    ([R + "g/s1/.heartbeat"], True),
    ([R + "g/s1/.heartbeat", R + "g/s2/.heartbeat"], True),
    ([R + "g/s1/.heartbeat", R + "g/s3/.heartbeat"], False),  # s3 is not muted
    ([R + "g/s1/.heartbeat", R + "g/s1/outbound.db"], False),  # a commit: never dropped
    ([R + "g/s1/outbox/s2/.heartbeat"], False),  # deeper: an outbox file, not a heartbeat
    ([R + "s1/.heartbeat"], False),              # a group-level file
    (["/elsewhere/g/s1/.heartbeat"], False),     # not under the root
    ([R + "g/s1/.heartbeat-journal"], False),
])
def test_only_muted_heartbeats(paths: list[str], expected: bool) -> None:
    raw = {(2, p) for p in paths}
    assert only_muted_heartbeats(R, raw, {"s1", "s2"}) is expected


async def test_muted_heartbeats_never_reach_the_loop(tmp_path: Path) -> None:
    """A muted session's heartbeats are dropped in the watch thread; everything else
    of it still comes through, and so do its heartbeats once it is unmuted."""
    root, folder = make_tree(tmp_path)
    muted = {"sess-1"}

    stop, started = asyncio.Event(), asyncio.Event()
    got: list[Activity] = []

    async def consume() -> None:
        async for batch in batches(root, WatchConfig(), stop, started, "events", muted):
            got.extend(batch)

    task = asyncio.create_task(consume())
    await until(started.is_set, timeout=10, message="watch started")
    os.utime(folder / ".heartbeat")
    with schema.opened(folder / "outbound.db") as conn, schema.transaction(conn):
        conn.execute("INSERT INTO session_state (key, value, updated_at) VALUES"
                     " ('k', 'v', 'now')")
    # inotify keeps order: once the commit is reported, the touch before it was seen
    await until(lambda: Activity("grp", "sess-1", Kind.OUTBOUND_DB) in got,
                message="the commit")
    assert Activity("grp", "sess-1", Kind.HEARTBEAT) not in got, got
    muted.discard("sess-1")
    os.utime(folder / ".heartbeat")
    await until(lambda: Activity("grp", "sess-1", Kind.HEARTBEAT) in got,
                message="the heartbeat once unmuted")
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("quiet_for, step, quiet_step, quiet_after, expected", [
    (0.0, 3, 20, 2.0, (3, 50, 2000)),  # changes just came: short steps, back at quiet time
    (1.5, 3, 20, 2.0, (3, 50, 500)),
    (1.9999, 3, 20, 2.0, (3, 50, 1)),  # never a 0 timeout (0 means "none") while short
    (2.0, 3, 20, 2.0, (20, 1, 0)),     # quiet: long steps, a batch ends at the next wake
    (600.0, 3, 20, 2.0, (20, 1, 0)),
    (0.0, 3, 3, 2.0, (3, 50, 0)),      # quiet_step_ms = step_ms: off, no timeouts
    (600.0, 10, 5, 2.0, (10, 50, 0)),  # a quiet step shorter than step_ms: never used
    (0.0, 3, 20, 0.0, (20, 1, 0)),     # quiet_after = 0: always the long step
])
def test_watch_step(quiet_for: float, step: int, quiet_step: int, quiet_after: float,
                    expected: tuple[int, int, int]) -> None:
    cfg = WatchConfig(step_ms=step, debounce_ms=50, quiet_step_ms=quiet_step,
                      quiet_after=quiet_after)
    assert watch_step(quiet_for, cfg) == expected


async def test_changes_after_a_quiet_spell_are_still_reported(tmp_path: Path) -> None:
    """Across the switch to long steps and back, on the real watcher: a change after
    the quiet spell arrives, and so does one right after it (short steps again)."""
    root, folder = make_tree(tmp_path)
    cfg = WatchConfig(step_ms=3, quiet_step_ms=40, quiet_after=0.1)

    stop, started = asyncio.Event(), asyncio.Event()
    got: list[Activity] = []

    async def consume() -> None:
        async for batch in batches(root, cfg, stop, started, "events"):
            got.extend(batch)

    task = asyncio.create_task(consume())
    await until(started.is_set, timeout=10, message="watch started")
    hb = Activity("grp", "sess-1", Kind.HEARTBEAT)
    for _ in range(3):
        await asyncio.sleep(0.3)  # a quiet spell: no change on purpose
        n = len(got)
        os.utime(folder / ".heartbeat")
        await until(lambda: hb in got[n:], timeout=5,
                    message="the heartbeat after a quiet spell")
    stop.set()
    await asyncio.wait_for(task, 10)


# --- poll mode ---------------------------------------------------------------------------


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def test_poll_once_sees_a_second_change_within_the_same_second(tmp_path: Path) -> None:
    root, folder = make_tree(tmp_path)
    seen: dict = {}
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.SESSION, added=True)]
    assert poll_once(root, seen) == []  # nothing changed

    second = (int(time.time()) - 10) * 1_000_000_000  # a whole second, in the past
    hb = folder / ".heartbeat"
    _set_mtime(hb, second + 100_000_000)
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.HEARTBEAT)]
    _set_mtime(hb, second + 200_000_000)  # same second, 100 ms later
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.HEARTBEAT)]
    _set_mtime(hb, second + 200_000_001)  # 1 ns later
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.HEARTBEAT)]

    # a commit that keeps size and (coarse) mtime still changes ns or inode
    db = folder / "outbound.db"
    _set_mtime(db, second + 300_000_000)
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.OUTBOUND_DB)]
    _set_mtime(db, second + 300_000_000)
    assert poll_once(root, seen) == []

    (folder / "outbox" / "out-1").mkdir()  # the outbox folder's mtime moves
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.OUTBOX)]
    schema.init_inbound(folder / "inbound.db")
    with schema.opened(folder / "inbound.db") as conn, schema.transaction(conn):
        conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content)"
                     " VALUES ('m', 2, 'chat', 'now', '{}')")
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.INBOUND_DB)]

    hb.unlink()  # a file disappearing is a change too
    assert poll_once(root, seen) == [Activity("grp", "sess-1", Kind.HEARTBEAT)]

    create_folder(tmp_path / "data", "grp", "sess-2")
    assert poll_once(root, seen) == [Activity("grp", "sess-2", Kind.SESSION, added=True)]


def test_poll_once_on_missing_root_and_symlinks(tmp_path: Path) -> None:
    assert poll_once(tmp_path / "nope", {}) == []
    root, folder = make_tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sess-x").mkdir(parents=True)
    os.symlink(elsewhere, root / "linked-group")
    os.symlink(elsewhere / "sess-x", root / "grp" / "linked-session")
    acts = poll_once(root, {})
    assert acts == [Activity("grp", "sess-1", Kind.SESSION, added=True)]


# --- mode and budget ------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("events", "events"), ("poll", "poll")])
def test_choose_mode(mode: str, expected: str) -> None:
    """A small watch budget no longer turns the whole host to polling (the sessions
    past it are polled alone: tests/watch/test_budget.py)."""
    assert choose_mode(WatchConfig(mode=mode, poll_interval=0.5)) == expected


def test_count_dirs_matches_what_the_watch_adds(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    root = data_dir / "sessions"
    root.mkdir(parents=True)
    assert count_dirs(root) == 1
    groups, sessions, outbox_dirs = 2, 3, 2
    for g in range(groups):
        for s in range(sessions):
            paths = create_folder(data_dir, f"g{g}", f"s{s}")
            for m in range(outbox_dirs):
                (paths.outbox / f"out-{m}").mkdir()
    # 1 + groups + sessions: nothing below is watched, an outbox/ only once active
    expected = 1 + groups + groups * sessions
    assert count_dirs(root) == expected
    with FolderWatch(root) as watch:
        assert len(watch.paths) == expected


def test_watch_budget_reads_the_kernel_limit() -> None:
    """The lowest of the limits that apply (a user namespace may set a lower one)."""
    budget = watch_budget()
    values = [int(p.read_text()) for p in (Path("/proc/sys/fs/inotify/max_user_watches"),
                                           Path("/proc/sys/user/max_inotify_watches"))
              if p.exists()]
    assert budget == (min(values) if values else None)
