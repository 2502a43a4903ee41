"""Docker runtime: one labelled, locked-down container per session.

    DockerRuntime(config: DockerConfig, data_dir: Path, on_exit: ExitCallback)

The constructor does no I/O. The Docker client is created on first use and
rebuilt after a failure; while the daemon is down ``start`` raises
``RuntimeUnavailable`` ("Docker daemon unreachable at ...") and the runtime
recovers by itself once it is back.

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
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from docker.types import Mount
from loguru import logger

from orchestrator import layout
from orchestrator.config import DockerConfig
from orchestrator.runtime.base import (AgentExit, AgentHandle, ExitCallback, RuntimeUnavailable,
                                       SessionRef)
from orchestrator.runtime.dockerexec import DockerExec, _is_unreachable

LABEL_INSTANCE = "orchestrator.instance"
LABEL_GROUP = "orchestrator.agent_group"
LABEL_SESSION = "orchestrator.session"

WORKSPACE = "/workspace"
# Used when the data dir belongs to root: agents never run as root.
FALLBACK_UID = 10001
FALLBACK_GID = 10001
TMPFS_OPTIONS = "rw,nosuid,nodev,size=64m"
ALIVE_STATES = frozenset({"running", "paused", "restarting"})
EVENT_BACKOFF_MAX = 5.0
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")


class MountNotAllowed(RuntimeUnavailable, ValueError):
    """An extra mount (or a session folder) that the config does not allow."""


# --- pure helpers --------------------------------------------------------------

def container_name(instance: str, agent_group: str, session_id: str) -> str:
    raw = f"orch-{instance}-{agent_group}-{session_id}"
    name = _NAME_BAD.sub("_", raw)
    if name != raw:
        name += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return name


def container_labels(instance: str, agent_group: str, session_id: str) -> dict[str, str]:
    return {LABEL_INSTANCE: instance, LABEL_GROUP: agent_group, LABEL_SESSION: session_id}


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def parse_extra_mounts(config: DockerConfig) -> list[Mount]:
    """``[docker] mounts`` as docker Mounts; each host path must be under an allowed root.

    Paths are resolved (symlinks followed) before the check, so a symlink cannot
    smuggle a folder in. Targets may not be /workspace or inside it (the session
    folder belongs to the contract). Raises MountNotAllowed with a one-line message.
    """
    allowed = [Path(a).expanduser().resolve() for a in config.allowed_mounts]
    mounts: list[Mount] = []
    for spec in config.mounts:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise MountNotAllowed(f"[docker] mounts entry {spec!r}: use 'HOST:CONTAINER[:ro]'")
        host, target = Path(parts[0]).expanduser(), PurePosixPath(parts[1])
        read_only = len(parts) == 3 and parts[2] == "ro"
        if not host.is_absolute() or not target.is_absolute():
            raise MountNotAllowed(f"[docker] mounts entry {spec!r}: both paths must be absolute")
        ws = PurePosixPath(WORKSPACE)
        if target == ws or ws in target.parents:
            raise MountNotAllowed(
                f"[docker] mounts entry {spec!r}: {WORKSPACE} is the session folder; "
                "mount somewhere else")
        real = host.resolve()
        if not any(_is_under(real, root) for root in allowed):
            raise MountNotAllowed(
                f"[docker] mounts entry {spec!r}: {real} is not under any [docker] "
                f"allowed_mounts ({', '.join(map(str, allowed)) or 'none configured'})")
        mounts.append(Mount(target=str(target), source=str(real), type="bind",
                            read_only=read_only))
    return mounts


def resolve_user(user: str, data_dir: Path) -> tuple[str, int | None, int | None]:
    """(docker --user value, uid, gid); uid/gid None when given by name.

    ``auto``: the owner of ``data_dir``, so files the agent writes belong to the
    same account as the rest of the data. If that owner is root, agents run as
    the fixed unprivileged ``FALLBACK_UID:FALLBACK_GID`` (10001) instead — never
    as root — and the agent-writable parts of each session folder are chowned to
    it before start (see ``prepare_folder``). A root group is replaced likewise.
    """
    if user == "auto":
        st = data_dir.stat()
        uid, gid = st.st_uid, st.st_gid
        if uid == 0:
            uid, gid = FALLBACK_UID, FALLBACK_GID
        elif gid == 0:
            gid = FALLBACK_GID
        return f"{uid}:{gid}", uid, gid
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if match:
        uid = int(match.group(1))
        gid = int(match.group(2)) if match.group(2) is not None else uid
        return f"{uid}:{gid}", uid, gid
    return user, None, None


def prepare_folder(folder: Path, uid: int | None, gid: int | None) -> list[Path]:
    """Give the agent's uid the parts of the folder it must write; return what changed.

    Only when this process may chown (root) and ids are numeric. Changed: the
    session folder itself (SQLite creates ``outbound.db-journal`` next to the db),
    ``outbound.db``, ``.heartbeat`` and ``outbox/`` with everything in it.
    ``inbound.db`` and ``inbox/`` stay host-owned (the agent only reads them).
    Symlinks are never followed.
    """
    if uid is None or gid is None or os.geteuid() != 0:
        return []
    paths = layout.SessionPaths(folder)
    targets = [folder, paths.outbound_db, paths.heartbeat, paths.outbox]
    if paths.outbox.is_dir() and not paths.outbox.is_symlink():
        for dirpath, dirnames, filenames in os.walk(paths.outbox):
            targets += [Path(dirpath) / n for n in dirnames + filenames]
    changed = []
    for target in targets:
        try:
            st = target.lstat()
        except FileNotFoundError:
            continue
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(target, uid, gid, follow_symlinks=False)
            changed.append(target)
    return changed


def exit_reason(exit_code: int | None, *, stopping: bool = False, killing: bool = False,
                oom: bool = False, kill_signal: str | None = None) -> str:
    """exited | killed | oom | stopped, from what we asked for and what Docker saw."""
    if stopping:
        return "stopped"
    if killing:
        return "killed"
    if oom:
        return "oom"
    if kill_signal is not None:
        sig = kill_signal.upper().removeprefix("SIG")
        if sig in ("9", "KILL"):
            return "killed"
        if sig in ("15", "TERM", "2", "INT"):
            return "stopped"
    if exit_code == 137:
        return "killed"
    return "exited"


@dataclass
class _Tracked:
    handle: AgentHandle
    container_id: str
    name: str
    starting: bool = False
    stopping: bool = False
    killing: bool = False
    oom: bool = False
    kill_signal: str | None = None
    pending_exit: AgentExit | None = None
    done: bool = False


@dataclass
class _EventState:
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stream: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    since: str | None = None
    connected: bool = False
    connects: int = 0


class DockerRuntime:
    """The Runtime protocol (base.py) on a Docker engine. See the module docstring."""

    name = "docker"

    def __init__(self, config: DockerConfig, data_dir: Path, on_exit: ExitCallback):
        self.config = config
        self.data_dir = Path(data_dir)
        self.on_exit = on_exit
        self.instance = config.instance
        self.exec = DockerExec(config.base_url)
        self._by_session: dict[str, _Tracked] = {}
        self._by_id: dict[str, _Tracked] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events = _EventState()
        self._reconcile_lock: asyncio.Lock | None = None
        self.reconciles = 0  # completed reconciles (observable in tests)

    # -- bookkeeping ------------------------------------------------------------
    def is_running(self, session_id: str) -> bool:
        t = self._by_session.get(session_id)
        return t is not None and not t.starting and not t.done

    def running(self) -> list[AgentHandle]:
        return [t.handle for t in self._by_session.values() if not t.starting and not t.done]

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

    def _untrack(self, t: _Tracked) -> None:
        if self._by_session.get(t.handle.session_id) is t:
            del self._by_session[t.handle.session_id]
        if self._by_id.get(t.container_id) is t:
            del self._by_id[t.container_id]
        lock = self._locks.get(t.handle.session_id)
        if lock is not None and not lock.locked():
            del self._locks[t.handle.session_id]

    def _emit(self, t: _Tracked, exit_code: int | None, reason: str, *, remove: bool = True
              ) -> None:
        """Report the end of ``t`` once, then forget it and (in the background, unless
        the caller does it) remove its container."""
        if t.done:
            return
        t.done = True
        self._untrack(t)
        event = AgentExit(t.handle.agent_group, t.handle.session_id, exit_code, reason)
        logger.info("agent {}/{} container {} ended: {} (exit code {})", event.agent_group,
                    event.session_id, t.name, reason, exit_code)
        if t.starting:
            t.pending_exit = event  # delivered after start() returned its handle
        else:
            self._deliver(event)
        if remove:
            self._spawn(self._remove_owned(t.container_id))

    def _deliver(self, event: AgentExit) -> None:
        try:
            self.on_exit(event)
        except Exception:
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
        return bool(labels) and labels.get(LABEL_INSTANCE) == self.instance

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
        if await self._inspect_owned(container_id) is not None:
            await self.exec.remove(container_id)

    # -- start ----------------------------------------------------------------
    def _session_mounts(self, folder: Path) -> list[Mount]:
        data_dir = self.data_dir.resolve()
        real = folder.resolve()
        if not _is_under(real, data_dir):
            raise MountNotAllowed(f"session folder {folder} is not under data_dir {data_dir}")
        inbound = real / layout.INBOUND_DB
        try:
            st = inbound.lstat()
        except FileNotFoundError:
            raise RuntimeUnavailable(
                f"{inbound} does not exist: create the session (inbound.db) before starting it"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise MountNotAllowed(f"{inbound} is not a regular file (symlinks are not followed)")
        return [
            Mount(target=WORKSPACE, source=str(real), type="bind", read_only=False),
            Mount(target=f"{WORKSPACE}/{layout.INBOUND_DB}", source=str(inbound), type="bind",
                  read_only=True),
        ]

    def container_spec(self, session: SessionRef, user: str) -> dict[str, Any]:
        """Arguments for ``APIClient.create_container`` minus host_config (pure)."""
        cfg = self.config
        return {
            "image": cfg.image,
            "command": list(cfg.command),
            "name": container_name(self.instance, session.agent_group, session.session_id),
            "labels": container_labels(self.instance, session.agent_group, session.session_id),
            "user": user,
            "working_dir": WORKSPACE,
            "environment": {
                "HOME": "/tmp",
                "ORCHESTRATOR_AGENT_GROUP": session.agent_group,
                "ORCHESTRATOR_SESSION": session.session_id,
            },
        }

    def host_config_kwargs(self, mounts: list[Mount]) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "mounts": mounts,
            "network_mode": cfg.network,
            "cap_drop": list(cfg.cap_drop),
            "security_opt": ["no-new-privileges:true"] if cfg.no_new_privileges else [],
            "read_only": cfg.read_only_rootfs,
            "tmpfs": {"/tmp": TMPFS_OPTIONS},
            "mem_limit": cfg.memory,
            "nano_cpus": int(round(cfg.cpus * 1e9)),
            "pids_limit": cfg.pids_limit,
            "init": True,
            "auto_remove": False,
        }
        return kwargs

    async def start(self, session: SessionRef) -> AgentHandle:
        layout.validate_id(session.agent_group, "agent group")
        layout.validate_id(session.session_id, "session id")
        self._bind_loop()
        async with self._lock(session.session_id):
            t = self._by_session.get(session.session_id)
            if t is not None and not t.done:
                return t.handle
            self._ensure_events()
            mounts = self._session_mounts(Path(session.folder)) + parse_extra_mounts(self.config)
            user, uid, gid = resolve_user(self.config.user, self.data_dir)
            changed = await self.exec.offload(lambda: prepare_folder(Path(session.folder).resolve(),
                                                                     uid, gid))
            if changed:
                logger.debug("gave {} path(s) in {} to {}", len(changed), session.folder, user)
            await self.exec.require_image(self.config.image)
            self._starting.add(session.session_id)
            try:
                return await self._create_and_start(session, user, mounts)
            finally:
                self._starting.discard(session.session_id)

    async def _create_and_start(self, session: SessionRef, user: str,
                                mounts: list[Mount]) -> AgentHandle:
        spec = self.container_spec(session, user)
        host_kwargs = self.host_config_kwargs(mounts)

        def _create(api: Any) -> dict:
            return api.create_container(host_config=api.create_host_config(**host_kwargs), **spec)

        for attempt in (1, 2):
            try:
                created = await self.exec.call("create", _create, image=self.config.image)
                break
            except RuntimeUnavailable as exc:
                if attempt == 2 or "Conflict" not in str(exc) and "already in use" not in str(exc):
                    raise
                adopted = await self._resolve_name_conflict(session, spec["name"])
                if adopted is not None:
                    return adopted
        assert created is not None
        cid = created["Id"]
        handle = AgentHandle(session.agent_group, session.session_id, cid)
        t = _Tracked(handle, cid, spec["name"], starting=True)
        self._track(t)
        try:
            await self.exec.call("start", lambda api: api.start(cid))
        except RuntimeUnavailable:
            self._untrack(t)
            t.done = True
            try:
                await self._remove_owned(cid)
            except RuntimeUnavailable:
                pass  # daemon down: reconcile / recover removes it later
            raise
        t.starting = False
        logger.info("started agent {}/{} in container {} ({})", session.agent_group,
                    session.session_id, spec["name"], cid[:12])
        if t.pending_exit is not None:
            # It already ended; report that after the caller has its handle.
            asyncio.get_running_loop().call_soon(self._deliver, t.pending_exit)
        return handle

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
            if not self._owns(labels) or labels.get(LABEL_SESSION) != session_id:
                continue
            handle = AgentHandle(labels.get(LABEL_GROUP, ""), session_id, c["Id"], adopted=True)
            name = ((c.get("Names") or ["?"])[0]).lstrip("/")
            out.append(_Tracked(handle, c["Id"], name, done=True))  # untracked: no AgentExit
        return out

    async def stop(self, session_id: str, grace: float) -> None:
        self._bind_loop()
        async with self._lock(session_id):
            for t in await self._targets(session_id):
                if await self._inspect_owned(t.container_id) is None:
                    if not t.done:
                        self._emit(t, None, "vanished")
                    continue
                t.stopping = True
                await self.exec.stop(t.container_id, grace)
                info = await self.exec.inspect(t.container_id)
                code = ((info or {}).get("State") or {}).get("ExitCode")
                self._emit(t, code, "stopped", remove=False)
                await self._remove_owned(t.container_id)

    async def kill(self, session_id: str) -> None:
        self._bind_loop()
        async with self._lock(session_id):
            for t in await self._targets(session_id):
                if await self._inspect_owned(t.container_id) is None:
                    if not t.done:
                        self._emit(t, None, "vanished")
                    continue
                t.killing = True
                await self.exec.kill(t.container_id)
                code = await self.exec.wait(t.container_id, timeout=10)
                self._emit(t, code, "killed", remove=False)
                await self._remove_owned(t.container_id)

    # -- recover --------------------------------------------------------------------
    async def recover(self) -> list[AgentHandle]:
        """Adopt this instance's running containers; remove its dead ones. Others are
        never listed (label filter) nor touched (label re-checked)."""
        self._bind_loop()
        self._ensure_events()
        adopted: list[AgentHandle] = []
        for c in await self.exec.list_labelled([f"{LABEL_INSTANCE}={self.instance}"]):
            labels = c.get("Labels") or {}
            if not self._owns(labels):
                continue
            session_id, group = labels.get(LABEL_SESSION), labels.get(LABEL_GROUP)
            name = ((c.get("Names") or ["?"])[0]).lstrip("/")
            if c.get("State") in ALIVE_STATES and session_id and group:
                t = self._by_session.get(session_id)
                if t is None or t.done:
                    t = _Tracked(AgentHandle(group, session_id, c["Id"], adopted=True), c["Id"], name)
                    self._track(t)
                    logger.info("adopted container {} for {}/{}", name, group, session_id)
                adopted.append(t.handle)
            elif c.get("State") not in ALIVE_STATES and session_id not in self._starting:
                logger.info("removing dead container {} ({})", name, c.get("Status", c.get("State")))
                await self._remove_owned(c["Id"])
        # A container that died between the list and its adoption had its die event
        # ignored (it was not ours yet): one more look closes that window.
        await self.reconcile()
        return [h for h in adopted if self.is_running(h.session_id)]

    # -- event stream -------------------------------------------------------------------
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._reconcile_lock = asyncio.Lock()

    def _ensure_events(self) -> None:
        ev = self._events
        if ev.thread is not None and ev.thread.is_alive():
            return
        ev.stop.clear()
        ev.thread = threading.Thread(target=self._events_main, name=f"docker-events-{self.instance}",
                                     daemon=True)
        ev.thread.start()

    def _post(self, fn: Any, *args: Any) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed meanwhile
            return False
        return True

    def _events_main(self) -> None:
        """Thread: follow this instance's container events; reconnect with backoff.

        The stream ends silently when the daemon restarts and the daemon keeps only
        its last 256 events, so every (re)connect asks for ``since`` the last event
        seen and is followed by a ``reconcile`` on the loop. An unreachable daemon
        is logged once per outage (shared with ``start``'s message).
        """
        ev = self._events
        filters = {"type": "container", "label": f"{LABEL_INSTANCE}={self.instance}"}
        backoff = 0.1
        dropped = False
        other_logged = False
        while not ev.stop.is_set():
            client = None
            try:
                client = self.exec.new_client(timeout=10)
                stream = client.events(decode=True, filters=filters, since=ev.since)
                with ev.lock:
                    if ev.stop.is_set():
                        stream.close()
                        break
                    ev.stream = stream
                ev.connected = True
                ev.connects += 1
                backoff = 0.1
                self.exec.mark_available()
                if dropped:
                    logger.info("Docker event stream reconnected ({}); reconciling",
                                self.exec.where)
                dropped = other_logged = False
                if not self._post(self._after_connect):
                    break
                for event in stream:
                    nano = event.get("timeNano")
                    if nano:
                        ev.since = f"{nano // 1_000_000_000}.{nano % 1_000_000_000:09d}"
                    if not self._post(self._on_event, event):
                        ev.stop.set()
                        break
            except Exception as exc:  # DockerException, requests ConnectionError, ...
                if not ev.stop.is_set():
                    if _is_unreachable(exc):
                        self.exec.mark_unavailable(exc)
                    elif not other_logged:
                        logger.warning("Docker event stream failed at {}: {}; retrying",
                                       self.exec.where, str(exc).splitlines()[0] if str(exc)
                                       else type(exc).__name__)
                        other_logged = True
            finally:
                ev.connected = False
                with ev.lock:
                    ev.stream = None
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
            if ev.stop.is_set():
                break
            if not dropped:
                logger.debug("Docker event stream ended ({}); reconnecting", self.exec.where)
                dropped = True
            ev.stop.wait(backoff)
            backoff = min(backoff * 2, EVENT_BACKOFF_MAX)

    def _after_connect(self) -> None:
        self._spawn(self.reconcile())

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
                code: int | None = int(attrs.get("exitCode"))
            except (TypeError, ValueError):
                code = None
            # stop()/kill() remove the container themselves, after their own wait.
            self._emit(t, code, exit_reason(code, stopping=t.stopping, killing=t.killing,
                                            oom=t.oom, kill_signal=t.kill_signal),
                       remove=not (t.stopping or t.killing))
        elif action == "destroy":
            self._emit(t, None, "vanished")

    async def reconcile(self) -> None:
        """Compare the bookkeeping with Docker: report tracked containers that ended or
        vanished while no event reached us, and remove dead labelled leftovers.

        Runs after every (re)connect of the event stream; a supervisor's periodic
        sweep may call it too (events make it fast, this makes it correct).
        """
        self._bind_loop()
        assert self._reconcile_lock is not None
        async with self._reconcile_lock:
            try:
                found = await self.exec.list_labelled([f"{LABEL_INSTANCE}={self.instance}"])
            except RuntimeUnavailable as exc:
                logger.debug("reconcile skipped: {}", exc)
                return
            by_id = {c["Id"]: c for c in found if self._owns(c.get("Labels"))}
            for t in list(self._by_id.values()):
                if t.starting or t.done:
                    continue
                c = by_id.get(t.container_id)
                if c is None:
                    self._emit(t, None, "vanished")
                elif c.get("State") not in ALIVE_STATES:
                    info = await self.exec.inspect(t.container_id) or {}
                    state = info.get("State") or {}
                    code = state.get("ExitCode")
                    self._emit(t, code, exit_reason(code, stopping=t.stopping, killing=t.killing,
                                                    oom=t.oom or bool(state.get("OOMKilled")),
                                                    kill_signal=t.kill_signal))
            for cid, c in by_id.items():
                session_id = (c.get("Labels") or {}).get(LABEL_SESSION)
                if (cid not in self._by_id and c.get("State") not in ALIVE_STATES
                        and session_id not in self._starting):
                    await self._remove_owned(cid)
            self.reconciles += 1

    # -- close ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop following events and release the client; containers keep running."""
        await self._stop_events()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.exec.close()

    async def _stop_events(self) -> None:
        ev = self._events
        ev.stop.set()
        with ev.lock:
            stream = ev.stream
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass
        thread = ev.thread
        if thread is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, thread.join, 5.0)
            ev.thread = None
