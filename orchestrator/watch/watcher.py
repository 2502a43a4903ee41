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
  even when nothing happens (``inotify_thread.watch_step``).
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

This module is the loop's side: the mode, the probe that confirms the watch, the log
lines and rescans the watch thread's messages cause, and the poll mode. The thread
itself is ``inotify_thread``; what a change means (``Activity``) is ``activity``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Container

from loguru import logger

from orchestrator.config.sections import WatchConfig
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB, OUTBOX, Kind
from orchestrator.host.filesig import file_signature
from orchestrator.support.ticker import ticks
from orchestrator.watch import budget
from orchestrator.watch import health as watch_health
from orchestrator.watch.activity import RESCAN, Activity, unmuted
from orchestrator.watch.folder_watch import FolderWatch
from orchestrator.watch.head_start import HeadStart
from orchestrator.watch.inotify_thread import (
    PROBE,
    Changes,
    Ended,
    Failed,
    Finished,
    Lost,
    Notifier,
    NotifierFactory,
    Restarting,
    Short,
    Started,
    WatchMessage,
    watch_thread,
)

RESCANS: collections.Counter[str] = collections.Counter()  # by cause, for /metrics


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


def limits() -> tuple[budget.Limit | None, int | None]:
    """The kernel's watch limit (the value ``watch_budget`` gives: the bench pretends
    one), and the part of it the watch uses (``budget.usable``)."""
    value, known = watch_budget(), watch_limit()
    limit = None if value is None else budget.Limit(
        value, known.name if known is not None else budget.LIMIT_FILES[0][0])
    return limit, budget.usable(limit.value if limit is not None else None)


def choose_mode(cfg: WatchConfig) -> str:
    """Events unless configured otherwise. (A watch budget too small for the tree no
    longer turns the whole host to polling: the sessions past it are polled alone,
    ``folder_watch``.)"""
    return "poll" if cfg.mode == "poll" else "events"


async def _poke(probe: Path) -> None:
    """Touch the probe until the watch reports it (bounded by the caller's cancel)."""
    while True:
        probe.touch()
        await asyncio.sleep(0.02)


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
                          limit: budget.Limit | None = None,
                          retiring: Container[str] = frozenset(),
                          head: HeadStart | None = None) -> AsyncIterator[list[Activity]]:
    """Recursive inotify on ``root``; the watch is restarted if it ends or fails.

    The loop cannot see when the thread's watches are in place, and a file written
    before that is never reported. So we touch a probe file until its event comes
    back: only then is ``started`` set (the supervisor reconciles after it), and
    after a restart we ask for a rescan, as we do on any sign of lost events.
    ``notifier``: makes the ``Notifier`` (``FolderWatch``; tests pass a stand-in).
    ``limit``: the kernel's watch limit; the watch uses ``budget.usable`` of it and
    polls the sessions past that. ``retiring``: session ids whose folders' events are
    dropped in the watch thread (``FolderWatch.retiring``). ``head``: the first watch,
    built ahead (``head_start``), taken by the first start of the watch thread.
    """
    allowed = budget.usable(limit.value if limit is not None else None)
    if notifier is None:
        notifier = functools.partial(FolderWatch, limit=allowed,
                                     poll_interval=cfg.poll_interval, muted=muted,
                                     read_gap_ms=cfg.step_ms, retiring=retiring)
    if head is not None:
        build, taken = notifier, head

        def notifier(at: Path) -> Notifier:
            return taken.take(at, muted, retiring) or build(at)
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
    thread = threading.Thread(target=watch_thread,
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
            limit: budget.Limit | None = None, head: HeadStart | None = None,
            retiring: Container[str] = frozenset()) -> AsyncIterator[list[Activity]]:
    """``head``: the first watch, built ahead (``head_start``; events mode only)."""
    if mode == "events":
        return inotify_batches(root, cfg, stop, started, muted, limit=limit,
                               retiring=retiring, head=head)
    return poll_batches(root, cfg, stop, started, muted)
