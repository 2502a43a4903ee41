"""The runtime protocol: how the supervisor starts, stops and observes agents.

Two implementations: ``local`` (agent as a process group on this host) and
``docker`` (one labelled container per session). The supervisor only sees this
interface, so lifecycle tests run on the local runtime and the same rules hold
for containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Protocol

from orchestrator.config.groups import AgentSettings
from orchestrator.rules.egress import AgentEgress


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot start agents right now (daemon down, image missing).

    The message is one line saying what failed and what to do. Callers keep the
    work pending and retry with backoff; nothing is lost.

    ``reported``: the runtime has logged this failure itself (once per outage, or
    once per missing image), so a caller must not log it again at every retry.
    """

    reported: bool = False


@dataclass(frozen=True, slots=True)
class SessionRef:
    """Enough to start an agent for one session."""

    agent_group: str
    session_id: str
    folder: Path
    # the group's effective settings (groups.resolve); None = the runtime's own config
    settings: AgentSettings | None = None
    # the egress gateway's token, variables, network and CA (None: the group has no egress)
    egress: AgentEgress | None = None


@dataclass(frozen=True, slots=True)
class AgentHandle:
    """A running agent the runtime owns (pid for local, container id for docker)."""

    agent_group: str
    session_id: str
    ident: str
    adopted: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """What one agent run used, as far as its runtime could tell (None: unknown)."""

    cpu_seconds: float | None = None  # user + system, the run's processes together
    peak_memory_bytes: int | None = None  # the high-water mark of its resident memory
    # its own start to its end as the runtime saw them (Docker: State.StartedAt to the
    # die event; Kubernetes: the container's startedAt to finishedAt); None: not known
    wall_seconds: float | None = None


def wall_between(started: str | None, finished: str | None) -> float | None:
    """Seconds between two RFC 3339 timestamps (Docker's nanoseconds are cut to micro);
    None when either is missing, unset (Docker's year 1) or unreadable, or the end is
    before the start."""
    try:
        a = datetime.fromisoformat(started) if started else None
        b = datetime.fromisoformat(finished) if finished else None
    except ValueError:
        return None
    if a is None or b is None or a.year < 2 or b.year < 2 or a.tzinfo is None \
            or b.tzinfo is None or b < a:
        return None
    return round((b - a).total_seconds(), 3)


@dataclass(frozen=True, slots=True)
class AgentExit:
    """An agent ended. ``reason``: exited | killed | oom | stopped | vanished."""

    agent_group: str
    session_id: str
    exit_code: int | None
    reason: str
    # what the run used (local: its child's rusage; docker: its cgroup, sampled;
    # kubernetes: wall time only); not part of the exit's identity
    usage: Usage | None = field(default=None, compare=False)


ExitCallback = Callable[[AgentExit], None]


class Runtime(Protocol):
    """Called from the event loop; blocking work stays inside the implementation."""

    name: str

    async def recover(self) -> list[AgentHandle]:
        """Find agents this instance owns that survived a restart: adopt the live
        ones (return them), clean up dead ones. Never touch foreign agents."""
        ...

    async def start(self, session: SessionRef) -> AgentHandle:
        """Start an agent; raise RuntimeUnavailable if that cannot be done now."""
        ...

    async def stop(self, session_id: str, grace: float) -> None:
        """Polite stop (SIGTERM, then SIGKILL after ``grace`` s). Absent = done."""
        ...

    async def kill(self, session_id: str) -> None:
        """Immediate kill. Absent = done."""
        ...

    async def pause(self, session_id: str) -> None:
        """Freeze the agent (``docker pause`` / SIGSTOP of its process group): no CPU,
        memory kept. Absent = done."""
        ...

    async def resume(self, session_id: str) -> None:
        """Thaw a paused agent; it carries on where it was frozen. Absent = done."""
        ...

    def is_paused(self, session_id: str) -> bool:
        """From the runtime's own bookkeeping (adopted agents: as found); no I/O."""
        ...

    async def ping(self) -> None:
        """Raises ``RuntimeUnavailable`` when the runtime does not answer (``/readyz``)."""
        ...

    async def reconcile(self) -> None:
        """Re-check owned agents against the runtime itself: report exits that its
        event source missed, adopt live agents it did not know of (called by the
        reconcile sweep)."""
        ...

    def is_running(self, session_id: str) -> bool:
        """From the runtime's own bookkeeping; cheap, no I/O."""
        ...

    @property
    def listed(self) -> bool:
        """Whether the runtime has listed the agents it owns since it started.

        Until then (the Docker daemon did not answer at start-up) ``is_running``
        False means "unknown", not "dead": an agent from before the restart may
        still be working, so its claims must not be given back yet.
        """
        ...

    def running(self) -> list[AgentHandle]:
        ...

    async def close(self) -> None:
        """Release resources (threads, streams). Does not stop agents."""
        ...
