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

Which sessions are tracked, and the start-up reconcile, are in ``discovery.py``; the
sweep in ``sweep.py`` (mixins of ``Supervisor``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.contract.layout import Kind, sessions_root
from orchestrator.contract.schema import utcnow
from orchestrator.contract.session_status import Status
from orchestrator.engine.admission_gate import AdmissionGate
from orchestrator.engine.delivery import DeliveryState
from orchestrator.engine.discovery import DiscoveryMixin, settle_heap
from orchestrator.engine.ports import Dirty, RuntimeInbox, StatusBook
from orchestrator.engine.requeue import requeue_failed
from orchestrator.engine.retention import Retirement
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.startup_state import StateBook, waker
from orchestrator.engine.sweep import SweepMixin
from orchestrator.engine.tracked import Flag, Tracked, TrackedMap
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Outcome, Retention
from orchestrator.host.sessions import Sessions
from orchestrator.rules.retention import Action as RetentionAction
from orchestrator.runtime.base import AgentExit, Runtime
from orchestrator.support.logonce import LogOnce
from orchestrator.watch import watcher
from orchestrator.watch.activity import RESCAN, Activity
from orchestrator.watch.head_start import HeadStart

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
SHUTDOWN_SLACK = 10.0  # s beyond stop_grace that shutdown waits for one agent's stop


@dataclass
class Supervisor(DiscoveryMixin, SweepMixin):
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
    # the first inotify watch, built while the process was still being assembled
    # (``watch.head_start``; None: the watch thread builds it)
    head_start: HeadStart | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tracked, TrackedMap):
            raise TypeError("Supervisor.tracked must be a TrackedMap (cli.compose builds one)")
        self.rows: TrackedMap = self.tracked  # the same map, with its dormant rows
        self.rows.wake = waker(self.cfg.data_dir)  # a dormant row, touched
        self.worker.muted.reading = self.dirty.reading  # read by the watch thread
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
        self.worker.forget(session_id)  # its kept connections: closed before the removal
        if session_id in self._unreconciled:  # its start-up pass will never run
            self._unreconciled.discard(session_id)
            if not self._unreconciled:
                self.ready.set()
        if t is not None:
            t.timer.cancel()

    def retired(self, agent_group: str, session_id: str) -> None:
        """``RETIRED_GRACE`` after its removal: out of ``retiring``. Its folder's events
        were dropped meanwhile, so a session restored (or made again with that id) in
        those seconds would go unseen until a sweep: it is looked for once now (a
        removed one has neither a registry row nor a folder: nothing happens)."""
        self.retiring.discard(session_id)
        if session_id not in self.tracked:
            self._track_from_disk(agent_group, session_id)

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
        head = self.head_start
        limit = head.limits[0] if head is not None else watcher.limits()[0]
        self.watch_mode = mode
        async for batch in watcher.batches(root, self.cfg.watch, self.stop_event,
                                           self._watching, mode, self.worker.muted, limit,
                                           head, self.retiring):
            self._on_activity(batch)

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
        self.worker.kept.close()
        self.worker.flush_touches()
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
