"""Ending a session's Pod on request (``stop``, ``kill``), as a part of ``KubernetesRuntime``.

A stop or kill deletes the Pod (with ``gracePeriodSeconds`` = grace, at least 1 s:
``tracked.KILL_GRACE``), keeps its output first (``logs.around``), waits until it
is gone and reports its exit (``stopped`` / ``killed``) once. A session with no
tracked Pod still has its Pods found by label and deleted (one left by a crash).
Separate from ``runtime.py`` because it is the one path that ends a Pod the
orchestrator chose to end; exits it did not choose come from the watch there.

A mixin with no state of its own (``KubernetesRuntime.__init__`` makes ``calls``,
``logs``, ``_book``; ``_lock``, ``_emit`` and ``_owns`` are its methods).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from orchestrator.runtime.kubernetes.calls import KubeCalls
from orchestrator.runtime.kubernetes.logs import PodLogs
from orchestrator.runtime.kubernetes.pods import exit_reason
from orchestrator.runtime.kubernetes.spec import ids_of, pod_selectors
from orchestrator.runtime.kubernetes.tracked import (
    GONE_SLACK,
    KILL_GRACE,
    Book,
    Phase,
    TrackedPod,
    until_gone,
    wait_deleted,
)


class EndMixin:
    # KubernetesRuntime's, used here (see runtime.py)
    instance: str
    node: str
    calls: KubeCalls
    logs: PodLogs
    _book: Book

    if TYPE_CHECKING:
        def _lock(self, session_id: str) -> asyncio.Lock: ...
        def _owns(self, pod: dict[str, Any]) -> bool: ...
        def _emit(self, t: TrackedPod, exit_code: int | None, reason: str, *,
                  delete: bool = True) -> None: ...

    async def stop(self, session_id: str, grace: float) -> None:
        await self._end(session_id, Phase.STOPPING, max(KILL_GRACE, int(round(grace))))

    async def kill(self, session_id: str) -> None:
        await self._end(session_id, Phase.KILLING, KILL_GRACE)

    async def _end(self, session_id: str, phase: Phase, grace: int) -> None:
        """Delete the session's Pod (tracked, or ours found by label), wait until it is
        gone, report its exit (``stopped`` / ``killed``). Absent = done."""
        async with self._lock(session_id):
            t = self._book.live(session_id)
            if t is not None:
                if t.phase is Phase.RUNNING:  # else a stop or kill under way keeps its reason
                    t.phase = phase
                await self.logs.around(t.handle.agent_group, session_id, t.name,
                                       grace + GONE_SLACK, self._delete_tracked(t, grace))
                self._emit(t, t.view.exit_code, exit_reason(
                    t.view, stopping=t.phase is Phase.STOPPING,
                    killing=t.phase is Phase.KILLING), delete=False)
                return
            pods, _ = await self.calls.list(*pod_selectors(self.instance, self.node,
                                                           session_id))
            for pod in pods:
                meta = pod.get("metadata") or {}
                ids = ids_of(meta)
                if not self._owns(pod) or ids is None or ids[1] != session_id:
                    continue
                await self.logs.around(ids[0], session_id, meta["name"], grace + GONE_SLACK,
                                       self._delete_named(meta["name"], grace))

    async def _delete_tracked(self, t: TrackedPod, grace: int) -> None:
        await self.calls.delete(t.name, grace)
        await wait_deleted(t, self.calls, self.node, grace + GONE_SLACK)

    async def _delete_named(self, name: str, grace: int) -> None:
        await self.calls.delete(name, grace)
        await until_gone(self.calls, self.node, name, grace + GONE_SLACK)
