"""The runtime's record of one Pod of ours, and the waits on it.

    TrackedPod   handle, name, phase, the Pod object's uid, its latest ``PodView``,
                 whether it is gone; ``see`` (a watch event or a read) wakes waiters
    Phase        STARTING -> RUNNING -> STOPPING | KILLING -> DONE
    Book         which Pod belongs to which session (by session id, by name)
    wait_deleted / until_gone   after a delete: wait until the Pod is really gone
                 (an ended one's object removed at once: ``clear_ended``)

A Pod's name is the same for every start of a session (``spec.pod_name``), so the
uid tells one Pod from the next: an event or a read about another uid is not about
this record. Waits are woken by the watch (``see``) and, when it says nothing for
``POLL`` s, read the Pod themselves: a watch that is down or late only makes a wait
slower, never wrong.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from loguru import logger

from orchestrator.runtime.base import AgentExit, AgentHandle, RuntimeUnavailable
from orchestrator.runtime.kubernetes.calls import KubeCalls
from orchestrator.runtime.kubernetes.pods import ENDED, PENDING, PodView, classify

# s: the shortest graceful delete. 0 would be a *force* delete: the API object goes at
# once while the kubelet may still run the container, so "gone" would not mean "dead".
KILL_GRACE = 1
GONE_SLACK = 30.0  # s beyond the grace to wait for a deleted Pod to disappear
POLL = 2.0  # s between fallback reads while waiting on a Pod the watch is silent about


class StartFailed(RuntimeUnavailable):
    """The Pod was created but its container could not start (image, node, scheduling):
    logged once by the runtime, so callers do not log it again per retry."""

    reported = True


class Phase(Enum):
    STARTING = auto()  # created, start() waits for it to run: its exit waits for the handle
    RUNNING = auto()
    STOPPING = auto()  # we deleted it with a grace: its exit is "stopped"
    KILLING = auto()  # we deleted it with KILL_GRACE: its exit is "killed"
    DONE = auto()  # its exit was reported (or it was never ours to report)


LIVE = frozenset({Phase.RUNNING, Phase.STOPPING, Phase.KILLING})  # what is_running means


@dataclass
class TrackedPod:
    handle: AgentHandle
    name: str
    phase: Phase = Phase.RUNNING
    uid: str | None = None  # the Pod object's uid: a later Pod of the same name is another
    view: PodView = PodView(PENDING)
    gone: bool = False  # its DELETED event (or a 404) was seen
    pending_exit: AgentExit | None = None  # ended while STARTING: reported after start()
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def see(self, view: PodView, *, gone: bool = False) -> None:
        self.view = view
        self.gone = self.gone or gone
        self.changed.set()

    async def wait_change(self, timeout: float) -> None:
        """Until the next ``see`` or ``timeout`` s (call right after reading ``view``)."""
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass

    async def refresh(self, calls: KubeCalls) -> None:
        """Read the Pod (the watch said nothing): its view, or gone."""
        pod = await calls.get(self.name)
        if pod is None or (pod.get("metadata") or {}).get("uid") != self.uid:
            self.see(self.view, gone=True)
        else:
            self.see(classify(pod))


class Book:
    """Which Pod belongs to which session: by session id and by Pod name (no I/O)."""

    def __init__(self) -> None:
        self.by_session: dict[str, TrackedPod] = {}
        self.by_name: dict[str, TrackedPod] = {}

    def track(self, t: TrackedPod) -> None:
        self.by_session[t.handle.session_id] = t
        self.by_name[t.name] = t

    def untrack(self, t: TrackedPod) -> None:
        if self.by_session.get(t.handle.session_id) is t:
            del self.by_session[t.handle.session_id]
        if self.by_name.get(t.name) is t:
            del self.by_name[t.name]

    def live(self, session_id: str) -> TrackedPod | None:
        """The session's Pod while it is not DONE (STARTING included)."""
        t = self.by_session.get(session_id)
        return t if t is not None and t.phase is not Phase.DONE else None

    def running(self) -> list[AgentHandle]:
        return [t.handle for t in self.by_session.values() if t.phase in LIVE]


class Background:
    """Tasks the runtime starts and does not await (deleting finished Pods): failures
    logged (an outage at debug: it is said once elsewhere), all cancelled at close."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Future] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, RuntimeUnavailable):
                logger.debug("kubernetes background task: {}", exc)
            else:
                logger.opt(exception=exc).error("kubernetes background task failed")

    async def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _still_there(name: str, timeout: float, node: str) -> RuntimeUnavailable:
    return RuntimeUnavailable(f"Pod {name} was deleted but is still there after {timeout:g}s: "
                              f"is the kubelet on node {node} up?")


async def wait_deleted(t: TrackedPod, calls: KubeCalls, node: str, timeout: float) -> None:
    """After deleting ``t``'s Pod: until it is gone (its last view kept in ``t.view``).
    Once its container has ended, the object is removed at once (``clear_ended``)."""
    deadline = time.monotonic() + timeout
    cleared = False
    while not t.gone:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _still_there(t.name, timeout, node)
        if t.view.state == ENDED and not cleared:
            await clear_ended(calls, t.name)
            cleared = True
        before = t.view
        await t.wait_change(min(POLL, left))
        if t.view is before and not t.gone:
            await t.refresh(calls)


async def until_gone(calls: KubeCalls, node: str, name: str, timeout: float) -> None:
    """After deleting an untracked Pod by name: until a read finds none (an ended one
    removed at once, as in ``wait_deleted``)."""
    deadline = time.monotonic() + timeout
    cleared = False
    while time.monotonic() < deadline:
        pod = await calls.get(name)
        if pod is None:
            return
        if not cleared and classify(pod).state == ENDED:
            await clear_ended(calls, name)
            cleared = True
            continue
        await asyncio.sleep(0.25)
    raise _still_there(name, timeout, node)


async def clear_ended(calls: KubeCalls, name: str) -> None:
    """Remove the object of a deleted Pod whose container has ended (grace 0).

    After the container ends, the kubelet keeps the object until it has reclaimed the
    Pod's volumes and cgroups, which took more than 30 s on a loaded node; nothing of
    the agent runs any more, so waiting for that only held up a stop (and the
    orchestrator's shutdown). A grace of 0 is safe here and only here: it is the
    *running* container that a force delete would leave behind (see ``KILL_GRACE``)."""
    await calls.delete(name, 0)
