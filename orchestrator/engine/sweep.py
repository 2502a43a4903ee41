"""The drift-correcting reconcile sweep, as a part of ``Supervisor``.

Every session is re-checked from disk once per ``sweep_interval``, a slice per tick
(stat-gated: only a session whose files changed, whose last pass failed or whose
status disagrees with the runtime gets a pass), so a missed event costs at most one
sweep; dormant sessions only once per dormant cycle while inotify is healthy, and all
of them, in slices, after a loss sign (``_rescan_dormant``).

A mixin only to keep ``supervisor.py`` about the loop, the events and the shutdown;
it has no state of its own (``Supervisor.__post_init__`` makes ``_cycle``,
``_rescan``, ``last_sweep``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.engine.ports import Dirty
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.startup_state import StateBook, changed
from orchestrator.engine.tracked import Flag, Tracked, TrackedMap
from orchestrator.host.safefs import open_group
from orchestrator.runtime.base import Runtime
from orchestrator.support.ticker import ticks

SWEEP_TICK = 1.0  # seconds between two slices of the reconcile sweep
RESCAN_SLICE = 1000  # dormant rows compared with the disk between two turns of the loop


def dormant_rounds(interval: float, dormant_interval: float) -> int:
    """In how many sweep rounds every dormant session is swept once (1: each round)."""
    return max(1, round(dormant_interval / interval))


def sweep_plan(interval: float, tick: float = SWEEP_TICK) -> tuple[float, int]:
    """(seconds between slices, number of slices) so that every session is swept
    once per ``interval``, one slice about every ``tick`` seconds."""
    slices = max(1, round(interval / tick))
    return interval / slices, slices


class SweepMixin:
    # Supervisor's, used here (see supervisor.py)
    cfg: Config
    tracked: dict[str, Tracked]
    rows: TrackedMap
    runtime: Runtime
    dirty: Dirty
    worker: SessionWorker
    book: StateBook
    stop_event: asyncio.Event
    watch_mode: str | None
    last_sweep: float | None
    _watching: asyncio.Event
    _checked: bool
    _rescan: asyncio.Task | None
    _cycle: list[str]

    if TYPE_CHECKING:
        def _discover(self, at_start: bool = False, folders: bool = True) -> None: ...

    async def _sweep(self) -> None:
        """Every session once per ``sweep_interval``, a slice per tick (see ``sweep_plan``):
        10 000 sessions no longer arrive as one lump of passes. Only sessions whose
        files changed on disk since their last pass (3 ``stat`` calls), whose last pass
        failed or whose status disagrees with the runtime get a pass at all."""
        tick, slices = sweep_plan(self.cfg.watch.sweep_interval)
        rounds = dormant_rounds(self.cfg.watch.sweep_interval,
                                self.cfg.watch.dormant_sweep_interval)
        order: list[str] = []
        round_no = -1
        async for k in ticks(tick, self.stop_event):
            self.last_sweep = time.monotonic()  # /healthz: the loop is sweeping
            self.worker.kept.close_idle()  # connections of sessions no longer busy
            self.worker.flush_touches()  # the registry's activity times of this second
            part = k % slices
            if part == 0 or not order:  # a new round: the runtime, new folders, the order
                try:
                    await self.runtime.reconcile()
                except Exception as exc:  # noqa: BLE001 - it logs its own outages; keep sweeping
                    logger.debug("runtime reconcile failed: {}", exc)
                round_no += 1
                turn = round_no % rounds
                if turn == 0 or not self._healthy():  # new folders and registry rows:
                    self._discover()  # (watched, their events track them at once)
                order = self._sweep_order(turn, rounds)
            self._sweep_slice(order[part::slices])
            self.book.save()

    def _rescan_dormant(self) -> None:
        """The dormant rows after a loss sign: compared with the disk in slices
        (``_sweep_slice``: stat-gated, only a changed one wakes), the loop free between
        two (100 000 in one go held it ~1.5 s). Before the start-up check, that check
        is the rescan: it runs with the watch in place."""
        if not self._checked:
            return
        if self._rescan is not None:
            self._rescan.cancel()  # begun again: what it had not reached, and the rest
        self._rescan = asyncio.create_task(self._rescan_slices(list(self.rows.dormant)),
                                           name="rescan")

    async def _rescan_slices(self, sids: list[str]) -> None:
        for k in range(0, len(sids), RESCAN_SLICE):
            self._sweep_slice(sids[k:k + RESCAN_SLICE])
            await asyncio.sleep(0)

    def _healthy(self) -> bool:
        """inotify is in place (an overflow or a lost watch rescans every session)."""
        return self.watch_mode == "events" and self._watching.is_set()

    def _sweep_order(self, turn: int, rounds: int) -> list[str]:
        """The sessions this round sweeps: every one that is not dormant, and the
        dormant ones whose ``turn`` it is. A dormant session (settled: what a restart
        may skip, ``startup_state``) has nothing to do until an event says otherwise,
        so while inotify is in place and healthy (a loss sign rescans every session at
        once) its sweep is drift correction only: 100 000 sessions swept every 30 s
        were ~8 % of a core. Set operations, not a loop per session."""
        if rounds <= 1 or not self._healthy():
            return list(self.tracked)
        if turn == 0 or len(self._cycle) != len(self.tracked):
            self._cycle = list(self.tracked)  # each long cycle's order (sessions come, go)
        part = self._cycle[turn::rounds]
        live = self.tracked.keys() - self.book.saved.keys()
        return part + list(live.difference(part)) if live else part

    def _sweep_slice(self, sids: list[str]) -> None:
        """Each group folder is opened once per slice (``safefs.open_group``); a swept
        session costs an ``lstat`` of its folder and two or three ``stat`` calls through
        it (``safefs.FolderStat``), no ``open``. A dormant one is compared with its
        saved row (``startup_state.changed``), not woken unless that differs."""
        group_fds: dict[str, int | None] = {}

        def group_fd(group: str) -> int | None:
            if group not in group_fds:
                try:
                    group_fds[group] = open_group(self.cfg.data_dir, group)
                except OSError:  # a linked group too: the pass says what is wrong
                    group_fds[group] = None
            return group_fds[group]

        dormant = self.rows.dormant
        try:
            for sid in sids:
                rest = dormant.get(sid)
                if rest is not None:
                    fd, running = group_fd(rest[0]), self.runtime.is_running(sid)
                    self.worker.space.look(rest[0], sid, running)
                    if running or fd is None or changed(fd, sid, rest[1]):
                        self.dirty.mark(sid, Flag.SWEEP)
                    continue
                t = self.tracked.get(sid)
                if t is None:
                    continue
                if flags := self.worker.sweep_flags(t, group_fd(t.agent_group)):
                    self.dirty.mark(sid, flags)
        finally:
            for fd in group_fds.values():
                if fd is not None:
                    os.close(fd)
