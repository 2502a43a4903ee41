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
import fcntl
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from loguru import logger

from orchestrator.api import server as api_server
from orchestrator.channels import Channel, make_channel
from orchestrator.config.model import Config
from orchestrator.contract.layout import (
    INBOUND_DB,
    InvalidId,
    Kind,
    registry_path,
    session_paths,
    sessions_root,
    validate_id,
)
from orchestrator.contract.schema import utcnow
from orchestrator.contract.session_status import Status
from orchestrator.engine.admission_gate import open_gate
from orchestrator.engine.delivery import Deliverer
from orchestrator.engine.session_worker import Flag, Flags, SessionWorker, Tracked
from orchestrator.engine.startup_state import StateBook, unchanged
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import Refused, SessionDir, open_group
from orchestrator.host.sessions import STAGING_PREFIX, Sessions, remove_stale_staging
from orchestrator.runtime.base import AgentExit, Runtime
from orchestrator.support.errors import UserError, storage
from orchestrator.support.logonce import LogOnce
from orchestrator.support.signals import capture_signals
from orchestrator.support.ticker import ticks
from orchestrator.watch import watcher

Clock = Callable[[], datetime]

_KIND_FLAGS = {
    Kind.HEARTBEAT: Flag.HEARTBEAT,
    Kind.OUTBOUND_DB: Flag.OUTBOUND,
    Kind.OUTBOX: Flag.OUTBOX,
    Kind.INBOUND_DB: Flag.INBOUND,
    Kind.INBOX: Flag.NONE,
    Kind.SESSION: Flag.FULL,
}


def make_runtime(cfg: Config, on_exit: Callable[[AgentExit], None],
                 on_available: Callable[[], None]) -> Runtime:
    """``on_available``: the runtime can start agents again (the Docker daemon is
    back). The local runtime is never unavailable, so it does not take one."""
    if cfg.runtime.kind == "docker":
        from orchestrator.runtime.docker.runtime import DockerRuntime

        return DockerRuntime(cfg.docker, cfg.data_dir, on_exit, on_available)
    from orchestrator.runtime.local.runtime import LocalRuntime

    return LocalRuntime(cfg.runtime, cfg.data_dir, on_exit)


WATCH_START_TIMEOUT = 10.0
SWEEP_TICK = 1.0  # seconds between two slices of the reconcile sweep


def sweep_plan(interval: float, tick: float = SWEEP_TICK) -> tuple[float, int]:
    """(seconds between slices, number of slices) so that every session is swept
    once per ``interval``, one slice about every ``tick`` seconds."""
    slices = max(1, round(interval / tick))
    return interval / slices, slices



class AlreadyRunning(UserError):
    pass


@dataclass
class DataDirLock:
    """The held locks; ``release`` (or the process's exit) lets the next ``run`` in."""

    fds: list[int]

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """One supervisor per data dir: two would deliver the same replies twice.

    The lock is an ``flock`` on the data directory itself, which nobody can delete
    from under a running supervisor (a lock *file* can be removed, and the next
    ``run`` would lock a new file of the same name). ``orchestrator.lock`` is
    locked as well, so a supervisor from before this change is excluded too.
    """
    with storage(data_dir, "create the data directory"):
        data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock([])
    try:
        with storage(data_dir, "lock the data directory"):
            try:
                lock.fds.append(os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY))
                fcntl.flock(lock.fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                legacy = data_dir / "orchestrator.lock"
                if os.access(data_dir, os.W_OK) or legacy.exists():
                    lock.fds.append(os.open(legacy, os.O_RDWR | os.O_CREAT, 0o644))
                    fcntl.flock(lock.fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(f"another orchestrator is running on {data_dir}; "
                                     "stop it first") from None
    except BaseException:
        lock.release()
        raise
    return lock


@dataclass
class Supervisor:
    cfg: Config
    runtime_factory: Callable[[Config, Callable[[AgentExit], None], Callable[[], None]],
                              Runtime] = make_runtime
    channel: Channel | None = None
    clock: Clock = utcnow
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.tracked: dict[str, Tracked] = {}
        self._dirty: dict[str, Flags] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.watch_mode: str | None = None
        self._unreconciled: set[str] = set()
        self._watching = asyncio.Event()
        self.last_sweep: float | None = None
        self._refused = LogOnce()  # linked folders (agent group, session id), said once

    # --- events in ----------------------------------------------------------------

    def mark(self, session_id: str, flags: Flags) -> None:
        self._dirty[session_id] = self._dirty.get(session_id, Flag.NONE) | flags
        self._wake.set()

    def _on_exit(self, ev: AgentExit) -> None:
        t = self.tracked.get(ev.session_id)
        if t is not None:
            t.exit = ev
            self.mark(ev.session_id, Flag.EXIT)
        self.admission.agent_exited(ev.session_id)  # a slot is free: the queue moves on

    def _on_runtime_available(self) -> None:
        """The runtime answers again (and has just reconciled): retry what an outage
        put off now, not when each session's backoff ends, and look again at every
        session whose agent the reconcile found alive or gone."""
        self.admission.runtime_available()
        for t in self.tracked.values():
            unblocked = self.worker.unblock(t)
            if unblocked or self.runtime.is_running(t.session_id) != (t.status != Status.STOPPED):
                self.mark(t.session_id, Flag.TIMER)

    def _on_activity(self, batch: list[watcher.Activity]) -> None:
        for act in batch:
            if act == watcher.RESCAN:  # events may have been lost: a sweep, now
                self._discover()
                for sid in self.tracked:
                    self.mark(sid, Flag.SWEEP)
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
                self.mark(act.session_id, flags)

    # --- discovery ----------------------------------------------------------------

    def _track(self, agent_group: str, session_id: str) -> Tracked:
        t = self.tracked.get(session_id)
        if t is None:
            paths = session_paths(self.cfg.data_dir, agent_group, session_id)
            t = Tracked(agent_group, session_id, paths)
            self.tracked[session_id] = t
        return t

    def _track_from_disk(self, agent_group: str, session_id: str) -> bool:
        """A session folder we have not seen: created by ``send`` in another process,
        or mounted in by someone else. Register it if it looks like a session."""
        try:
            validate_id(agent_group, "agent group")
            validate_id(session_id, "session id")
        except InvalidId:
            return False
        paths = session_paths(self.cfg.data_dir, agent_group, session_id)
        row = self.registry.session(session_id)
        if row is None:
            if not self._real_session_folder(agent_group, session_id):
                return False
            row, created = self.registry.adopt_folder(agent_group, session_id)
            if created:  # not a `send` that was committing it just then
                logger.info("registered session folder {}/{} found on disk", agent_group,
                            session_id)
        if row.agent_group_id != agent_group:
            return False
        t = self._track(agent_group, session_id)
        t.status = Status(row.container_status)
        self.mark(session_id, Flag.FULL)
        return True

    def _real_session_folder(self, agent_group: str, session_id: str) -> bool:
        """A folder reached without following a link, holding a regular inbound.db.
        A linked one is refused, logged once, and never registered."""
        try:
            with SessionDir(self.cfg.data_dir, agent_group, session_id) as folder:
                st = folder.lstat(INBOUND_DB)
                return st is not None and stat.S_ISREG(st.st_mode)
        except Refused as exc:
            self._refuse(agent_group, session_id, exc.strerror)
            return False
        except OSError:
            return False

    def _refuse(self, agent_group: str, session_id: str | None, why: str) -> None:
        if self._refused.say((agent_group, session_id), "refused"):
            logger.warning("{}; leaving it alone", why)

    def _discover(self) -> None:
        for session_id, agent_group, container_status in self.registry.session_index():
            if session_id not in self.tracked:
                t = self._track(agent_group, session_id)
                t.status = Status(container_status)
                self.mark(session_id, Flag.FULL)
        root = sessions_root(self.cfg.data_dir)
        try:
            groups = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
                      or e.is_symlink()]
        except OSError:
            return
        for g in groups:
            if g.is_symlink():  # never listed through: refused, said once
                self._refuse(g.name, None, f"sessions/{g.name} is a symlink")
                continue
            try:
                for s in os.scandir(g.path):
                    if s.name.startswith(STAGING_PREFIX):
                        remove_stale_staging(s)  # left by a `send` killed mid-build
                    elif s.name not in self.tracked and (s.is_dir(follow_symlinks=False)
                                                         or s.is_symlink()):
                        self._track_from_disk(g.name, s.name)
            except OSError:
                continue

    # --- the loop -----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                sid = next(iter(self._dirty))
                flags = self._dirty.pop(sid)
                t = self.tracked.get(sid)
                if t is not None:
                    await self.worker.process(t, flags)
                    if flags & Flag.FORCE:
                        self._unreconciled.discard(sid)
                        if not self._unreconciled:
                            self.ready.set()
                await asyncio.sleep(0)  # let events in between sessions

    async def _watch(self) -> None:
        root = sessions_root(self.cfg.data_dir)
        mode, warning = watcher.choose_mode(self.cfg.watch, watcher.count_dirs(root),
                                            watcher.watch_budget())
        if warning:
            logger.warning(warning)
        self.watch_mode = mode
        async for batch in watcher.batches(root, self.cfg.watch, self.stop_event,
                                           self._watching, mode, self.worker.muted):
            self._on_activity(batch)

    async def _sweep(self) -> None:
        """Every session once per ``sweep_interval``, a slice per tick (see ``sweep_plan``):
        10 000 sessions no longer arrive as one lump of passes. Only sessions whose
        files changed on disk since their last pass (3 ``stat`` calls), whose last pass
        failed or whose status disagrees with the runtime get a pass at all."""
        tick, slices = sweep_plan(self.cfg.watch.sweep_interval)
        order: list[str] = []
        async for k in ticks(tick, self.stop_event):
            self.last_sweep = time.monotonic()  # /healthz: the loop is sweeping
            part = k % slices
            if part == 0 or not order:  # a new round: the runtime, new folders, the order
                try:
                    await self.runtime.reconcile()
                except Exception as exc:  # the runtime logs its own outages; keep sweeping
                    logger.debug("runtime reconcile failed: {}", exc)
                self._discover()
                order = list(self.tracked)
            self._sweep_slice(order[part::slices])
            self._book.save()

    def _sweep_slice(self, sids: list[str]) -> None:
        """Each group folder is opened once per slice (``safefs.open_group``); a swept
        session costs an ``lstat`` of its folder and two or three ``stat`` calls through
        it (``safefs.FolderStat``), no ``open``."""
        group_fds: dict[str, int | None] = {}
        try:
            for sid in sids:
                t = self.tracked.get(sid)
                if t is None:
                    continue
                if t.agent_group not in group_fds:
                    try:
                        group_fds[t.agent_group] = open_group(self.cfg.data_dir, t.agent_group)
                    except OSError:  # a linked group too: the pass says what is wrong
                        group_fds[t.agent_group] = None
                if flags := self.worker.sweep_flags(t, group_fds[t.agent_group]):
                    self.mark(sid, flags)
        finally:
            for fd in group_fds.values():
                if fd is not None:
                    os.close(fd)

    async def _open(self) -> None:
        data_dir = self.cfg.data_dir
        listen, token = api_server.preflight(self.cfg)  # refused here: nothing started yet
        self._dir_lock = lock_data_dir(data_dir)
        sessions_root(data_dir).mkdir(parents=True, exist_ok=True)
        self.registry = Registry(registry_path(data_dir))
        self.sessions = Sessions(data_dir, self.registry, self.cfg.sessions.max_attachment_bytes)
        self.channel = self.channel or make_channel(self.cfg.delivery)
        self.runtime = self.runtime_factory(self.cfg, self._on_exit, self._on_runtime_available)
        self.deliverer = Deliverer(data_dir, self.registry, self.channel, self.cfg.delivery)
        self.worker = SessionWorker(self.cfg, self.registry, self.sessions, self.runtime,
                                    self.deliverer, self.clock, self.mark)
        self.admission = self.worker.admission = open_gate(
            self.cfg, self.tracked, self.runtime, self.registry, self.mark,
            self.worker.set_status, self.clock)
        self._book = StateBook(self.registry)
        self.worker.after_pass = lambda t: self._book.note(t, self.runtime.is_running(
            t.session_id))
        if hasattr(self.channel, "bind"):  # the webhook: an outcome is known → a pass
            self.channel.bind(lambda sid: self.mark(sid, Flag.OUTBOUND))
        self.api = api_server.ApiService(self, listen, token)

    async def _reconcile_at_start(self) -> None:
        """Adopt surviving agents, fix statuses that outlived us, queue a full pass each."""
        try:
            adopted = {h.session_id: h for h in await self.runtime.recover()}
            unknown = None
        except Exception as exc:  # e.g. Docker down: keep going, adopt when it is back
            if not getattr(exc, "reported", False):  # the runtime said it once already
                logger.error("could not list existing agents: {}", exc)
            logger.info("agents from before the restart are adopted once the runtime "
                        "answers; their claims are kept until then")
            adopted, unknown = {}, "runtime unavailable at start-up"
        self._discover()
        now = self.clock()
        before = {sid: t.status for sid, t in self.tracked.items()}
        for sid, t in self.tracked.items():
            if sid in adopted:
                t.started_at = now
                self.worker.set_status(t, Status.RUNNING, "adopted after restart", now)
            elif t.status != Status.STOPPED:
                self.worker.set_status(t, Status.STOPPED, unknown or "no agent found at start-up",
                                       now)
        skipped = self._skip_unchanged(adopted, before)
        self._unreconciled = set(self.tracked) - skipped
        for sid in self._unreconciled:
            self._dirty[sid] = Flag.FULL | Flag.FORCE
        if not self._unreconciled:
            self.ready.set()
        logger.info("orchestrator up: {} sessions ({} unchanged since the last run), {} adopted "
                    "agents, runtime {}, data {}", len(self.tracked), len(skipped), len(adopted),
                    self.runtime.name, self.cfg.data_dir)

    def _skip_unchanged(self, adopted: dict, before: dict[str, Status]) -> set[str]:
        """The sessions whose start-up pass can be skipped (``startup_state``): settled
        when the last run saved them, and nothing on disk changed since. Runs after the
        watch is up, with no ``await`` from the check to the end: a later change has its
        event. ``_discover``'s mark goes; an earlier event's change was seen by the check."""
        skipped = unchanged(self.cfg.data_dir, self.tracked, self._book.saved,
                            set(adopted), before)
        for sid in skipped:
            self._dirty.pop(sid, None)
        return skipped

    async def serve(self) -> None:
        """Run until ``stop_event`` is set, then shut down cleanly."""
        await self._open()
        await self.api.start()
        self._tasks = [asyncio.create_task(self._watch(), name="watch")]
        await asyncio.sleep(0)  # the watch thread starts adding its watches …
        self._discover()  # … while the sessions are listed (again after it, for late ones)
        try:
            await asyncio.wait_for(self._watching.wait(), WATCH_START_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("file watch not confirmed after {}s; relying on the sweep meanwhile",
                           WATCH_START_TIMEOUT)
        await self._reconcile_at_start()
        self._tasks.append(asyncio.create_task(self._sweep(), name="sweep"))
        worker = asyncio.create_task(self._work(), name="work")
        self._wake.set()
        try:
            await self.stop_event.wait()
        finally:
            await self._shutdown(worker)

    async def _shutdown(self, worker: asyncio.Task) -> None:
        self.stop_event.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._dirty.clear()
        self._wake.set()
        await asyncio.sleep(0)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await self.worker.drain_ops(timeout=self.cfg.runtime.stop_grace + 5)
        self._book.save()
        running = self.runtime.running()
        if self.cfg.runtime.on_shutdown == "stop" and running:
            logger.info("stopping {} agents", len(running))
            results = await asyncio.gather(
                *(self.runtime.stop(h.session_id, self.cfg.runtime.stop_grace)
                  for h in running), return_exceptions=True)
            now = self.clock()
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # e.g. Docker down: their status stays; recover() sorts them out
                logger.warning("could not stop {} of {} agents ({}); they are re-adopted or "
                               "cleaned up on restart", len(failed), len(running), failed[0])
            for h, result in zip(running, results):
                t = self.tracked.get(h.session_id)
                if t and not isinstance(result, BaseException):
                    self.worker.set_status(t, Status.STOPPED, "stopped at orchestrator shutdown", now)
        elif running:
            logger.info("leaving {} agents running; they are re-adopted on restart",
                        len(running))
        self.worker.cancel_timers(self.tracked.values())
        await self.api.close()
        await self.runtime.close()
        if hasattr(self.channel, "aclose"):
            await self.channel.aclose()
        self.channel.close()
        self.registry.close()
        self._dir_lock.release()
        logger.info("orchestrator stopped")


def run(cfg: Config) -> int:
    """``orchestrator run``: serve until SIGINT/SIGTERM."""

    async def main() -> int:
        sup = Supervisor(cfg)
        with capture_signals(sup.stop_event):
            await sup.serve()  # AlreadyRunning, ApiConfigError: one line and exit 2 (cli.main)
        return 0

    return asyncio.run(main())

