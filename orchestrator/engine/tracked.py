"""What the engine remembers about a session between passes, and what can change.

``Tracked`` is written by the session worker (each pass), the admission gate (queue
and slot), the supervisor (discovery, exits) and the start-up state (restore): it lives
here, below all of them, so none of them imports another to reach it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from orchestrator.contract.layout import SessionPaths
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import DeliveryState
from orchestrator.host.filesig import Signature
from orchestrator.rules import answers
from orchestrator.rules.lifecycle import Claim
from orchestrator.runtime.base import AgentExit
from orchestrator.support.logonce import LogOnce

Identity = tuple[tuple[int, int], int | None, int | None]  # folder, outbound.db, inbound.db


class Flag:
    """What changed for a session, as bits of a plain ``int``.

    (Not ``enum.Flag``: its ``|``/``&`` cost a third of a heartbeat pass.)
    """

    NONE = 0
    HEARTBEAT = 1 << 0
    OUTBOUND = 1 << 1
    OUTBOX = 1 << 2
    INBOUND = 1 << 3
    EXIT = 1 << 4
    TIMER = 1 << 5
    SWEEP = 1 << 6  # reconcile: re-read whatever changed on disk (stat-gated)
    FULL = 1 << 7  # re-read everything
    FORCE = 1 << 8  # the start-up reconcile pass


Flags = int


_NO_ANSWERS = answers.Answers()  # frozen: every session starts with this one


@dataclass(slots=True)
class Tracked:
    """What the supervisor remembers about a session between passes.

    Slotted: 10 000 sessions are 10 000 of these (a ``__dict__`` each was ~1 KB)."""

    agent_group: str
    session_id: str
    paths: SessionPaths
    status: Status = Status.STOPPED
    routing: tuple[str | None, str | None, str | None] | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    last_reply_at: datetime | None = None
    idle_since: datetime | None = None
    claims: tuple[Claim, ...] = ()
    tool_timeout: float | None = None
    tool_running: bool = False  # container_state.current_tool is set
    answers: answers.Answers = _NO_ANSWERS
    due: int = 0
    next_inbound_due: datetime | None = None
    delivery: DeliveryState = field(default_factory=DeliveryState)
    delivery_due: datetime | None = None
    synced_acks: set[str] = field(default_factory=set)
    acks_seen: datetime | None = None  # newest ack change read; older acks are not re-read
    max_seq_seen: int = 0
    start_failures: int = 0  # failed starts in a row, any cause (sets the backoff)
    start_blocked_until: datetime | None = None
    start_errors: int = 0  # of those, failed for this session's own reasons (not outages)
    start_error: str | None = None  # the last such reason, for the failed messages
    op_failures: int = 0  # runtime operations (stop/kill) that raised, in a row
    op_blocked_until: datetime | None = None  # after such a failure: no new op before
    exit: AgentExit | None = None
    ending_reason: str | None = None  # why we stopped/killed it, for the exit's status reason
    op: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: datetime | None = None
    sigs: dict[str, Signature] = field(default_factory=dict)
    # troubles said once, not per pass: "pass" (the folder/DBs unreadable: the error),
    # "start" and "op" (failed starts / stop-kills in a row: the first is loud)
    said: LogOnce = field(default_factory=LogOnce)
    registry_touched: datetime | None = None
    identity: Identity | None = None  # inodes of the folder and its DBs, at the last pass
    busy: int = 0  # passes in a row that met a locked database
    resumed_at: datetime | None = None  # last thaw of a paused agent (lifecycle.thawed)
    restored: bool = False  # skipped at start-up (``startup_state``): first pass is full

    @property
    def broken(self) -> str | None:
        """The error that makes passes fail, as logged (None while they succeed)."""
        return self.said.last("pass")
