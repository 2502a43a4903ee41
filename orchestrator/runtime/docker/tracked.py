"""Where one container of ours is in its life, as the Docker runtime knows it.

``Phase`` and its moves (``_MOVES``: any other move asked for leaves the phase as it
is) and ``Tracked``, the runtime's record of one container: its handle, its phase,
the facts Docker told about its end, and what it was started for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from orchestrator.runtime.base import AgentExit, AgentHandle, SessionRef
from orchestrator.runtime.docker.spec import exit_reason


class Phase(Enum):
    """Where one container of ours is in its life, as far as this runtime knows."""

    STARTING = auto()  # ``docker start`` under way: an exit now waits for the handle
    RUNNING = auto()
    STOPPING = auto()  # we asked it to stop: its exit is "stopped"
    KILLING = auto()  # we killed it: its exit is "killed"
    DONE = auto()  # its exit was reported (or it was never ours to report: a listed one)


# The only moves there are; any other asked for leaves the phase as it is. A stop that
# failed half-way and a kill after it (or the other way round) end as "stopped".
_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.DONE}),
    Phase.RUNNING: frozenset({Phase.STOPPING, Phase.KILLING, Phase.DONE}),
    Phase.STOPPING: frozenset({Phase.DONE}),
    Phase.KILLING: frozenset({Phase.STOPPING, Phase.DONE}),  # a stop's reason wins
    Phase.DONE: frozenset(),
}
_LIVE = frozenset({Phase.RUNNING, Phase.STOPPING, Phase.KILLING})  # what is_running means


@dataclass
class Tracked:
    handle: AgentHandle
    container_id: str
    name: str
    phase: Phase = Phase.RUNNING
    oom: bool = False  # Docker said so (an ``oom`` event): a fact about the exit, not a phase
    kill_signal: str | None = None  # the signal of Docker's last ``kill`` event
    pending_exit: AgentExit | None = None  # ended while STARTING: reported after start()
    paused: bool = False  # docker pause (by us, or found paused when adopted)
    frozen: bool = False  # paused through its cgroup's freezer (freezer.py), not docker's
    finished: str | None = None  # State.FinishedAt, when a stop looked (its wall time)
    ref: SessionRef | None = None  # what it was started for (its next container: spares.py)
    holder: str | None = None  # the netns holder it joined, kept for the session (netns.py)

    def move(self, to: Phase) -> bool:
        """Go to ``to`` if that is a move there is (see ``_MOVES``); whether it moved."""
        if to not in _MOVES[self.phase]:
            return False
        self.phase = to
        return True

    @property
    def live(self) -> bool:
        return self.phase in _LIVE

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def exit_reason(self, exit_code: int | None, *, oom: bool = False) -> str:
        return exit_reason(exit_code, stopping=self.phase is Phase.STOPPING,
                           killing=self.phase is Phase.KILLING, oom=self.oom or oom,
                           kill_signal=self.kill_signal)
