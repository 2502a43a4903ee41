"""Docker runtime: one labelled, locked-down container per session.

    DockerRuntime(config: DockerConfig, data_dir: Path, on_exit: ExitCallback,
                  on_available: Callable[[], None] | None = None)

The constructor does no I/O. The Docker client is created on first use and
rebuilt after a failure; while the daemon is down ``start`` raises
``RuntimeUnavailable`` ("Docker daemon unreachable at ...") and the runtime
recovers by itself once it is back: every (re)connection of the event stream
reconciles and then calls ``on_available``, the supervisor's cue to retry the
starts it had put off, instead of waiting out each session's backoff.

Containers
    name   ``orch-<instance>-<agent_group>-<session_id>`` (characters Docker does
           not allow become ``_``; a short hash is appended when that changed
           anything, so two ids cannot collide)
    labels ``orchestrator.instance``, ``orchestrator.agent_group``,
           ``orchestrator.session``. Only containers carrying this instance's
           label are ever listed, stopped or removed: the label is the filter of
           every list call AND is re-checked (inspect) before every stop/kill/remove.
    mounts the session folder at /workspace (rw) and its inbound.db again,
           read-only, at /workspace/inbound.db on top (the host is its only
           writer); extra ``[docker] mounts`` only from under ``allowed_mounts``.
    limits from DockerConfig: user, cap_drop (ALL), no-new-privileges, read-only
           root with a tmpfs /tmp, memory, cpus, pids, network (default none),
           and docker-init as PID 1 so SIGTERM reaches the agent.

Exits are reported through ``on_exit`` exactly once per container, on the event
loop: from the ``die`` event (exit code from ``Actor.Attributes.exitCode``), from
``stop``/``kill`` themselves, or from the reconcile that follows every
(re)connection of the event stream (for containers that ended while nobody was
listening). Containers are created without ``auto_remove`` so the exit code
survives; the runtime removes each container once its exit is handled.

Ahead of demand (``ahead.py``): network namespaces (``netns.py``: an agent of a
network-"none" group joins one made before it was asked for — half of a plain
``docker start``), a session's next container created after a good end (``spares.py``:
a cold start is then only ``docker start``), and idle agents frozen through their
cgroup's freezer (``freezer.py``: thawed by one write, not ``docker unpause``).

This module is the bookkeeping (which container belongs to which session, who
reports its end), the ownership guard, stop/kill/pause and close. Starting a
container is ``start.py``; the event stream, reconcile and recover are
``reconcile.py`` (its thread is ``events.py``). What a container looks like is
``spec.py`` (pure); blocking docker-py calls and their error policy are
``calls.py``; a container's phases are ``tracked.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

from loguru import logger

from orchestrator.config.sections import DockerConfig
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import AgentExit, AgentHandle, ExitCallback, RuntimeUnavailable
from orchestrator.runtime.docker.ahead import AheadMixin
from orchestrator.runtime.docker.calls import DaemonUnreachable, DockerExec
from orchestrator.runtime.docker.events import DockerEvents
from orchestrator.runtime.docker.freezer import Freezer
from orchestrator.runtime.docker.netns import NetnsPool
from orchestrator.runtime.docker.reconcile import ReconcileMixin, listed_name
from orchestrator.runtime.docker.spares import Spares
from orchestrator.runtime.docker.spec import LABEL_GROUP, LABEL_INSTANCE, LABEL_SESSION
from orchestrator.runtime.docker.start import StartMixin
from orchestrator.runtime.docker.tracked import Phase, Tracked
from orchestrator.runtime.docker.usage import UsageMeter
from orchestrator.runtime.identity import AgentIds


class DockerRuntime(StartMixin, ReconcileMixin, AheadMixin):
    """The Runtime protocol (base.py) on a Docker engine. See the module docstring."""

    name = "docker"

    def __init__(self, config: DockerConfig, data_dir: Path, on_exit: ExitCallback,
                 on_available: Callable[[], None] | None = None, *,
                 uid_range: tuple[int, int] | None = None,
                 agent_logs: AgentLogs | None = None):
        self.config = config
        self.data_dir = Path(data_dir)
        # one uid per session (root, [runtime] uid_range, [docker] user = auto): identity
        self._ids = AgentIds(self.data_dir, config.user, uid_range)
        # each container's output, collected before it is removed (``_keep_logs``)
        self.logs = agent_logs or AgentLogs(self.data_dir)
        # containers being removed by us (their output kept first): id -> done
        self._removing: dict[str, asyncio.Future] = {}
        self.on_exit = on_exit
        self.on_available = on_available
        self.instance = config.instance
        self.exec = DockerExec(config.base_url)
        # each running container's CPU and peak memory, read from its cgroup (usage.py)
        self.usage = UsageMeter(self.exec)
        # network namespaces made ahead of demand: half of a plain start (netns.py)
        self._netns = NetnsPool(self.exec, self.instance, config.image, config.netns_pool)
        # sessions' next containers, created ahead of demand after a good end (spares.py)
        self._spares = Spares(config.prepared_containers)
        # idle agents frozen through their cgroup, not docker pause (freezer.py)
        self._freezer = Freezer(self.exec)
        self._preparing: set[asyncio.Future] = set()
        self._by_session: dict[str, Tracked] = {}
        self._by_id: dict[str, Tracked] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events = DockerEvents(self.exec, self.instance, self._on_event,
                                    self._after_connect)
        self._reconcile_lock: asyncio.Lock | None = None
        self.reconciles = 0  # completed reconciles (observable in tests)
        self._closing = False
        self.listed = False  # see Runtime.listed: set by the first list that succeeds

    # -- bookkeeping ------------------------------------------------------------
    def is_running(self, session_id: str) -> bool:
        t = self._by_session.get(session_id)
        return t is not None and t.live

    def running(self) -> list[AgentHandle]:
        return [t.handle for t in self._by_session.values() if t.live]

    def is_paused(self, session_id: str) -> bool:
        t = self._by_session.get(session_id)
        return t is not None and t.paused and not t.done

    @property
    def events_connected(self) -> bool:
        return self._events.connected

    @property
    def event_connects(self) -> int:
        """How many times the event stream has (re)connected."""
        return self._events.connects

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    def _track(self, t: Tracked) -> None:
        self._by_session[t.handle.session_id] = t
        self._by_id[t.container_id] = t
        self.usage.watch(t.container_id)

    def _untrack(self, t: Tracked) -> None:
        if self._by_session.get(t.handle.session_id) is t:
            del self._by_session[t.handle.session_id]
        if self._by_id.get(t.container_id) is t:
            del self._by_id[t.container_id]
            self.usage.forget(t.container_id)
            self._freezer.forget(t.container_id)
        lock = self._locks.get(t.handle.session_id)
        if lock is not None and not lock.locked():
            del self._locks[t.handle.session_id]

    def _emit(self, t: Tracked, exit_code: int | None, reason: str, *, remove: bool = True,
              finished: str | None = None) -> None:
        """Report the end of ``t`` once (with its usage: the meter's last reading; its
        end ``finished``, default now), then forget it and (in the background, unless
        the caller does it) remove its container."""
        was = t.phase
        if not t.move(Phase.DONE):
            return
        usage = self.usage.take(t.container_id, finished)
        self._untrack(t)
        event = AgentExit(t.handle.agent_group, t.handle.session_id, exit_code, reason, usage)
        logger.info("agent {}/{} container {} ended: {} (exit code {})", event.agent_group,
                    event.session_id, t.name, reason, exit_code)
        if was is Phase.STARTING:
            t.pending_exit = event  # delivered after start() returned its handle
        else:
            self._deliver(event)
        removal = self._remove_owned(t.container_id) if remove else None
        if not self._want_next(t, reason, exit_code, removal):
            if removal is not None:
                self._spawn(removal)
            self._netns.spent(t.holder)  # nothing runs in its namespace any more

    def _deliver(self, event: AgentExit) -> None:
        try:
            self.on_exit(event)
        except Exception:  # noqa: BLE001 - a callback bug must not stop the other exits
            logger.exception("on_exit callback failed for {}", event)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, RuntimeUnavailable):
                logger.debug("docker background task: {}", exc)
            else:
                logger.opt(exception=exc).error("docker background task failed")

    # -- ownership guard ----------------------------------------------------------
    def _owns(self, labels: dict[str, str] | None) -> bool:
        return labels is not None and labels.get(LABEL_INSTANCE) == self.instance

    async def _inspect_owned(self, container_id: str) -> dict | None:
        """Inspect; None when gone. Refuses (logs, returns None) a container without our label."""
        info = await self.exec.inspect(container_id)
        if info is None:
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        if not self._owns(labels):
            logger.error("refusing to touch container {} ({}): it lacks label {}={}",
                         info.get("Name", "?").lstrip("/"), container_id[:12], LABEL_INSTANCE,
                         self.instance)
            return None
        return info

    async def _remove_owned(self, container_id: str) -> None:
        info = await self._inspect_owned(container_id)
        if info is None:
            return
        pending = self._removing.get(container_id)
        if pending is not None:  # an exit and a reconcile may both remove it: the second
            await asyncio.shield(pending)  # waits for the first (its output kept once,
            return  # and not cut off by a removal while it is read)
        done = self._removing[container_id] = asyncio.get_running_loop().create_future()
        try:
            await self._keep_logs(container_id, info)
            await self.exec.remove(container_id)
        finally:
            del self._removing[container_id]
            done.set_result(None)

    async def _keep_logs(self, container_id: str, info: dict) -> None:
        """Every removal of ours passes here: the container's output (its last
        ``[sessions] max_agent_log_bytes``) becomes its session's next run log
        (``agent_logs``) first — a container that exited 1 right at start included.
        Read and written in the docker pool, never on the loop; a failure is one line
        and the removal goes on, but a daemon that went away (its outage said once)
        raises: the container stays, and the reconcile after the daemon is back keeps
        its output and removes it. A run that printed nothing leaves no file."""
        labels = (info.get("Config") or {}).get("Labels") or {}
        group, session_id = labels.get(LABEL_GROUP), labels.get(LABEL_SESSION)
        if not group or not session_id:
            return
        try:
            got = await self.exec.logs(container_id, self.logs.max_bytes)
            if got is None or not (got[0] or got[1]):
                return
            run = await self.exec.offload(lambda: self.logs.keep(group, session_id, *got))
        except DaemonUnreachable:
            raise  # (said once) no removal either: the reconcile once it is back keeps it
        except (RuntimeUnavailable, OSError, ValueError) as exc:
            logger.warning("agent {}/{}: output of container {} not kept: {}", group,
                           session_id, container_id[:12], exc)
            return
        logger.debug("agent {}/{}: output kept as run {}", group, session_id, run)

    # -- stop / kill ------------------------------------------------------------------
    async def _targets(self, session_id: str) -> list[Tracked]:
        """The tracked container for ``session_id``, or labelled ones found by listing."""
        t = self._by_session.get(session_id)
        if t is not None and not t.done:
            return [t]
        found = await self.exec.list_labelled(
            [f"{LABEL_INSTANCE}={self.instance}", f"{LABEL_SESSION}={session_id}"])
        out = []
        for c in found:
            labels = c.get("Labels") or {}
            if (not self._owns(labels) or labels.get(LABEL_SESSION) != session_id
                    or self._spares.owns(c["Id"])):
                continue
            handle = AgentHandle(labels.get(LABEL_GROUP, ""), session_id, c["Id"], adopted=True)
            # untracked: no AgentExit
            out.append(Tracked(handle, c["Id"], listed_name(c), Phase.DONE))
        return out

    async def pause(self, session_id: str) -> None:
        """Freeze the container's cgroup, its memory kept: through its freezer file
        (``freezer.py``; thawed in ~1 ms) unless ``[docker] pause_with = "docker"`` or
        that file is out of reach here, else ``docker pause``."""
        t = self._by_session.get(session_id)
        if t is not None and t.live and not t.paused:
            if self.config.pause_with == "cgroup" and await self._freezer.freeze(
                    t.container_id):
                t.frozen = True
            else:
                await self.exec.pause(t.container_id)
            t.paused = True

    async def resume(self, session_id: str) -> None:
        t = self._by_session.get(session_id)
        if t is not None and not t.done and t.paused:
            await self._thaw(t)

    async def _thaw(self, t: Tracked) -> None:
        if not (t.frozen and self._freezer.thaw(t.container_id)):
            await self.exec.unpause(t.container_id)  # docker's pause (or its freezer is gone)
        t.paused = t.frozen = False

    async def stop(self, session_id: str, grace: float) -> None:
        async def end(t: Tracked) -> int | None:
            t.move(Phase.STOPPING)
            if t.paused:  # a frozen agent cannot act on SIGTERM: thaw it first
                await self._thaw(t)
            await self.usage.sample([t.container_id])  # its last reading before the signal
            await self.exec.stop(t.container_id, grace)
            info = await self.exec.inspect(t.container_id)
            t.finished = ((info or {}).get("State") or {}).get("FinishedAt")
            return ((info or {}).get("State") or {}).get("ExitCode")

        await self._end(session_id, end, "stopped")

    async def kill(self, session_id: str) -> None:
        async def end(t: Tracked) -> int | None:
            t.move(Phase.KILLING)
            if t.paused:
                await self._thaw(t)
            await self.usage.sample([t.container_id])
            await self.exec.kill(t.container_id)
            return await self.exec.wait(t.container_id, timeout=10)

        await self._end(session_id, end, "killed")

    async def _end(self, session_id: str, end: Callable[[Tracked], Awaitable[int | None]],
                   reason: str) -> None:
        """Stop or kill every owned container of a session, report its exit, remove it.
        A container that is already gone is done (reported once as vanished)."""
        self._bind_loop()
        async with self._lock(session_id):
            for t in await self._targets(session_id):
                if await self._inspect_owned(t.container_id) is None:
                    if not t.done:
                        self._emit(t, None, "vanished")
                    continue
                code = await end(t)
                self._emit(t, code, reason, remove=False, finished=t.finished)
                await self._remove_owned(t.container_id)

    async def ping(self) -> None:
        await self.exec.call("ping", lambda api: api.ping())

    # -- close ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop following events and release the client; containers keep running."""
        self._closing = True
        await self._stop_events()
        if self._preparing:  # a create under way finishes (else it would be left behind)
            await asyncio.wait(set(self._preparing), timeout=10)
        for spare in self._spares.drain():
            await self._drop_spare(spare)
        await self._netns.close()
        await self.usage.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.exec.close()
        self._ids.close()

    async def _stop_events(self) -> None:
        await self._events.stop()
