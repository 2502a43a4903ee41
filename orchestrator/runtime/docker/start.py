"""Starting a session's container, as a part of ``DockerRuntime``.

``start`` and what it is made of: the agent's user and mounts, the container's create
arguments (``_build``: what ``spec.py`` makes of a session's settings), ``docker
create`` (its name already taken: that container adopted or removed, or a refusal when
it is not ours: ``_resolve_name_conflict``) and ``docker start`` — of the session's
container created ahead when it is still the one a create would make, joined to a
network namespace made ahead where the group allows it (``ahead.py``).

A mixin only to keep ``runtime.py`` about its bookkeeping (which container belongs to
which session, who reports its end); it has no state of its own (``DockerRuntime.__init__``
makes ``_ids``, ``_spares``, ``_netns``, ``_starting``, ``_by_session``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from orchestrator.config.groups import read_env
from orchestrator.config.sections import DockerConfig
from orchestrator.contract import layout
from orchestrator.runtime.base import AgentExit, AgentHandle, RuntimeUnavailable, SessionRef
from orchestrator.runtime.docker.ahead import config_of
from orchestrator.runtime.docker.calls import Conflict, DaemonUnreachable, DockerExec
from orchestrator.runtime.docker.netns import NetnsPool, joins
from orchestrator.runtime.docker.spares import Spare, Spares
from orchestrator.runtime.docker.spec import (
    ALIVE_STATES,
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
from orchestrator.runtime.docker.tracked import Phase, Tracked
from orchestrator.runtime.identity import AgentIds, group_folder

if TYPE_CHECKING:
    from docker.types import Mount


class StartMixin:
    # DockerRuntime's, used here (see runtime.py)
    config: DockerConfig
    data_dir: Path
    instance: str
    exec: DockerExec
    _ids: AgentIds
    _spares: Spares
    _netns: NetnsPool
    _by_session: dict[str, Tracked]
    _starting: set[str]

    if TYPE_CHECKING:
        def _bind_loop(self) -> None: ...
        def _ensure_events(self) -> None: ...
        def _lock(self, session_id: str) -> asyncio.Lock: ...
        def _track(self, t: Tracked) -> None: ...
        def _untrack(self, t: Tracked) -> None: ...
        def _owns(self, labels: dict[str, str] | None) -> bool: ...
        def _deliver(self, event: AgentExit) -> None: ...
        def _joins_netns(self, session: SessionRef, config: DockerConfig) -> bool: ...
        async def _remove_owned(self, container_id: str) -> None: ...
        async def _start_spare(self, session: SessionRef, user: str, mounts: list[Mount],
                               image: dict, spare: Spare, began: float) -> AgentHandle | None: ...

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
            config = config_of(session, self.config)
            user, uid, gid = self._user(session.session_id)
            self._starting.add(session.session_id)
            try:
                # three independent round trips to the pool (each a thread hop, the image
                # a daemon call): side by side, the start waits for the slowest only
                mounts, changed, image = await asyncio.gather(
                    self._mounts(session, config, uid, gid),
                    self.exec.offload(lambda: prepare_folder(Path(session.folder).resolve(),
                                                             uid, gid)),
                    self.exec.require_image(config.image))
                if changed:
                    logger.debug("gave {} path(s) in {} to {}", len(changed), session.folder,
                                 user)
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
        config = config_of(session, self.config)

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
        config = config_of(session, self.config)
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
        t = Tracked(handle, cid, name, Phase.STARTING, ref=session, holder=holder)
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
            self._track(Tracked(handle, info["Id"], name))
            logger.info("adopted running container {} for {}/{}", name, session.agent_group,
                        session.session_id)
            return handle
        await self._remove_owned(info["Id"])
        return None
