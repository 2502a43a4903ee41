"""What the Docker runtime does ahead of demand, as a part of ``DockerRuntime``.

- a session's next container, created after its agent ended well and started by
  the next ``start`` if it is still what that start would create (``spares.py``);
- where an agent's network namespace comes from (``netns.py``: made ahead for a
  group with network "none" and no egress);
- adopted containers frozen through their cgroup (``freezer.py``): paused.

A mixin only to keep ``runtime.py`` about its bookkeeping; it has no state of its own
(``DockerRuntime.__init__`` makes ``_spares``, ``_netns``, ``_freezer``, ``_preparing``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable

from loguru import logger

from orchestrator.config.sections import DockerConfig
from orchestrator.runtime.base import AgentHandle, RuntimeUnavailable, SessionRef
from orchestrator.runtime.docker.calls import DaemonUnreachable, DockerExec
from orchestrator.runtime.docker.freezer import Freezer
from orchestrator.runtime.docker.netns import NetnsPool, joins
from orchestrator.runtime.docker.spares import Spare, Spares, spare_key, wants_spare
from orchestrator.runtime.docker.tracked import _Tracked

if TYPE_CHECKING:
    from docker.types import Mount


def _config_of(session: SessionRef, default: DockerConfig) -> DockerConfig:
    """The group's effective [docker] settings, or the runtime's own without any."""
    return session.settings.docker if session.settings is not None else default


class AheadMixin:
    # DockerRuntime's, used here (see runtime.py)
    config: DockerConfig
    exec: DockerExec
    _spares: Spares
    _netns: NetnsPool
    _freezer: Freezer
    _preparing: set[asyncio.Future]
    _closing: bool
    _starting: set[str]
    _by_session: dict[str, _Tracked]

    if TYPE_CHECKING:
        def _lock(self, session_id: str) -> asyncio.Lock: ...
        def is_running(self, session_id: str) -> bool: ...
        def _user(self, session_id: str) -> tuple[str, int | None, int | None]: ...
        def _task_done(self, task: asyncio.Future) -> None: ...
        def _build(self, session: SessionRef, user: str, mounts: list[Mount],
                   image_labels: dict[str, str] | None, network_mode: str | None
                   ) -> tuple[dict[str, Any], dict[str, Any]]: ...
        async def _inspect_owned(self, container_id: str) -> dict | None: ...
        async def _mounts(self, session: SessionRef, config: DockerConfig, uid: int | None,
                          gid: int | None) -> list[Mount]: ...
        async def _start_created(self, session: SessionRef, cid: str, name: str,
                                 began: float | None = None, how: str = "a netns of its own",
                                 holder: str | None = None) -> AgentHandle: ...

    async def _start_spare(self, session: SessionRef, user: str, mounts: list[Mount],
                           image: dict, spare: Spare, began: float) -> AgentHandle | None:
        """Start the session's container created ahead (``spares.py``) if it is exactly
        what would be created now; else (or if it does not start) remove it: None."""
        labels = (image or {}).get("Config", {}).get("Labels")
        spec, host_kwargs = self._build(session, user, mounts, labels, joins(spare.holder))
        may_join = spare.holder is None or self._joins_netns(session, _config_of(session,
                                                                                 self.config))
        if may_join and spare_key(spec, host_kwargs, str(image.get("Id"))) == spare.key:
            try:
                return await self._start_created(session, spare.container_id, spec["name"],
                                                 began, "created ahead", spare.holder)
            except RuntimeUnavailable as exc:  # removed by _start_created: the plain way
                self._netns.spent(spare.holder)
                if isinstance(exc, DaemonUnreachable):
                    raise
                logger.debug("agent {}/{}: its container created ahead did not start ({})",
                             session.agent_group, session.session_id, exc)
            return None
        logger.debug("agent {}/{}: its container created ahead is out of date (settings, "
                     "image or uid changed): creating a new one", session.agent_group,
                     session.session_id)
        await self._drop_spare(spare)
        return None

    async def _drop_spare(self, spare: Spare) -> None:
        """Remove a spare container and its holder (nothing ran in it: no output)."""
        self._netns.spent(spare.holder)
        try:
            info = await self._inspect_owned(spare.container_id)
            if info is not None:
                await self.exec.remove(spare.container_id)
        except RuntimeUnavailable as exc:
            logger.debug("container {} created ahead not removed: {}", spare.container_id[:12],
                         exc)

    def _want_next(self, t: _Tracked, reason: str, exit_code: int | None,
                   removal: Awaitable[None] | None) -> bool:
        """After a good end, create the session's next container ahead (``spares.py``),
        after ``removal`` of the old one (its name is the next one's; a stop or kill
        removes it under the session's lock, which the creation waits for); whether it
        took ``removal`` over."""
        ref = t.ref
        if (ref is None or not self._spares.on or self._closing or ref.egress is not None
                or not wants_spare(reason, exit_code) or self.exec.available is False
                or not self._spares.returning(ref.session_id)):
            return False
        task = asyncio.ensure_future(self._prepare_next(ref, removal, t.holder))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)
        task.add_done_callback(self._task_done)
        return True

    async def _prepare_next(self, session: SessionRef, removal: Awaitable[None] | None,
                            holder: str | None) -> None:
        """Create the session's next container, joined to the namespace its last one had
        (``holder``: kept for the session, so a cold cycle makes no namespace at all) or,
        for an adopted one, one from the pool; with none, a namespace of its own at start."""
        try:
            if removal is not None:
                await removal  # raises while the daemon is away: then nothing is made ahead
            if self._closing or self.exec.available is False:
                return
            config = _config_of(session, self.config)
            if not self._joins_netns(session, config):  # its network is not "none" now
                self._netns.spent(holder)
                holder = None
            elif holder is None:
                holder = self._netns.take()
            async with self._lock(session.session_id):
                if (self._closing or self.is_running(session.session_id)
                        or session.session_id in self._starting):
                    return
                user, uid, gid = self._user(session.session_id)
                mounts = await self._mounts(session, config, uid, gid)
                image = await self.exec.require_image(config.image)
                labels = (image or {}).get("Config", {}).get("Labels")
                spec, host_kwargs = self._build(session, user, mounts, labels, joins(holder))
                created = await self.exec.call("create ahead", lambda api: api.create_container(
                    host_config=api.create_host_config(**host_kwargs), **spec),
                    image=config.image)
                key = spare_key(spec, host_kwargs, str(image.get("Id")))
                spare = Spare(session.session_id, created["Id"], holder, key)
                holder = None  # the spare's now
                for old in self._spares.put(spare):
                    await self._drop_spare(old)
        except (RuntimeUnavailable, OSError) as exc:
            logger.debug("session {}: no container created ahead: {}", session.session_id, exc)
        finally:
            self._netns.spent(holder)

    def _joins_netns(self, session: SessionRef, config: DockerConfig) -> bool:
        """Whether this agent's namespace may come from the pool: only where it would be
        a loopback-only one of its own anyway (network "none", no egress)."""
        self._netns.fill()
        return config.network == "none" and session.egress is None

    async def _frozen_ones(self, handles: list[AgentHandle]) -> None:
        """Adopted containers Docker calls running may be frozen through their cgroup
        (``freezer.py``, by the orchestrator before its restart): they are paused."""
        for h in handles:
            t = self._by_session.get(h.session_id)
            if t is not None and not t.paused and await self._freezer.is_frozen(t.container_id):
                t.paused = t.frozen = True
                logger.info("container {} of {}/{} is frozen: adopted as paused", t.name,
                            h.agent_group, h.session_id)
