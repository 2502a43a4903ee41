"""What the engine remembers about a session between passes, and what can change.

``Tracked`` is written by the session worker (each pass), the admission gate (queue
and slot), the supervisor (discovery, exits) and the start-up state (restore): it lives
here, below all of them, so none of them imports another to reach it.

Its fields come in records, each changed together: ``Evidence`` (what was read from
the folder to decide on), ``ReadMarks`` (how far the files have been read),
``Backoff`` twice (failed starts, failed stop/kill/pause/resume) and ``Timer`` (the
pending pass). The gate keeps its own per-session ``Seat`` (``admission_gate``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import AbstractSet, Callable, Iterator

from orchestrator.contract.layout import SessionPaths, session_paths
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import DeliveryState
from orchestrator.host.filesig import Signature
from orchestrator.rules import answers
from orchestrator.rules.lifecycle import Claim, start_backoff
from orchestrator.runtime.base import AgentExit
from orchestrator.support.logonce import LogOnce

Identity = tuple[tuple[int, int], int | None, int | None]  # folder, outbound.db, inbound.db
Stamp = tuple[int, int]  # a session folder's (mtime_ns, ctime_ns)

# A folder time this close to the clock is not trusted as a stamp: the kernel sets
# times from a coarse clock (one tick: 1-10 ms), so a change in the same tick as the
# one before it leaves the folder's times as they were.
FRESH_NS = 1_000_000_000


def trusted_stamp(times: Stamp, now_ns: int | None = None) -> Stamp | None:
    """A folder's (mtime_ns, ctime_ns) as seen before its files were read, or None
    while either is too recent to prove that no later change happened in the same
    clock tick (``FRESH_NS``)."""
    now = time.time_ns() if now_ns is None else now_ns
    return times if now - max(times) >= FRESH_NS else None


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
class Backoff:
    """Failures in a row of one kind of runtime call, and the wait they impose.

    Used twice per session: for starts (``Tracked.start``) and for the other runtime
    operations, stop/kill/pause/resume (``Tracked.ops``)."""

    failures: int = 0  # failed in a row, any cause (sets the delay)
    blocked_until: datetime | None = None  # no new try before
    errors: int = 0  # starts only: of those, failed for the session's own reasons (not outages)
    error: str | None = None  # starts only: the last such reason, for the failed messages

    def failed(self, now: datetime, retry_max: float) -> float:
        """One more failure: the delay before the next try (doubling from 1 s up to
        ``retry_max``), blocked until then."""
        self.failures += 1
        delay = start_backoff(self.failures, 1.0, retry_max)
        self.blocked_until = now + timedelta(seconds=delay)
        return delay

    def own_error(self, reason: str) -> None:
        """The failure just counted was the session's own (it counts towards max_tries)."""
        self.errors += 1
        self.error = reason

    def succeeded(self) -> None:
        """It worked (or the work it was for is gone): the count starts again."""
        self.failures = self.errors = 0
        self.error = None
        self.blocked_until = None

    def blocked(self, now: datetime) -> bool:
        return self.blocked_until is not None and self.blocked_until > now

    def unblock(self) -> bool:
        """Lift the wait, keep the count (a flapping runtime still gets the longer
        delay next time); whether there was a wait to lift."""
        if self.blocked_until is None:
            return False
        self.blocked_until = None
        return True


@dataclass(slots=True)
class Evidence:
    """What the passes read from the session folder (and the runtime) to decide on."""

    heartbeat_at: datetime | None = None  # clamped (agent_values.agent_time)
    heartbeat_sig: Signature = None  # the .heartbeat it was read from (same file: same time)
    last_reply_at: datetime | None = None
    idle_since: datetime | None = None  # from the last verdict
    claims: tuple[Claim, ...] = ()
    tool_timeout: float | None = None
    tool_running: bool = False  # container_state.current_tool is set
    answers: answers.Answers = _NO_ANSWERS
    due: int = 0
    next_inbound_due: datetime | None = None
    resumed_at: datetime | None = None  # last thaw of a paused agent (lifecycle.thawed)

    def counted(self, due: int, next_due: datetime | None) -> None:
        """inbound.db read: messages due now, and when the next one falls due."""
        self.due, self.next_inbound_due = due, next_due

    def agent_started(self) -> None:
        """A new agent: nothing the last one left on disk (heartbeat, tool, answers
        owed) speaks for it."""
        self.tool_running, self.tool_timeout = False, None  # cleared on disk before the start
        self.answers = answers.forget(self.answers)
        self.heartbeat_at = self.heartbeat_sig = None
        self.idle_since = None


@dataclass(slots=True)
class ReadMarks:
    """How far the passes have read the session's files: what need not be read again."""

    sigs: dict[str, Signature] = field(default_factory=dict)  # "hb", "out", "in"
    identity: Identity | None = None  # inodes of the folder and its DBs, at the last pass
    acks_seen: datetime | None = None  # newest ack change read; older acks are not re-read
    # (replaced whole, never changed in place: one empty frozenset shared by every
    # session that has no acks, not an empty set of 216 bytes each)
    synced_acks: AbstractSet[str] = frozenset()
    max_seq_seen: int = 0
    registry_touched: datetime | None = None
    busy: int = 0  # passes in a row that met a locked database
    # the folder's times at the start of the last pass that read all three files
    # (``trusted_stamp``; None: none such): a change to a file's directory entry, or
    # a commit (its -journal comes and goes), after that read moves them
    stamp: Stamp | None = None

    def forget(self) -> None:
        """Read everything again from scratch (a replaced or rewritten file)."""
        self.synced_acks = frozenset()
        self.acks_seen = None
        self.max_seq_seen = 0
        self.sigs.clear()
        self.stamp = None


@dataclass(slots=True)
class Timer:
    """The one pending timer of a session: the pass that must run at ``at``."""

    handle: asyncio.TimerHandle | None = None
    at: datetime | None = None

    def schedule(self, when: datetime | None, now: datetime, fire: Callable[..., object],
                 *args: object) -> None:
        """Make sure ``fire(*args)`` runs at ``when``.

        An earlier timer already set is kept: firing early only costs a pass that
        re-decides and sets the later time. That spares a cancel-and-create per
        heartbeat, whose every touch moves the idle deadline a little later.
        """
        if self.handle is not None and self.at is not None and (when is None or self.at <= when):
            return
        self.cancel()
        self.at = when
        if when is None:
            return
        delay = max(0.0, (when - now).total_seconds()) + 0.002
        self.handle = asyncio.get_running_loop().call_later(delay, fire, *args)

    def fired(self) -> None:
        self.handle = None
        self.at = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class LazyPaths:
    """A session's ``SessionPaths``, made when asked: 100 000 tracked sessions held
    100 000 ``Path`` objects made at start-up (1.5 s of a restart, ~40 MB) for the few
    passes that name a path (a start, an error message)."""

    __slots__ = ("data_dir", "agent_group", "session_id")

    def __init__(self, data_dir: Path, agent_group: str, session_id: str) -> None:
        self.data_dir, self.agent_group, self.session_id = data_dir, agent_group, session_id

    def _paths(self) -> SessionPaths:
        return session_paths(self.data_dir, self.agent_group, self.session_id)

    @property
    def root(self) -> Path:
        return self._paths().root

    @property
    def inbound_db(self) -> Path:
        return self._paths().inbound_db

    @property
    def outbound_db(self) -> Path:
        return self._paths().outbound_db


@dataclass(slots=True)
class Tracked:
    """What the supervisor remembers about a session between passes.

    Slotted, and so are its records: 10 000 sessions are 10 000 of these (a
    ``__dict__`` each was ~1 KB)."""

    agent_group: str
    session_id: str
    paths: SessionPaths | LazyPaths
    status: Status = Status.STOPPED
    routing: tuple[str | None, str | None, str | None] | None = None
    started_at: datetime | None = None
    evidence: Evidence = field(default_factory=Evidence)
    read: ReadMarks = field(default_factory=ReadMarks)
    delivery: DeliveryState = field(default_factory=DeliveryState)
    delivery_due: datetime | None = None
    start: Backoff = field(default_factory=Backoff)  # failed starts
    ops: Backoff = field(default_factory=Backoff)  # runtime operations (stop/kill) that raised
    exit: AgentExit | None = None
    ending_reason: str | None = None  # why we stopped/killed it, for the exit's status reason
    op: asyncio.Task | None = None
    timer: Timer = field(default_factory=Timer)
    # troubles said once, not per pass: "pass" (the folder/DBs unreadable: the error),
    # "start" and "op" (failed starts / stop-kills in a row: the first is loud)
    said: LogOnce = field(default_factory=LogOnce)
    restored: bool = False  # skipped at start-up (``startup_state``): first pass is full

    @property
    def broken(self) -> str | None:
        """The error that makes passes fail, as logged (None while they succeed)."""
        return self.said.last("pass")

    def op_running(self) -> bool:
        """A runtime operation (start, stop, kill, pause, resume) is under way."""
        return self.op is not None and not self.op.done()


Wake = Callable[[str, str, str], Tracked]  # (agent group, session id, saved row) → Tracked


class TrackedMap(dict[str, Tracked]):
    """Every tracked session: ``Tracked`` records, and *dormant* rows.

    A restart of 100 000 sessions found nearly all of them settled and unchanged
    (``startup_state``); building a ``Tracked`` for each (eight records) took 3 s
    and ~110 MB for sessions that have nothing to do. Those are kept as a row —
    (interned agent group, saved start-up row) — until something asks for the
    session (``get``, ``[sid]``): then ``wake`` makes its ``Tracked``, restored
    from the row, and it stays one.

    As a mapping it holds both: ``in``, ``len``, iteration (over a snapshot: a
    session may wake meanwhile), ``get``, ``[sid]``, ``pop``. The dict's own
    ``keys()``, ``values()`` and ``items()`` are the awake ``Tracked`` only (nothing
    is woken by looking at them): a caller that needs every session's status uses
    ``statuses``, and the sweep asks ``dormant`` directly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dormant: dict[str, tuple[str, str]] = {}
        self.wake: Wake | None = None  # set by the supervisor, which knows the rows

    def __contains__(self, sid: object) -> bool:
        return dict.__contains__(self, sid) or sid in self.dormant

    def __len__(self) -> int:
        return dict.__len__(self) + len(self.dormant)

    def __iter__(self) -> Iterator[str]:
        return iter([*dict.keys(self), *self.dormant])

    def __missing__(self, sid: str) -> Tracked:
        t = self._woken(sid)
        if t is None:
            raise KeyError(sid)
        return t

    def __setitem__(self, sid: str, t: Tracked) -> None:
        self.dormant.pop(sid, None)
        dict.__setitem__(self, sid, t)

    def get(self, sid: str, default: Tracked | None = None  # type: ignore[override]
            ) -> Tracked | None:
        t = dict.get(self, sid)
        if t is None and self.dormant:
            t = self._woken(sid)
        return default if t is None else t

    def pop(self, sid: str, default: Tracked | None = None  # type: ignore[override]
            ) -> Tracked | None:
        """The session forgotten, awake or dormant (a dormant one is not woken: None)."""
        self.dormant.pop(sid, None)
        return dict.pop(self, sid, default)

    def rest(self, sid: str, agent_group: str, row: str) -> None:
        """Keep ``sid`` as a dormant row (it must not be awake)."""
        self.dormant[sid] = (agent_group, row)

    def _woken(self, sid: str) -> Tracked | None:
        row = self.dormant.pop(sid, None)
        if row is None:
            return None
        assert self.wake is not None, "dormant rows need a wake function"
        t = self.wake(row[0], sid, row[1])
        dict.__setitem__(self, sid, t)
        return t

    def statuses(self) -> list[Status]:
        """Every session's status (a dormant one is stopped), none woken for it."""
        return [t.status for t in self.values()] + [Status.STOPPED] * len(self.dormant)
