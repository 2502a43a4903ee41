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
reports its end). What a container looks like is ``spec.py`` (pure); the
event-stream thread is ``events.py``; blocking docker-py calls and their
error policy are ``calls.py``; a container's phases are ``tracked.py``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from docker.types import Mount
from loguru import logger

from orchestrator.config.groups import read_env
from orchestrator.config.sections import DockerConfig
from orchestrator.contract import layout
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import (
    AgentExit,
    AgentHandle,
    ExitCallback,
    RuntimeUnavailable,
    SessionRef,
)
from orchestrator.runtime.docker.ahead import AheadMixin, _config_of
from orchestrator.runtime.docker.calls import Conflict, DaemonUnreachable, DockerExec
from orchestrator.runtime.docker.events import DockerEvents
from orchestrator.runtime.docker.freezer import Freezer
from orchestrator.runtime.docker.netns import NetnsPool, joins
from orchestrator.runtime.docker.spares import Spares
from orchestrator.runtime.docker.spec import (
    ALIVE_STATES,
    LABEL_GROUP,
    LABEL_INSTANCE,
    LABEL_SESSION,
    container_name,
    container_spec,
    egress_mounts,
    group_mounts,
    host_config_kwargs,
    parse_extra_mounts,
    prepare_folder,
    session_mounts,
)
from orchestrator.runtime.docker.tracked import Phase, _Tracked
from orchestrator.runtime.docker.usage import UsageMeter
from orchestrator.runtime.identity import AgentIds, group_folder


def _event_time(event: dict) -> str | None:
    """An event's time (``timeNano``) as RFC 3339, for a run's wall time."""
    try:
        ns = int(event["timeNano"])
    except (KeyError, TypeError, ValueError):
        return None
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat()


def _name(c: dict) -> str:
    """A container's name from a list entry."""
    return ((c.get("Names") or ["?"])[0]).lstrip("/")


class DockerRuntime(AheadMixin):
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
        self._by_session: dict[str, _Tracked] = {}
        self._by_id: dict[str, _Tracked] = {}
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

    def _track(self, t: _Tracked) -> None:
        self._by_session[t.handle.session_id] = t
        self._by_id[t.container_id] = t
        self.usage.watch(t.container_id)

    def _untrack(self, t: _Tracked) -> None:
        if self._by_session.get(t.handle.session_id) is t:
            del self._by_session[t.handle.session_id]
        if self._by_id.get(t.container_id) is t:
            del self._by_id[t.container_id]
            self.usage.forget(t.container_id)
            self._freezer.forget(t.container_id)
        lock = self._locks.get(t.handle.session_id)
        if lock is not None and not lock.locked():
            del self._locks[t.handle.session_id]

    def _emit(self, t: _Tracked, exit_code: int | None, reason: str, *, remove: bool = True,
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

    # -- start ----------------------------------------------------------------
    async def start(self, session: SessionRef) -> AgentHandle:
        layout.validate_id(session.agent_group, "agent group")
        layout.validate_id(session.session_id, "session id")
        self._bind_loop()
        began = time.monotonic()
        async with self._lock(session.session_id):
            t = self._by_session.get(session.session_id)
            if t is not None and not t.done:
                return t.handle
            self._ensure_events()
            # the group's image, command, limits, network and mounts (groups.resolve)
            config = _config_of(session, self.config)
            user, uid, gid = self._user(session.session_id)
            mounts = await self._mounts(session, config, uid, gid)
            changed = await self.exec.offload(lambda: prepare_folder(Path(session.folder).resolve(),
                                                                     uid, gid))
            if changed:
                logger.debug("gave {} path(s) in {} to {}", len(changed), session.folder, user)
            self._starting.add(session.session_id)
            try:
                image = await self.exec.require_image(config.image)
                labels = (image or {}).get("Config", {}).get("Labels")
                spare = self._spares.take(session.session_id)
                if spare is not None:
                    handle = await self._start_spare(session, user, mounts, image, spare, began)
                    if handle is not None:
                        return handle
                holder = self._netns.take() if self._joins_netns(session, config) else None
                try:
                    handle = await self._create_and_start(session, user, mounts, labels,
                                                          holder, began)
                except RuntimeUnavailable as exc:
                    self._netns.spent(holder)
                    if holder is None or isinstance(exc, DaemonUnreachable):
                        raise
                    # its holder was gone (removed by hand, OOM): the plain way, once
                    logger.debug("agent {}/{} did not start in netns holder {} ({}): "
                                 "starting it with a namespace of its own",
                                 session.agent_group, session.session_id, holder[:12], exc)
                    return await self._create_and_start(session, user, mounts, labels, None,
                                                        began)
                if handle.adopted:  # a live container of ours had the name: not joined
                    self._netns.spent(holder)
                return handle
            finally:
                self._starting.discard(session.session_id)

    async def _create_and_start(self, session: SessionRef, user: str, mounts: list[Mount],
                                labels: dict[str, str] | None, holder: str | None,
                                began: float) -> AgentHandle:
        created = await self._create(session, user, mounts, labels, joins(holder))
        if isinstance(created, AgentHandle):
            return created
        return await self._start_created(session, created, container_name(
            self.instance, session.agent_group, session.session_id), began,
            "a netns made ahead" if holder else "a netns of its own", holder)

    def _user(self, session_id: str) -> tuple[str, int | None, int | None]:
        """(docker --user, uid, gid): ``identity.AgentIds.user_of``."""
        return self._ids.user_of(session_id)

    async def _create(self, session: SessionRef, user: str, mounts: list[Mount],
                      image_labels: dict[str, str] | None = None,
                      network_mode: str | None = None) -> str | AgentHandle:
        """``docker create``; the new container's id, or the handle of a live container
        of ours that already had the name (adopted). The group's settings, its secret
        files read now (``SecretUnreadable`` is an OSError). ``network_mode``: a
        netns holder's (``netns.joins``) instead of the group's network."""
        spec, host_kwargs = self._build(session, user, mounts, image_labels, network_mode)
        config = _config_of(session, self.config)

        def _create(api: Any) -> dict:
            return api.create_container(host_config=api.create_host_config(**host_kwargs), **spec)

        for attempt in (1, 2):
            try:
                created = await self.exec.call("create", _create, image=config.image)
                break
            except Conflict:  # HTTP 409: the name is taken
                if attempt == 2:
                    raise
                adopted = await self._resolve_name_conflict(session, spec["name"])
                if adopted is not None:
                    return adopted
        assert created is not None
        return created["Id"]

    def _build(self, session: SessionRef, user: str, mounts: list[Mount],
               image_labels: dict[str, str] | None, network_mode: str | None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The create and host-config arguments of a session's container (``spec.py``)."""
        config = _config_of(session, self.config)
        env = read_env(session.settings) if session.settings is not None else {}
        if session.egress is not None:  # the gateway's token and CA: never a key
            env.update(session.egress.env)
            mounts = mounts + egress_mounts(session)
        spec = container_spec(config, session, user, env, image_labels)
        host_kwargs = host_config_kwargs(config, mounts, self._ids.shared_gids(
            session.agent_group, bool(config.group_folder)))
        if session.egress is not None and session.egress.network:
            host_kwargs["network_mode"] = session.egress.network  # internal: no route out
        if network_mode is not None:
            host_kwargs["network_mode"] = network_mode
        return spec, host_kwargs

    async def _start_created(self, session: SessionRef, cid: str, name: str,
                             began: float | None = None, how: str = "a netns of its own",
                             holder: str | None = None) -> AgentHandle:
        """``docker start`` of a created container; on failure it is removed (its netns
        ``holder`` is the caller's then; once started, the session's: ``ahead.py``). Its
        log line says how long the start took (from ``began``) and ``docker start`` in it."""
        handle = AgentHandle(session.agent_group, session.session_id, cid)
        t = _Tracked(handle, cid, name, Phase.STARTING, ref=session, holder=holder)
        self._track(t)
        called = time.monotonic()
        try:
            await self.exec.call("start", lambda api: api.start(cid))
        except RuntimeUnavailable:
            self._untrack(t)
            t.move(Phase.DONE)
            try:
                await self._remove_owned(cid)
            except RuntimeUnavailable:
                pass  # daemon down: reconcile / recover removes it later
            raise
        t.move(Phase.RUNNING)  # unless it already ended (DONE, with its pending exit)
        self._spares.started(session.session_id)
        done = time.monotonic()
        logger.info("started agent {}/{} in container {} ({}) in {:.0f} ms (docker start {:.0f} "
                    "ms, {})", session.agent_group, session.session_id, name, cid[:12],
                    1000 * (done - (began or called)), 1000 * (done - called), how)
        if t.pending_exit is not None:
            # It already ended; report that after the caller has its handle.
            asyncio.get_running_loop().call_soon(self._deliver, t.pending_exit)
        return handle

    async def _mounts(self, session: SessionRef, config: DockerConfig, uid: int | None,
                      gid: int | None) -> list[Mount]:
        """The session folder, the group's extra mounts and its group folder (if any)."""
        mounts = session_mounts(Path(session.folder), self.data_dir) + parse_extra_mounts(config)
        folder = group_folder(config.group_folder, self.data_dir, session.agent_group)
        mode = None
        if folder is not None:  # the agents' uid, or with a uid per session root:<gid> 02770
            uid, gid, mode = self._ids.group_owner(session.agent_group, uid, gid)
        return mounts + await self.exec.offload(lambda: group_mounts(
            folder, Path(session.folder).resolve(), self.data_dir, config.allowed_mounts,
            uid, gid, mode))

    async def _resolve_name_conflict(self, session: SessionRef, name: str) -> AgentHandle | None:
        """The container name is taken. Ours and alive → adopt it; ours and dead →
        remove it (the caller retries create); not ours → refuse."""
        info = await self.exec.inspect(name)
        if info is None:
            return None  # gone meanwhile: retry
        labels = (info.get("Config") or {}).get("Labels") or {}
        if not self._owns(labels) or labels.get(LABEL_SESSION) != session.session_id:
            raise RuntimeUnavailable(
                f"container name {name} is taken by a container this orchestrator does not own "
                f"(no {LABEL_INSTANCE}={self.instance} label): rename or remove it")
        if (info.get("State") or {}).get("Status") in ALIVE_STATES:
            handle = AgentHandle(session.agent_group, session.session_id, info["Id"], adopted=True)
            self._track(_Tracked(handle, info["Id"], name))
            logger.info("adopted running container {} for {}/{}", name, session.agent_group,
                        session.session_id)
            return handle
        await self._remove_owned(info["Id"])
        return None

    # -- stop / kill ------------------------------------------------------------------
    async def _targets(self, session_id: str) -> list[_Tracked]:
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
            out.append(_Tracked(handle, c["Id"], _name(c), Phase.DONE))  # untracked: no AgentExit
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

    async def _thaw(self, t: _Tracked) -> None:
        if not (t.frozen and self._freezer.thaw(t.container_id)):
            await self.exec.unpause(t.container_id)  # docker's pause (or its freezer is gone)
        t.paused = t.frozen = False

    async def stop(self, session_id: str, grace: float) -> None:
        async def end(t: _Tracked) -> int | None:
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
        async def end(t: _Tracked) -> int | None:
            t.move(Phase.KILLING)
            if t.paused:
                await self._thaw(t)
            await self.usage.sample([t.container_id])
            await self.exec.kill(t.container_id)
            return await self.exec.wait(t.container_id, timeout=10)

        await self._end(session_id, end, "killed")

    async def _end(self, session_id: str, end: Callable[[_Tracked], Awaitable[int | None]],
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

    # -- recover --------------------------------------------------------------------
    async def recover(self) -> list[AgentHandle]:
        """Adopt this instance's running containers; remove its dead ones. Others are
        never listed (label filter) nor touched (label re-checked).

        If the daemon does not answer, this raises and ``listed`` stays False; the
        reconcile after the event stream connects adopts them instead.
        """
        self._bind_loop()
        self._ensure_events()
        self._netns.fill()
        adopted = await self._reconcile(strict=True)
        # A container that died between the list and its adoption had its die event
        # ignored (it was not ours yet): one more look closes that window.
        await self.reconcile()
        return [h for h in adopted if self.is_running(h.session_id)]

    def _adopt_alive(self, found: list[dict]) -> list[AgentHandle]:
        """Track the live, owned containers of ``found`` that are not tracked yet
        (bookkeeping only); return the handles of every live owned one."""
        handles: list[AgentHandle] = []
        for c in found:
            labels = c.get("Labels") or {}
            session_id, group = labels.get(LABEL_SESSION), labels.get(LABEL_GROUP)
            if (not self._owns(labels) or c.get("State") not in ALIVE_STATES
                    or not session_id or not group or session_id in self._starting):
                continue
            t = self._by_session.get(session_id)
            if t is None or t.done:
                t = _Tracked(AgentHandle(group, session_id, c["Id"], adopted=True), c["Id"],
                             _name(c), paused=c.get("State") == "paused")
                self._track(t)
                logger.info("adopted container {} for {}/{}", t.name, group, session_id)
            handles.append(t.handle)
        return handles

    # -- event stream -------------------------------------------------------------------
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._reconcile_lock = asyncio.Lock()
            self._events.bind(loop)

    def _ensure_events(self) -> None:
        self._events.ensure_started()

    def _after_connect(self) -> None:
        self._spawn(self._reconnected())

    async def _reconnected(self) -> None:
        await self._netns.recheck()  # a daemon restart ends the holders: not handed out
        for spare in self._spares.drain():  # (and the containers created ahead joined them)
            await self._drop_spare(spare)
        await self.reconcile()
        if self.on_available is not None:
            try:
                self.on_available()
            except Exception:  # noqa: BLE001  # pragma: no cover - a callback bug must not end it
                logger.exception("on_available callback failed")

    def _on_event(self, event: dict) -> None:
        """On the loop: one container event of this instance."""
        action = str(event.get("Action") or event.get("status") or "")
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        attrs = actor.get("Attributes") or {}
        if attrs.get(LABEL_INSTANCE) != self.instance:
            return
        t = self._by_id.get(cid)
        if t is None or t.done:
            return
        if action == "oom":
            t.oom = True
        elif action == "kill":
            t.kill_signal = str(attrs.get("signal") or "")
        elif action == "die":
            try:
                code: int | None = int(attrs["exitCode"])
            except (KeyError, TypeError, ValueError):
                code = None
            # stop()/kill() remove the container themselves, after their own wait.
            self._emit(t, code, t.exit_reason(code),
                       remove=t.phase not in (Phase.STOPPING, Phase.KILLING),
                       finished=_event_time(event))
        elif action == "destroy":
            self._emit(t, None, "vanished")

    async def ping(self) -> None:
        await self.exec.call("ping", lambda api: api.ping())

    async def reconcile(self) -> None:
        """Compare the bookkeeping with Docker: report tracked containers that ended or
        vanished while no event reached us, adopt live ones we did not know of, and
        remove dead labelled leftovers.

        Runs after every (re)connect of the event stream; a supervisor's periodic
        sweep may call it too (events make it fast, this makes it correct).
        """
        await self._reconcile(strict=False)

    async def _reconcile(self, *, strict: bool) -> list[AgentHandle]:
        """``reconcile``; returns the handles it adopted. ``strict``: an unreachable
        daemon raises (``recover``) instead of skipping this round (the sweep)."""
        self._bind_loop()
        assert self._reconcile_lock is not None
        async with self._reconcile_lock:
            try:
                found = await self.exec.list_labelled([f"{LABEL_INSTANCE}={self.instance}"])
            except RuntimeUnavailable as exc:
                if strict:
                    raise
                logger.debug("reconcile skipped: {}", exc)
                return []
            by_id = {c["Id"]: c for c in found if self._owns(c.get("Labels"))}
            self.listed = True
            # ours and alive, but unknown: from before a restart (recover), or one
            # during which the daemon did not answer (a later reconcile)
            adopted = self._adopt_alive([c for cid, c in by_id.items() if cid not in self._by_id])
            for t in list(self._by_id.values()):
                if t.phase in (Phase.STARTING, Phase.DONE):
                    continue
                c = by_id.get(t.container_id)
                if c is None:
                    self._emit(t, None, "vanished")
                elif c.get("State") not in ALIVE_STATES:
                    info = await self.exec.inspect(t.container_id) or {}
                    state = info.get("State") or {}
                    code = state.get("ExitCode")
                    self._emit(t, code, t.exit_reason(code, oom=bool(state.get("OOMKilled"))),
                               finished=state.get("FinishedAt"))
            for cid, c in by_id.items():
                session_id = (c.get("Labels") or {}).get(LABEL_SESSION)
                if (cid not in self._by_id and c.get("State") not in ALIVE_STATES
                        and session_id not in self._starting and not self._spares.owns(cid)):
                    logger.info("removing dead container {} ({})", _name(c),
                                c.get("Status", c.get("State")))
                    await self._remove_owned(cid)
            self.reconciles += 1
        await self._frozen_ones(adopted)
        return adopted

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
