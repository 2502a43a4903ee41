"""The supervisor: startup → main loop → shutdown.

Events (inotify batches, runtime exits, timers) only mark a session *dirty*
with what changed; one worker coroutine takes dirty sessions one at a time and
runs ``SessionWorker.process`` on it. One pass per session at a time is what
makes delivery exactly-once within the process, and coalescing means a burst of
heartbeats costs one pass, not a thousand.

Behind the events, a drift-correcting reconcile sweep re-checks every session
from disk every ``sweep_interval`` (stat-gated, so an idle sweep over 1000
sessions is a few thousand ``stat`` calls), so a missed event costs at most one
sweep. Timers fire at exact due times (idle, stop, stuck, ``process_after``,
``deliver_after``, retries).
"""

from __future__ import annotations

import asyncio
import gc
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.contract.layout import (
    INBOUND_DB,
    InvalidId,
    Kind,
    sessions_root,
    validate_id,
)
from orchestrator.contract.schema import utcnow
from orchestrator.contract.session_status import Status
from orchestrator.engine.admission_gate import AdmissionGate
from orchestrator.engine.delivery import DeliveryState
from orchestrator.engine.ports import Dirty, RuntimeInbox, StatusBook
from orchestrator.engine.requeue import requeue_failed
from orchestrator.engine.retention import Retirement
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.startup_state import (
    StateBook,
    changed,
    start_pass_reason,
    unchanged,
    waker,
)
from orchestrator.engine.tracked import Flag, LazyPaths, Tracked, TrackedMap
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Outcome, Retention
from orchestrator.host.safefs import Refused, SessionDir, open_group
from orchestrator.host.sessions import STAGING_PREFIX, Sessions, remove_stale_staging
from orchestrator.rules.retention import Action as RetentionAction
from orchestrator.runtime.base import AgentExit, Runtime, RuntimeUnavailable
from orchestrator.support.logonce import LogOnce
from orchestrator.support.ticker import ticks
from orchestrator.watch import budget, watcher
from orchestrator.watch.activity import RESCAN, Activity

Clock = Callable[[], datetime]

_KIND_FLAGS = {
    Kind.HEARTBEAT: Flag.HEARTBEAT,
    Kind.OUTBOUND_DB: Flag.OUTBOUND,
    Kind.OUTBOX: Flag.OUTBOX,
    Kind.INBOUND_DB: Flag.INBOUND,
    Kind.INBOX: Flag.NONE,
    Kind.SESSION: Flag.FULL,
}


WATCH_START_TIMEOUT = 10.0
SWEEP_TICK = 1.0  # seconds between two slices of the reconcile sweep
PROGRESS_EVERY = 5.0  # seconds between two progress lines of a long start-up step
RESCAN_SLICE = 1000  # dormant rows compared with the disk between two turns of the loop
SHUTDOWN_SLACK = 10.0  # s beyond stop_grace that shutdown waits for one agent's stop


FREEZE_FROM = 10_000  # tracked sessions: below it a full collection is a few ms


def settle_heap(sessions: int) -> None:
    """What start-up built (100 000 tracked sessions: ~1 M objects) lives as long as
    the process: moved out of the cyclic garbage collector's reach (``gc.freeze``), so
    that no full collection walks it again (~250 ms each, a pause in every reply that
    meets one). No collection first: that would be the very pause, at start-up; what
    start-up left for garbage is freed by reference counting, not by cycles."""
    if sessions >= FREEZE_FROM:
        gc.freeze()


def dormant_rounds(interval: float, dormant_interval: float) -> int:
    """In how many sweep rounds every dormant session is swept once (1: each round)."""
    return max(1, round(dormant_interval / interval))


def sweep_plan(interval: float, tick: float = SWEEP_TICK) -> tuple[float, int]:
    """(seconds between slices, number of slices) so that every session is swept
    once per ``interval``, one slice about every ``tick`` seconds."""
    slices = max(1, round(interval / tick))
    return interval / slices, slices



@dataclass
class Supervisor:
    """Startup → main loop → shutdown, over collaborators built by the composition root
    (``orchestrator.cli.compose``), which also opens and closes them."""

    cfg: Config
    tracked: dict[str, Tracked]  # a TrackedMap, shared with the gate and the metrics
    registry: Registry
    sessions: Sessions
    runtime: Runtime
    inbox: RuntimeInbox
    dirty: Dirty
    statuses: StatusBook
    worker: SessionWorker
    admission: AdmissionGate
    book: StateBook
    clock: Clock = utcnow
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # retention (issue 26.1): the host's removal steps, and who forgets removed sessions
    # (the API's event log); None = no retention sweep, removals by hand refused
    retention: Retention | None = None
    on_removed: Callable[[list[str]], object] = lambda sids: None

    def __post_init__(self) -> None:
        if not isinstance(self.tracked, TrackedMap):
            raise TypeError("Supervisor.tracked must be a TrackedMap (cli.compose builds one)")
        self.rows: TrackedMap = self.tracked  # the same map, with its dormant rows
        self.rows.wake = waker(self.cfg.data_dir)  # a dormant row, touched
        self.retiring: set[str] = set()  # being archived or deleted: never tracked again
        self.in_pass: str | None = None  # the session whose pass the work loop is in
        self.retirement = None if self.retention is None else Retirement(
            self.cfg, self, self.runtime, self.retention, notify=self.worker.notify,
            on_removed=self.on_removed)
        self.watch_mode: str | None = None
        self._unreconciled: set[str] = set()
        self._watching = asyncio.Event()
        self._index_version: int | None = None  # registry data_version of the last index read
        self._checked = False  # the start-up check of the dormant rows is done
        self._rescan: asyncio.Task | None = None  # dormant rows compared after a loss sign
        self.last_sweep: float | None = None
        self._refused = LogOnce()  # linked folders (agent group, session id), said once
        self._tasks: list[asyncio.Task] = []  # watch, sweep
        self._cycle: list[str] = []  # the sweep's order over one dormant cycle
        self._worker: asyncio.Task | None = None

    # --- what the API may ask (``ports.Control``) -----------------------------------

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    async def check_runtime(self) -> None:
        await self.runtime.ping()

    def stop_agent(self, session_id: str, reason: str) -> bool | None:
        t = self.tracked.get(session_id)
        return None if t is None else self.worker.request_stop(t, reason)

    async def retry_deliveries(self, session_id: str | None) -> int:
        """``requeue.requeue_failed`` (off the loop), then each session forgets its
        delivery memory and gets a pass, which plans the re-queued replies afresh."""
        done = await asyncio.to_thread(requeue_failed, self.cfg.data_dir, self.registry,
                                       session_id)
        for sid in done:
            t = self.tracked.get(sid)
            if t is not None:
                t.delivery = DeliveryState()
                self.dirty.mark(sid, Flag.OUTBOUND)
        return sum(len(ids) for ids in done.values())

    async def remove_session(self, session_id: str, action: str, force: bool) -> Outcome:
        """Archive or delete a session now (``DELETE /v1/sessions/{id}``)."""
        if self.retirement is None:
            return Outcome(session_id, "kept", "retention is not set up")
        return await self.retirement.remove(session_id, RetentionAction(action), force=force)

    def detach_session(self, session_id: str) -> None:
        """Retention takes the session: no more passes, no timer, never re-registered
        from disk or the registry while it is in ``retiring``."""
        self.retiring.add(session_id)
        t = self.tracked.pop(session_id, None)
        self.dirty.drop(session_id)
        if session_id in self._unreconciled:  # its start-up pass will never run
            self._unreconciled.discard(session_id)
            if not self._unreconciled:
                self.ready.set()
        if t is not None:
            t.timer.cancel()

    def reattach_session(self, agent_group: str, session_id: str) -> None:
        """Retention kept it after all (or it was restored): tracked again, a full pass."""
        self.retiring.discard(session_id)
        self._track_from_disk(agent_group, session_id)

    # --- events in ----------------------------------------------------------------

    def _take_runtime_news(self) -> None:
        """What the runtime reported since the last look (``RuntimeInbox``)."""
        exits, came_back = self.inbox.take()
        for ev in exits:
            self._on_exit(ev)
        if came_back:
            self._on_runtime_available()

    def _on_exit(self, ev: AgentExit) -> None:
        self.worker.egress.revoke(ev.session_id)  # its gateway token is refused from now
        t = self.tracked.get(ev.session_id)
        if t is not None:
            t.exit = ev
            self.dirty.mark(ev.session_id, Flag.EXIT)
        self.admission.agent_exited(ev.session_id)  # a slot is free: the queue moves on

    def _on_runtime_available(self) -> None:
        """The runtime answers again (and has just reconciled): retry what an outage
        put off now, not when each session's backoff ends, and look again at every
        session whose agent the reconcile found alive or gone."""
        self.admission.runtime_available()
        for t in list(self.tracked.values()):
            unblocked = self.worker.unblock(t)
            if unblocked or self.runtime.is_running(t.session_id) != (t.status != Status.STOPPED):
                self.dirty.mark(t.session_id, Flag.TIMER)
        for sid in list(self.rows.dormant):  # stopped, nothing to unblock
            if self.runtime.is_running(sid):
                self.dirty.mark(sid, Flag.TIMER)

    def _on_activity(self, batch: list[Activity]) -> None:
        for act in batch:
            if act == RESCAN:  # events may have been lost: a sweep, now
                self._discover()
                for sid in list(self.tracked.keys()):
                    self.dirty.mark(sid, Flag.SWEEP)
                self._rescan_dormant()
                continue
            if act.session_id is None:
                if act.added:  # a new agent group folder: its sessions may be unreported
                    self._discover()
                continue
            if act.session_id not in self.tracked and not self._track_from_disk(
                    act.agent_group, act.session_id):
                continue
            flags = _KIND_FLAGS.get(act.kind, Flag.NONE)
            if flags:
                self.dirty.mark(act.session_id, flags)

    # --- discovery ----------------------------------------------------------------

    def _track(self, agent_group: str, session_id: str) -> Tracked:
        t = self.tracked.get(session_id)
        if t is None:
            agent_group = sys.intern(agent_group)  # one string per group, not per session
            t = Tracked(agent_group, session_id,
                        LazyPaths(self.cfg.data_dir, agent_group, session_id))
            self.tracked[session_id] = t
        return t

    def _track_from_disk(self, agent_group: str, session_id: str,
                         found: list[str] | None = None) -> bool:
        """A session folder we have not seen: created by ``send`` in another process,
        or mounted in by someone else. Register it if it looks like a session. With
        ``found`` (``_discover``), the registration is appended there and logged at
        DEBUG: the caller says it once with a count."""
        try:
            validate_id(agent_group, "agent group")
            validate_id(session_id, "session id")
        except InvalidId:
            return False
        if session_id in self.retiring:
            return False
        row = self.registry.session(session_id)
        if row is None:
            if not self._real_session_folder(agent_group, session_id):
                return False
            row, created = self.registry.adopt_folder(agent_group, session_id)
            if created:  # not a `send` that was committing it just then
                where = f"{agent_group}/{session_id}"
                if found is None:
                    logger.info("registered session folder {} found on disk", where)
                else:
                    found.append(where)
                    logger.debug("registered session folder {} found on disk", where)
        if row.agent_group_id != agent_group:
            return False
        t = self._track(agent_group, session_id)
        t.status = Status(row.container_status)
        self.dirty.mark(session_id, Flag.FULL)
        return True

    def _real_session_folder(self, agent_group: str, session_id: str) -> bool:
        """A folder reached without following a link, holding a regular inbound.db.
        A linked one is refused, logged once, and never registered."""
        try:
            with SessionDir(self.cfg.data_dir, agent_group, session_id) as folder:
                st = folder.lstat(INBOUND_DB)
                return st is not None and stat.S_ISREG(st.st_mode)
        except Refused as exc:
            self._refuse(agent_group, session_id, exc.strerror or str(exc))
            return False
        except OSError:
            return False

    def _refuse(self, agent_group: str, session_id: str | None, why: str) -> None:
        if self._refused.say((agent_group, session_id), "refused"):
            logger.warning("{}; leaving it alone", why)

    def _discover(self, at_start: bool = False, folders: bool = True) -> None:
        """Track the registry's sessions and the folders found on disk (``folders``)
        that are not tracked yet. ``at_start``: a session the last run saved as settled
        (``startup_state``) is kept as a dormant row, unchecked and unmarked, for
        ``_reconcile_at_start`` to check against the disk; and the registry is read
        again only if another process wrote it since the last read (its
        ``data_version``: 100 000 rows are ~0.2 s; this process's own new sessions
        are tracked as they are made, or found by their folders)."""
        version = self.registry.data_version()
        if not (at_start and version == self._index_version):
            self._index_version = version
            self._track_index(self.book.saved if at_start else {})
        if folders:
            self._register_found(self._unseen_folders())

    def _track_index(self, saved: dict[str, str]) -> None:
        """(100 000 rows: no call per row but what is needed; one string per group.)"""
        live, dormant, retiring = self.tracked.keys(), self.rows.dormant, self.retiring
        groups: dict[str, str] = {}
        for session_id, agent_group, container_status in self.registry.session_index():
            if session_id in live or session_id in dormant or session_id in retiring:
                continue
            row = saved.get(session_id)
            if row is not None and start_pass_reason(row, row, False,
                                                     container_status) is None:
                group = groups.get(agent_group)
                if group is None:
                    group = groups[agent_group] = sys.intern(agent_group)
                self.rows.rest(session_id, group, row)
                continue
            t = self._track(agent_group, session_id)
            t.status = Status(container_status)
            self.dirty.mark(session_id, Flag.FULL)

    def _unseen_folders(self) -> list[tuple[str, str]]:
        """(group, session) of the folders on disk not tracked yet; listed before any is
        registered, so that progress can say "of how many"."""
        root = sessions_root(self.cfg.data_dir)
        try:
            groups = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
                      or e.is_symlink()]
        except OSError:
            return []
        unseen: list[tuple[str, str]] = []
        live, dormant = self.tracked.keys(), self.rows.dormant  # (no call per name)
        for g in groups:
            if g.is_symlink():  # never listed through: refused, said once
                self._refuse(g.name, None, f"sessions/{g.name} is a symlink")
                continue
            try:
                for s in os.scandir(g.path):
                    if s.name.startswith(STAGING_PREFIX):
                        remove_stale_staging(s)  # left by a `send` killed mid-build
                    elif s.name not in dormant and s.name not in live and (
                            s.is_dir(follow_symlinks=False) or s.is_symlink()):
                        unseen.append((g.name, s.name))
            except OSError:
                continue
        return unseen

    def _register_found(self, unseen: list[tuple[str, str]]) -> None:
        """Register each as found on disk: one INFO line with the count (each one at
        DEBUG), and progress every few seconds on a long start-up."""
        found: list[str] = []
        said = time.monotonic()
        for n, (group, sid) in enumerate(unseen, 1):
            if sid not in self.tracked:
                self._track_from_disk(group, sid, found)
            if time.monotonic() - said >= PROGRESS_EVERY and n < len(unseen):
                said = time.monotonic()
                logger.info("checking session folders found on disk: {} of {}", n, len(unseen))
        if len(found) == 1:
            logger.info("registered session folder {} found on disk", found[0])
        elif found:
            logger.info("registered {} session folders found on disk (each at DEBUG)",
                        len(found))

    # --- the loop -----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self.dirty.wake.wait()
            self.dirty.wake.clear()
            self._take_runtime_news()
            while self.dirty.pending():
                sid, flags = self.dirty.pop()
                t = self.tracked.get(sid)
                if t is not None:
                    self.in_pass = sid
                    try:
                        await self.worker.process(t, flags)
                    finally:
                        self.in_pass = None
                    if flags & Flag.FORCE:
                        self._unreconciled.discard(sid)
                        if not self._unreconciled:
                            self.ready.set()
                            settle_heap(len(self.tracked))
                await asyncio.sleep(0)  # let events in between sessions
                self._take_runtime_news()

    async def _watch(self) -> None:
        root = sessions_root(self.cfg.data_dir)
        mode = watcher.choose_mode(self.cfg.watch)
        value, known = watcher.watch_budget(), watcher.watch_limit()
        limit = None if value is None else budget.Limit(
            value, known.name if known is not None else budget.LIMIT_FILES[0][0])
        self.watch_mode = mode
        async for batch in watcher.batches(root, self.cfg.watch, self.stop_event,
                                           self._watching, mode, self.worker.muted, limit):
            self._on_activity(batch)

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

    async def _reconcile_at_start(self) -> None:
        """Adopt surviving agents, fix statuses that outlived us, queue a full pass each."""
        try:
            adopted = {h.session_id: h for h in await self.runtime.recover()}
            self.worker.egress.keep_only(set(adopted))  # tokens of agents gone meanwhile
            unknown = None
        except Exception as exc:  # noqa: BLE001 - e.g. Docker down: adopt when it is back
            if not (isinstance(exc, RuntimeUnavailable) and exc.reported):  # said once already
                logger.error("could not list existing agents: {}", exc)
            logger.info("agents from before the restart are adopted once the runtime "
                        "answers; their claims are kept until then")
            adopted, unknown = {}, "runtime unavailable at start-up"
        self._discover(at_start=True)
        now = self.clock()
        for sid in adopted.keys() & self.rows.dormant.keys():
            self._wake_unrestored(sid)  # its agent survived: a full pass, as a new one
        for sid, t in list(self.tracked.items()):  # the awake ones: no dormant row is
            if sid in adopted:  # adopted or other than stopped (``_discover``)
                t.started_at = now
                self.statuses.set(t, Status.RUNNING, "adopted after restart", now)
            elif t.status != Status.STOPPED:
                self.statuses.set(t, Status.STOPPED, unknown or "no agent found at start-up",
                                       now)
        skipped = self._skip_unchanged()
        self._unreconciled = set(self.tracked.keys())
        for sid in self._unreconciled:
            # (``_discover``'s FULL mark goes into it: an event from now on comes first)
            self.dirty.queue_backlog(sid, self.dirty.flags.pop(sid, Flag.NONE)
                                     | Flag.FULL | Flag.FORCE)
        if not self._unreconciled:
            self.ready.set()
        settle_heap(len(self.tracked))
        logger.info("orchestrator up: {} sessions ({} unchanged since the last run), {} adopted "
                    "agents, runtime {}, data {}", len(self.tracked), len(skipped), len(adopted),
                    self.runtime.name, self.cfg.data_dir)

    def _skip_unchanged(self) -> set[str]:
        """The sessions whose start-up pass can be skipped (``startup_state``): settled
        when the last run saved them (dormant rows), and nothing on disk changed since;
        the others wake for their full pass. Runs after the watch is up, with no
        ``await`` from the check to the end: a later change has its event. An earlier
        event's mark goes: its change was seen by the check."""
        dormant = self.rows.dormant
        moved, fresh = unchanged(self.cfg.data_dir, dormant)
        for sid in moved:
            self._wake_unrestored(sid)
        for sid, row in fresh.items():  # unchanged; saved with the stamp seen now
            dormant[sid] = (dormant[sid][0], row)
            self.book.refresh(sid, row)
        for sid in dormant.keys() & self.dirty.flags.keys():
            self.dirty.drop(sid)
        self._checked = True
        return set(dormant)

    def _wake_unrestored(self, session_id: str) -> Tracked:
        """A dormant session as a new ``Tracked`` (nothing read yet, stopped): one that
        changed on disk or whose agent was adopted gets its full pass from scratch."""
        group, _ = self.rows.dormant.pop(session_id)
        return self._track(group, session_id)

    async def serve(self) -> None:
        """Run until ``stop_event`` is set, then stop what this started: the engine's
        tasks, and the agents if ``on_shutdown = "stop"``. A failure at any point of
        start-up stops them too. The collaborators are closed by whoever opened them
        (the composition root's exit stack).

        The tasks are kept in a list, not an ``asyncio.TaskGroup``: a group wraps the
        body's own error in an ``ExceptionGroup``, and a ``UserError`` raised during
        start-up must reach the command line as itself (one line, exit 2)."""
        try:
            self._tasks.append(asyncio.create_task(self._watch(), name="watch"))
            await self._start()
            await self.stop_event.wait()
        finally:
            await self._stop_tasks()
            await self._shutdown()

    async def _start(self) -> None:
        await asyncio.sleep(0)  # the watch thread starts adding its watches …
        self._discover(at_start=True, folders=False)  # … while the sessions are listed
        # (again after it, with the folders on disk: late ones)
        try:
            await asyncio.wait_for(self._watching.wait(), WATCH_START_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("file watch not confirmed after {}s; relying on the sweep meanwhile",
                           WATCH_START_TIMEOUT)
        await self._reconcile_at_start()
        self._tasks.append(asyncio.create_task(self._sweep(), name="sweep"))
        if self.retirement is not None:
            self._tasks.append(asyncio.create_task(self.retirement.run(), name="retention"))
        self._worker = asyncio.create_task(self._work(), name="work")
        self.dirty.wake.set()

    async def _stop_tasks(self) -> None:
        """Watch and sweep first; then the work loop, between two sessions' passes."""
        self.stop_event.set()
        tasks = self._tasks + ([self._rescan] if self._rescan is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.dirty.clear()
        self.dirty.wake.set()
        await asyncio.sleep(0)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _shutdown(self) -> None:
        await self.worker.drain_ops(timeout=self.cfg.runtime.stop_grace + 5)
        self.book.save()
        running = self.runtime.running()
        if self.cfg.runtime.on_shutdown == "stop" and running:
            logger.info("stopping {} agents", len(running))
            results = await asyncio.gather(*(self._stop_at_shutdown(h.session_id)
                                             for h in running), return_exceptions=True)
            now = self.clock()
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # e.g. Docker down: their status stays; recover() sorts them out
                logger.warning("could not stop {} of {} agents ({}); they are re-adopted or "
                               "cleaned up on restart", len(failed), len(running), failed[0])
            for h, result in zip(running, results, strict=True):
                t = self.tracked.get(h.session_id)
                if t and not isinstance(result, BaseException):
                    self.statuses.set(t, Status.STOPPED, "stopped at orchestrator shutdown", now)
        elif running:
            logger.info("leaving {} agents running; they are re-adopted on restart",
                        len(running))
        self.worker.cancel_timers(self.tracked.values())

    async def _stop_at_shutdown(self, session_id: str) -> None:
        """One agent's stop, bounded: its grace plus ``SHUTDOWN_SLACK``. A runtime that
        does not confirm the end in time (a kubelet slow to report a deleted Pod, a
        Docker daemon that hangs) must not hold the whole shutdown past the deadline a
        service manager gives it; the agent was told to stop, and what is left of it is
        found and settled by the next start."""
        limit = self.cfg.runtime.stop_grace + SHUTDOWN_SLACK
        try:
            await asyncio.wait_for(self.runtime.stop(session_id, self.cfg.runtime.stop_grace),
                                   limit)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the agent of {session_id} was still stopping after "
                               f"{limit:g}s") from None
