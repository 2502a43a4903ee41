"""What Docker did while nobody asked, as a part of ``DockerRuntime``.

- the event stream (its thread is ``events.py``): ``die`` (the exit), ``oom`` and
  ``kill`` (facts about it) and ``destroy`` of this instance's containers, on the loop;
  every (re)connection first rechecks what was made ahead, then reconciles, then calls
  ``on_available``;
- ``reconcile``: the bookkeeping compared with a list of this instance's containers —
  ends no event reported, live containers unknown to us adopted, dead leftovers removed;
- ``recover`` at startup: the same, strict (an unreachable daemon raises).

A mixin only to keep ``runtime.py`` about its bookkeeping; it has no state of its own
(``DockerRuntime.__init__`` makes ``_events``, ``_loop``, ``_reconcile_lock``, ``_by_id``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from loguru import logger

from orchestrator.runtime.base import AgentHandle, RuntimeUnavailable
from orchestrator.runtime.docker.calls import DockerExec
from orchestrator.runtime.docker.events import DockerEvents
from orchestrator.runtime.docker.netns import NetnsPool
from orchestrator.runtime.docker.spares import Spare, Spares
from orchestrator.runtime.docker.spec import (
    ALIVE_STATES,
    LABEL_GROUP,
    LABEL_INSTANCE,
    LABEL_SESSION,
)
from orchestrator.runtime.docker.tracked import Phase, Tracked


def _event_time(event: dict) -> str | None:
    """An event's time (``timeNano``) as RFC 3339, for a run's wall time."""
    try:
        ns = int(event["timeNano"])
    except (KeyError, TypeError, ValueError):
        return None
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat()


def listed_name(c: dict) -> str:
    """A container's name from a list entry."""
    return ((c.get("Names") or ["?"])[0]).lstrip("/")


class ReconcileMixin:
    # DockerRuntime's, used here (see runtime.py)
    instance: str
    exec: DockerExec
    on_available: Callable[[], None] | None
    _events: DockerEvents
    _netns: NetnsPool
    _spares: Spares
    _by_session: dict[str, Tracked]
    _by_id: dict[str, Tracked]
    _starting: set[str]
    _loop: asyncio.AbstractEventLoop | None
    _reconcile_lock: asyncio.Lock | None
    reconciles: int
    listed: bool

    if TYPE_CHECKING:
        def is_running(self, session_id: str) -> bool: ...
        def _spawn(self, coro: Any) -> None: ...
        def _track(self, t: Tracked) -> None: ...
        def _owns(self, labels: dict[str, str] | None) -> bool: ...
        def _emit(self, t: Tracked, exit_code: int | None, reason: str, *,
                  remove: bool = True, finished: str | None = None) -> None: ...
        async def _remove_owned(self, container_id: str) -> None: ...
        async def _drop_spare(self, spare: Spare) -> None: ...
        async def _frozen_ones(self, handles: list[AgentHandle]) -> None: ...

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
                t = Tracked(AgentHandle(group, session_id, c["Id"], adopted=True), c["Id"],
                            listed_name(c), paused=c.get("State") == "paused")
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
                    logger.info("removing dead container {} ({})", listed_name(c),
                                c.get("Status", c.get("State")))
                    await self._remove_owned(cid)
            self.reconciles += 1
        await self._frozen_ones(adopted)
        return adopted
