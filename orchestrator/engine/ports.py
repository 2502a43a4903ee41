"""The engine's small shared parts, built first so that nothing is patched on later.

The composition root (``orchestrator.cli.compose``) builds these before the objects
that use them, then hands them to constructors:

- ``Dirty``: which sessions need a pass and why (``mark``), and the wake-up of the
  supervisor's work loop. The worker, the gate and the channel mark; the supervisor
  takes.
- ``RuntimeInbox``: what the runtime reports from its own threads and tasks (an agent
  exited, the runtime answers again), kept until the supervisor's loop reads it. The
  runtime is built before the supervisor, so it gets these two methods, not the
  supervisor.
- ``StatusBook``: a session's status change, written to the registry, logged and
  told to the API's hub. The gate and the worker both write statuses.
- ``Admission``: the two methods of the admission gate that the worker uses.
- ``Notify``: where notifications go (the API's hub: metrics and the event log).
- ``Control``: what the API may ask of the running engine (the supervisor is one).
- ``EgressPort``: the egress gateway's tokens, minted at an agent's start and revoked
  at its exit (the gateway is one; ``NoEgress`` when none runs).
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime
from typing import Any, Callable, Protocol

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.contract.session_status import Status
from orchestrator.engine.tracked import Flag, Flags, Tracked
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Outcome
from orchestrator.host.sessions import Sessions
from orchestrator.rules.egress import AgentEgress
from orchestrator.rules.lifecycle import Verdict
from orchestrator.runtime.base import AgentExit

Notify = Callable[[str, dict[str, Any]], None]
Mark = Callable[[str, Flags], None]


def notify_nobody(kind: str, data: dict[str, Any]) -> None:
    """The notification sink when no API hub listens (tests of one part)."""


class Admission(Protocol):
    """What the worker asks of the admission gate."""

    def review(self, t: Tracked, verdict: Verdict, now: datetime) -> Verdict:
        """The verdict, or a start turned into a wait for a free slot."""
        ...

    def start_done(self, session_id: str) -> None:
        """A start admitted earlier has finished (either way): its slot is settled."""
        ...


class Unlimited:
    """No cap on agents: every start goes ahead."""

    def review(self, t: Tracked, verdict: Verdict, now: datetime) -> Verdict:
        return verdict

    def start_done(self, session_id: str) -> None:
        return None


class Dirty:
    """Sessions that need a pass, with the union of what changed for each.

    One pass per session at a time is what makes delivery exactly-once within the
    process; coalescing means a burst of heartbeats costs one pass, not a thousand."""

    def __init__(self) -> None:
        self.flags: dict[str, Flags] = {}
        # the start-up passes: taken after every other mark, so an event during a long
        # start-up backlog (100 000 first passes) is served in milliseconds, not after it
        self.backlog: dict[str, Flags] = {}
        self.wake = asyncio.Event()
        # the marked sessions whose pass will read outbound.db: the watch thread drops
        # their outbound.db writes until that pass begins (``watch.muted.Muted.reading``,
        # the same set: the supervisor hands it over)
        self.reading: set[str] = set()

    def mark(self, session_id: str, flags: Flags) -> None:
        queued = self.backlog.pop(session_id, Flag.NONE) if self.backlog else Flag.NONE
        self.flags[session_id] = self.flags.get(session_id, Flag.NONE) | flags | queued
        if flags & Flag.OUTBOUND:
            self.reading.add(session_id)
        self.wake.set()

    def queue_backlog(self, session_id: str, flags: Flags) -> None:
        """A pass owed but not urgent (the start-up reconcile): after the marked ones."""
        if session_id in self.flags:
            self.flags[session_id] |= flags
        else:
            self.backlog[session_id] = self.backlog.get(session_id, Flag.NONE) | flags
        self.wake.set()

    def pending(self) -> bool:
        return bool(self.flags or self.backlog)

    def pop(self) -> tuple[str, Flags]:
        """The session marked longest ago, and its flags (only while ``pending``); the
        backlog once nothing else is marked."""
        queue = self.flags or self.backlog
        sid = next(iter(queue))
        self.reading.discard(sid)  # its pass begins: commits from now on are events again
        return sid, queue.pop(sid)

    def drop(self, session_id: str) -> None:
        self.flags.pop(session_id, None)
        self.backlog.pop(session_id, None)
        self.reading.discard(session_id)

    def clear(self) -> None:
        self.flags.clear()
        self.backlog.clear()
        self.reading.clear()


class RuntimeInbox:
    """What the runtime told us, until the supervisor's loop reads it.

    The runtime calls ``exited`` and ``available`` on the event loop (its callbacks are
    scheduled there); each wakes the loop, which takes them with ``take`` before the
    next dirty session."""

    def __init__(self, dirty: Dirty) -> None:
        self._dirty = dirty
        self.exits: deque[AgentExit] = deque()
        self.came_back = False

    def exited(self, ev: AgentExit) -> None:
        self.exits.append(ev)
        self._dirty.wake.set()

    def available(self) -> None:
        self.came_back = True
        self._dirty.wake.set()

    def take(self) -> tuple[list[AgentExit], bool]:
        exits, came_back = list(self.exits), self.came_back
        self.exits.clear()
        self.came_back = False
        return exits, came_back


class StatusBook:
    """A status change: the registry row, one log line, and a notification."""

    def __init__(self, registry: Registry, notify: Notify = notify_nobody) -> None:
        self.registry = registry
        self.notify = notify

    def set(self, t: Tracked, status: Status, reason: str, now: datetime) -> None:
        old = t.status
        t.status = status
        self.registry.set_container_status(t.session_id, status, reason, now)
        logger.info("session {}/{}: {} → {} ({})", t.agent_group, t.session_id, old, status,
                    reason)
        self.notify("status", {"session_id": t.session_id, "agent_group": t.agent_group,
                               "old": old, "status": status, "reason": reason})


class Control(Protocol):
    """The running engine as the API sees it: its settings and stores, whether it is
    up, and the actions it offers (stop an agent, retry failed deliveries). Nothing
    else of the engine's state is reachable from a request handler."""

    cfg: Config
    sessions: Sessions
    registry: Registry
    ready: asyncio.Event  # set once the start-up reconcile is done
    last_sweep: float | None  # ``time.monotonic()`` of the last reconcile slice

    @property
    def runtime_name(self) -> str: ...

    async def check_runtime(self) -> None:
        """Raises when the runtime does not answer (Docker: the daemon's ping)."""
        ...

    def stop_agent(self, session_id: str, reason: str) -> bool | None:
        """Stop a session's agent now: None for an unknown session, False if none runs
        or a start/stop is under way."""
        ...

    async def retry_deliveries(self, session_id: str | None) -> int:
        """Re-queue the failed replies of one session (or all) with fresh attempts;
        returns how many. Raises ``requeue.UnknownSession`` for an unknown id."""
        ...

    async def remove_session(self, session_id: str, action: str, force: bool) -> Outcome:
        """Archive (``action="archive"``) or delete a session, its agent stopped first;
        ``Outcome.action`` says what happened ("kept" with a reason, "missing")."""
        ...


class EgressPort(Protocol):
    """The egress gateway as the engine sees it (README, Egress gateway)."""

    def admit(self, agent_group: str, session_id: str) -> AgentEgress | None:
        """The token, variables and network of an agent about to start (None: its group
        has no egress). Raises when the group has egress but no gateway runs."""
        ...

    def revoke(self, session_id: str) -> None:
        """The session's agent ended: its token is refused from now on."""
        ...

    def keep_only(self, session_ids: set[str]) -> None:
        """After the runtime's recover: forget every token but the adopted agents'."""
        ...


class NoEgress:
    """No gateway: no group is given one."""

    def admit(self, agent_group: str, session_id: str) -> AgentEgress | None:
        return None

    def revoke(self, session_id: str) -> None:
        return None

    def keep_only(self, session_ids: set[str]) -> None:
        return None
