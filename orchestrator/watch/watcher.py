"""Turns file-system changes under the sessions root into typed activity events.

Two sources, one output (batches of ``Activity``):

- ``events`` mode: one inotify instance (``folder_watch``: a watch on the root,
  each group, each session folder and its ``outbox/``, never through a link), in
  one thread. ``step``/``debounce``
  are tuned for latency: the library defaults (50/1600 ms) stretch a batch to
  1.6 s while other heartbeats keep arriving; 3/50 ms ends a batch 3 ms after the
  last change and never later than 50 ms after the first (bench/: step 5 → reply
  p50 11 ms, step 3 → 7 ms). After ``quiet_after`` s with no change at all the
  step grows to ``quiet_step_ms``, because each step is a wake-up that costs CPU
  even when nothing happens (``watch_step``).
- ``poll`` mode, for file systems where inotify says nothing (NFS, CIFS, Docker
  Desktop shares): every ``poll_interval`` we stat the few files that matter
  per session and compare (mtime_ns, size, inode). (watchfiles' force-polling
  compared whole-second mtimes and so missed a second change within a second.)

Neither is trusted for correctness: inotify drops events silently on queue
overflow or when the watch budget runs out. The supervisor's reconcile sweep
re-checks everything from disk; these events only make it fast.

``muted`` (owned by the session worker, a ``watch.muted.Muted``) names sessions whose
heartbeats are dropped here, in the watch thread, before they cost the event loop
anything: see ``SessionWorker`` for why that is safe. ``folder_watch`` drops them as it
reads them and then stops asking the kernel for them until the session is unmuted.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Container, Protocol, Self

from loguru import logger

from orchestrator.config.sections import WatchConfig
from orchestrator.contract.layout import (
    HEARTBEAT,
    INBOUND_DB,
    OUTBOUND_DB,
    OUTBOX,
    Kind,
    PathInfo,
    classify,
)
from orchestrator.host.filesig import file_signature
from orchestrator.host.private import make_dirs
from orchestrator.support.ticker import ticks
from orchestrator.watch import budget
from orchestrator.watch import health as watch_health
from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import FolderWatch, StopEvent


@dataclass(frozen=True, slots=True)
class Activity:
    agent_group: str
    session_id: str | None
    kind: Kind
    added: bool = False  # a directory or file appeared (list it: contents may be unreported)


RESCAN = Activity("", None, Kind.OTHER)  # "events may have been lost: reconcile everything"
RESCANS: collections.Counter[str] = collections.Counter()  # by cause, for /metrics


def to_activities(root: Path, changes: set[tuple[Change, str]]) -> list[Activity]:
    """Classify one batch; unrelated paths (journals, agent scratch files) drop out."""
    out: dict[tuple, Activity] = {}
    base = os.fspath(root)
    for change, path in changes:
        info = _classified(base, path)
        if info is None or info.kind is Kind.OTHER:
            continue
        key = (info.agent_group, info.session_id, info.kind, change == Change.added)
        if key not in out:
            out[key] = Activity(*key)
    return list(out.values())


@functools.lru_cache(maxsize=16384)
def _classified(root: str, path: str) -> PathInfo | None:
    """``classify``, remembered: the same few paths per session (its databases, their
    journals, its heartbeat) come in every batch, and classifying them again was most
    of the watch thread's work per reply. Bounded: an agent's names cannot grow it."""
    return classify(root, path)


def unmuted(batch: list[Activity], muted: Container[str]) -> list[Activity]:
    """``batch`` without the heartbeats of muted sessions."""
    return [a for a in batch if a.kind is not Kind.HEARTBEAT or a.session_id not in muted]


def only_muted_heartbeats(prefix: str, raw: set[tuple[Change, str]],
                          muted: Container[str]) -> bool:
    """Whether a raw batch is nothing but heartbeats of muted sessions (``prefix``:
    the sessions root with a trailing separator). The common batch under heartbeat
    load, told apart with string operations alone before anything is classified."""
    for _, path in raw:
        if not path.startswith(prefix):
            return False
        parts = path[len(prefix):].split(os.sep)
        if len(parts) != 3 or parts[2] != HEARTBEAT or parts[1] not in muted:
            return False
    return True


def count_dirs(root: Path) -> int:
    """The watches ``folder_watch`` needs for a tree at rest: the root, each group and
    each session (a session's ``outbox/`` is watched only once it shows activity),
    without looking inside any session folder: how many folders an agent makes there
    is not the host's cost, and walking them would let one agent slow every start."""
    return len(watch_health.session_folders(root))


def watch_limit() -> budget.Limit | None:
    """The kernel's watch limit for this process, and the sysctl that sets it."""
    return budget.read_limit()


def watch_budget() -> int | None:
    """The watch limit's value (the bench pretends a smaller one by replacing this)."""
    limit = watch_limit()
    return limit.value if limit is not None else None


def choose_mode(cfg: WatchConfig) -> str:
    """Events unless configured otherwise. (A watch budget too small for the tree no
    longer turns the whole host to polling: the sessions past it are polled alone,
    ``folder_watch``.)"""
    return "poll" if cfg.mode == "poll" else "events"


# What the watch holds now, for /metrics and the status file: set by the watch thread.
WATCH_STATE: dict[str, int] = {"watches": 0, "polled_sessions": 0}


def short_budget_warning(shortfall: budget.Shortfall | None, limit: budget.Limit | None,
                         allowed: int | None) -> str | None:
    """The start-up line when the watch polls sessions past the budget, else None."""
    if shortfall is None:
        return None
    return budget.warning(sessions=shortfall.sessions, groups=shortfall.groups,
                          polled=shortfall.polled, limit=limit, allowed=allowed,
                          kernel_refused=shortfall.kernel_refused,
                          poll_round=shortfall.poll_round)


PROBE = ".orchestrator-watch-probe"


async def _poke(probe: Path) -> None:
    """Touch the probe until the watch reports it (bounded by the caller's cancel)."""
    while True:
        probe.touch()
        await asyncio.sleep(0.02)


def watch_step(quiet_for: float, cfg: WatchConfig) -> tuple[int, int, int]:
    """(step, debounce, timeout) in ms for the next wait of the watch.

    Each wake-up of a watch costs CPU: on a VM ~40-80 µs, so 3 ms steps are
    1-1.7 % of a core with nothing to do (measured with watchfiles' watcher, which
    woke every step; ``FolderWatch`` does only while a batch is open). So the short
    ``step_ms`` (a batch ends that soon after the last change) is used while changes
    keep coming, and ``quiet_step_ms`` once
    there were none for ``quiet_after`` s. On the long step the batch ends at the
    wake-up after the one that saw the first change (debounce 1 ms), so a burst
    that starts after a silence is not held for the whole debounce: the first
    change costs one to two long steps, every change after it the short ones.
    The timeout brings a short-step wait back when the quiet spell begins.
    """
    if cfg.quiet_step_ms <= cfg.step_ms:  # turned off
        return (cfg.step_ms, cfg.debounce_ms, 0)
    if quiet_for >= cfg.quiet_after:
        return (cfg.quiet_step_ms, 1, 0)
    return (cfg.step_ms, cfg.debounce_ms, max(1, int((cfg.quiet_after - quiet_for) * 1000)))


# --- the watch thread and what it tells the loop -----------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The watch is (re)starting: confirm it with the probe."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The watch ended without an error (was the root removed?); it restarts."""


@dataclass(frozen=True, slots=True)
class Failed:
    error: Exception
    retry_in: float


@dataclass(frozen=True, slots=True)
class Changes:
    batch: list[Activity]
    probed: bool = False  # the probe file's event was in it: the watch is in place


@dataclass(frozen=True, slots=True)
class Lost:
    """Events may have been lost (see ``watch_health``): rescan every session."""

    reason: str
    warn: bool = True  # the first sign of an episode is logged; the rest only rescan


@dataclass(frozen=True, slots=True)
class Restarting:
    """Folders are not watched: the watch restarts (and rescans once confirmed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Short:
    """The watch budget does not cover every session: the line to say (once)."""

    warning: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The thread is done (halted)."""


WatchMessage = Started | Ended | Failed | Changes | Lost | Restarting | Short | Finished


class Notifier(Protocol):
    """What the watch thread drives: ``folder_watch.FolderWatch``, or a test's stand-in."""

    @property
    def fd(self) -> int | None:
        """Its inotify instance (queue checks by FIONREAD), None if it has none."""
        ...

    def watch(self, *, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: StopEvent | None) -> set[tuple[Change, str]] | str:
        """A batch of changes, or "timeout", "stop" (``stop_event`` set) or "signal"."""
        ...

    def watched_inodes(self) -> set[int] | None:
        """The inodes it watches (None: it cannot say)."""
        ...

    def take_lost(self) -> str | None:
        """Why events were lost since the last call (e.g. a queue overflow), or None."""
        ...

    def counts(self) -> tuple[int, int]:
        """(watches held, session folders polled): read at every step, so cheap."""
        ...

    def shortfall(self) -> budget.Shortfall | None:
        """The facts of the over-budget line, None while no session is polled."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


STATE_EVERY = 5.0  # s: the status file is rewritten at most this often


class StateNote:
    """What the watch holds, kept current for /metrics (``WATCH_STATE``) and
    ``orchestrator status`` (the status file: rewritten when the polled count changed,
    at most every ``STATE_EVERY`` s). One per watch thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.at = 0.0
        self.polled = -1

    def note(self, notify: Notifier, warning: str | None, force: bool = False) -> None:
        watches, polled = notify.counts()
        WATCH_STATE["watches"], WATCH_STATE["polled_sessions"] = watches, polled
        now = time.monotonic()
        if force or (polled != self.polled and now - self.at >= STATE_EVERY):
            self.at, self.polled = now, polled
            budget.write_state(self.data_dir, watches=watches, polled=polled,
                               warning=warning if polled else None)

    def announce(self, notify: Notifier, limits: tuple[budget.Limit | None, int | None],
                 post: Callable[[WatchMessage], None]) -> str | None:
        """A new watch: its counts, and the warning if it polls sessions (returned:
        ``note`` repeats it in the status file)."""
        short = short_budget_warning(notify.shortfall(), *limits)
        if short is not None:
            post(Short(short))
        self.note(notify, short, force=True)
        return short


NotifierFactory = Callable[[Path], Notifier]  # the sessions root → a running watch on it


def _watch_thread(root: Path, cfg: WatchConfig, halt: threading.Event,
                  post: Callable[[WatchMessage], None], muted: Container[str],
                  notifier: NotifierFactory = FolderWatch,
                  limits: tuple[budget.Limit | None, int | None] = (None, None)) -> None:
    """The inotify watch (``folder_watch.FolderWatch``) in one long-lived thread.

    A worker-thread call per batch (watchfiles' ``awatch``) was a third of the
    supervisor's CPU with 100 agents heartbeating. Here the watch runs in one thread
    for its whole life, its step can change between waits (``watch_step``), batches
    are classified here, and only a batch with something the loop wants costs a
    ``call_soon_threadsafe``. ``notifier`` makes the watch (a ``Notifier``; tests
    script a stand-in).
    (Re)starts are announced so the probe can run; signs of lost events
    (``watch_health``) are announced so the loop rescans.
    """
    probe = os.path.normpath(os.path.join(root, PROBE))
    prefix = os.path.join(str(root), "")
    failures = 0
    state = StateNote(root.parent)
    while not halt.is_set():
        make_dirs(root)
        post(Started())
        try:
            queue = watch_health.queue_limit()  # what the new instance gets
            notify = notifier(root)
            with notify:
                short = state.announce(notify, limits, post)
                # (a walk of every session folder: once per dormant cycle, not per sweep)
                gate = watch_health.Gate(halt, root, notify.fd, queue,
                                         max(cfg.sweep_interval, cfg.dormant_sweep_interval),
                                         notify.watched_inodes)
                last_change = time.monotonic()
                episodes = watch_health.Episodes()
                while True:
                    step, debounce, timeout = watch_step(time.monotonic() - last_change, cfg)
                    owed = episodes.due_in(time.monotonic())
                    if owed is not None:  # come back in time for the owed rescan
                        due = max(1, int(owed * 1000))
                        timeout = min(timeout, due) if timeout else due
                    gate.arm()
                    raw = notify.watch(debounce_ms=debounce, step_ms=step, timeout_ms=timeout,
                                       stop_event=gate)
                    now = time.monotonic()
                    sign = (gate.take_sign() or notify.take_lost()
                            or (None if isinstance(raw, str) else watch_health.loss_sign(
                                gap=0.0, pending=0, batch=len(raw), queue=queue)))
                    rescan = episodes.step(sign, now)
                    if rescan is not None:
                        post(Lost(*rescan))
                    state.note(notify, short)
                    if raw == "timeout":
                        continue
                    if isinstance(raw, str):  # "stop" (halt or restart) or "signal"
                        break
                    last_change = now
                    failures = 0
                    if muted and only_muted_heartbeats(prefix, raw, muted):
                        continue
                    probed = any(p.endswith(PROBE) and os.path.normpath(p) == probe
                                 for _, p in raw)
                    batch = unmuted(to_activities(root, raw), muted)
                    if batch or probed:
                        post(Changes(batch, probed))
            if gate.restart is not None and not halt.is_set():
                post(Restarting(gate.restart))
            elif not halt.is_set():  # the watch ended without an error
                post(Ended())
        except Exception as exc:  # noqa: BLE001 - reported to the loop, then retried
            failures += 1
            post(Failed(exc, min(30, failures)))
            halt.wait(min(30, failures))
    post(Finished())


@dataclass
class _LoopSide:
    """What ``inotify_batches`` keeps between the watch thread's messages, and what
    each message logs and yields."""

    root: Path
    started: asyncio.Event
    restarts: int = 0
    restarted_for: str | None = None
    watching: bool = False  # the probe's event came back since the last (re)start
    short_said: bool = False  # the budget warning, once per process
    poker: asyncio.Task | None = None

    def take(self, message: WatchMessage) -> list[list[Activity]] | None:
        """The batches to yield for ``message``, in order; None: the thread is done."""
        root = self.root
        match message:
            case Finished():
                return None
            case Started():
                self.watching = False
                self.poker = asyncio.create_task(_poke(root / PROBE))
            case Ended():
                logger.warning("{}: watch ended (was the folder removed?); restarting it",
                               root)
            case Restarting(reason=reason):  # the same folders again: said already
                (logger.debug if reason == self.restarted_for else logger.warning)(
                    "{}: {}; restarting the watch", root, reason)
                self.restarted_for = reason
            case Failed(error=error, retry_in=delay):
                logger.error("{}: inotify watch failed ({}); restarting in {}s", root,
                             error, delay)
            case Lost(reason=reason, warn=warn):
                (logger.warning if warn else logger.debug)(
                    "{}: inotify events may have been lost: {}; rescanning every session",
                    root, reason)
                RESCANS["events_lost"] += 1
                return [[RESCAN]]
            case Short(warning=warning):
                (logger.debug if self.short_said else logger.warning)(warning)
                self.short_said = True
            case Changes(batch=batch, probed=probed):
                return self._changes(batch, probed)
        return []

    def _changes(self, batch: list[Activity], probed: bool) -> list[list[Activity]]:
        out: list[list[Activity]] = []
        if probed and not self.watching:
            self.watching = True
            if self.poker:
                self.poker.cancel()
            self.started.set()
            self.restarts += 1
            if self.restarts > 1:
                RESCANS["watch_restarted"] += 1
                out.append([RESCAN])
        if batch:
            out.append(batch)
        return out


async def inotify_batches(root: Path, cfg: WatchConfig, stop: asyncio.Event,
                          started: asyncio.Event, muted: Container[str] = frozenset(),
                          notifier: NotifierFactory | None = None,
                          limit: budget.Limit | None = None
                          ) -> AsyncIterator[list[Activity]]:
    """Recursive inotify on ``root``; the watch is restarted if it ends or fails.

    The loop cannot see when the thread's watches are in place, and a file written
    before that is never reported. So we touch a probe file until its event comes
    back: only then is ``started`` set (the supervisor reconciles after it), and
    after a restart we ask for a rescan, as we do on any sign of lost events.
    ``notifier``: makes the ``Notifier`` (``FolderWatch``; tests pass a stand-in).
    ``limit``: the kernel's watch limit; the watch uses ``budget.usable`` of it and
    polls the sessions past that.
    """
    allowed = budget.usable(limit.value if limit is not None else None)
    if notifier is None:
        notifier = functools.partial(FolderWatch, limit=allowed,
                                     poll_interval=cfg.poll_interval, muted=muted,
                                     read_gap_ms=cfg.step_ms)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[WatchMessage] = asyncio.Queue()
    halt = threading.Event()

    def post(message: WatchMessage) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, message)
        except RuntimeError:  # the loop closed first: nobody is listening any more
            halt.set()

    async def halt_on_stop() -> None:
        await stop.wait()
        halt.set()

    side = _LoopSide(root, started)
    stopper = asyncio.create_task(halt_on_stop())
    thread = threading.Thread(target=_watch_thread,
                              args=(root, cfg, halt, post, muted, notifier,
                                    (limit, allowed)),
                              name="folder-watch", daemon=True)
    thread.start()
    try:
        while True:
            due = side.take(await queue.get())
            if due is None:
                return
            for batch in due:
                yield batch
    finally:
        halt.set()
        stopper.cancel()
        if side.poker:
            side.poker.cancel()


_POLLED = ((HEARTBEAT, Kind.HEARTBEAT), (OUTBOUND_DB, Kind.OUTBOUND_DB),
           (INBOUND_DB, Kind.INBOUND_DB), (OUTBOX, Kind.OUTBOX))


def poll_once(root: Path, seen: dict[str, tuple | None]) -> list[Activity]:
    """One scan: what changed since ``seen`` (updated in place)."""
    out: list[Activity] = []
    try:
        groups = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for group in groups:
        try:
            sessions = [e for e in os.scandir(group.path) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for sess in sessions:
            is_new = sess.path not in seen
            if is_new:
                seen[sess.path] = None
                out.append(Activity(group.name, sess.name, Kind.SESSION, added=True))
            for name, kind in _POLLED:
                p = os.path.join(sess.path, name)
                sig = file_signature(p)
                if seen.get(p) != sig:
                    seen[p] = sig
                    if not is_new:
                        out.append(Activity(group.name, sess.name, kind))
    return out


async def poll_batches(root: Path, cfg: WatchConfig, stop: asyncio.Event,
                       started: asyncio.Event, muted: Container[str] = frozenset()
                       ) -> AsyncIterator[list[Activity]]:
    seen: dict[str, tuple | None] = {}
    poll_once(root, seen)  # baseline: start-up reconcile covers the initial state
    started.set()
    async for _ in ticks(cfg.poll_interval, stop):
        batch = unmuted(poll_once(root, seen), muted)
        if batch:
            yield batch


def batches(root: Path, cfg: WatchConfig, stop: asyncio.Event, started: asyncio.Event,
            mode: str, muted: Container[str] = frozenset(),
            limit: budget.Limit | None = None) -> AsyncIterator[list[Activity]]:
    if mode == "events":
        return inotify_batches(root, cfg, stop, started, muted, limit=limit)
    return poll_batches(root, cfg, stop, started, muted)
