"""The admission gate: where the pure rules of ``admission`` meet the running system.

Each session's own pass still decides everything about that session (``lifecycle``);
the gate only sits between its verdict and the action. A START goes ahead when the
session holds a grant (or the queue is empty and a slot is free); otherwise the
session joins the queue and its status reason says ``queued``. A grant is held until
the start has finished, so starts in flight count against the cap. When something
changes — a session queues, an agent exits, a start fails, an agent may have become
idle enough — the gate runs ``admission.plan`` once (coalesced) and marks the
sessions it admits, and the idle agents it asks to make room, for a pass of their own.

The agent asked to make room decides in its own pass, on what that pass has just
read (claims, due work, answers owed): a claim that arrived meanwhile keeps it
running; a heartbeat does not (it says alive, not working).

What the gate knows of a session is one ``Seat`` in ``seats`` (none: it wants nothing
of the gate): its ``Stage`` — waiting in the queue, or admitted (holding a slot until
its start has finished; ``t.op`` says whether the start is under way) — whether its
live agent has been asked to make room, and when it last declined to.

Nothing here is the only copy of the queue: it is rebuilt from the session folders
(due work and no agent) by the start-up reconcile, and the registry's
``queued_since`` only shows it to ``status``.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable, Mapping

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.contract.session_status import Status
from orchestrator.engine.tracked import Flag, Flags, Tracked
from orchestrator.host import inbound
from orchestrator.host.registry import Registry
from orchestrator.rules import answers
from orchestrator.rules.admission import (
    Agent,
    Waiting,
    gives_way_at,
    may_give_way,
    plan,
    resolve_max_agents,
)
from orchestrator.rules.lifecycle import Action, Observation, Verdict, last_work
from orchestrator.runtime.base import Runtime

GRANT_TTL = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """A read-only snapshot (for metrics and logs)."""

    cap: int  # 0 = no cap
    running: int
    starting: int
    queued: int
    longest_wait: float  # seconds the head of the queue has waited (0 if empty)


class Stage(enum.Enum):
    """Where a session's start stands with the gate."""

    NONE = "none"  # no start wanted (or its seat is only about its live agent)
    WAITING = "waiting"  # in the queue for a slot
    ADMITTED = "admitted"  # holds a slot until its start has finished (started or failed)


@dataclass(slots=True)
class Seat:
    """One session, as the gate sees it; no seat at all is ``Stage.NONE`` with nothing
    else to remember."""

    stage: Stage
    group: str
    since: datetime | None = None  # WAITING: its oldest due work's time; ADMITTED: granted
    make_room: bool = False  # its live agent is asked to stop for room; its pass decides
    spared: datetime | None = None  # declined to make room at: counts as activity

    def empty(self) -> bool:
        return self.stage is Stage.NONE and not self.make_room and self.spared is None

    def waiting(self, session_id: str) -> Waiting:
        assert self.since is not None  # WAITING always has it
        return Waiting(session_id, self.group, self.since)


class AdmissionGate:
    def __init__(self, cap: int, make_room_after: float, tracked: Mapping[str, Tracked],
                 runtime: Runtime, registry: Registry, mark: Callable[[str, Flags], None],
                 set_status: Callable[[Tracked, Status, str, datetime], None],
                 clock: Callable[[], datetime], groups: Mapping[str, int] | None = None,
                 answer_wait: float = 600.0) -> None:
        self.cap = cap
        self.answer_wait = answer_wait  # [lifecycle]: an acked message owed its answer is work
        self.make_room_after = make_room_after
        self.groups = dict(groups or {})  # per-group caps ({group: max_agents}), 0 = none
        self.tracked = tracked
        self.runtime = runtime
        self.registry = registry
        self.mark = mark
        self.set_status = set_status
        self.clock = clock
        self.seats: dict[str, Seat] = {}  # no seat: Stage.NONE, nothing to remember
        self.evaluations = 0  # plans looked at (observable: a plan that decides nothing)
        self._count = {Stage.WAITING: 0, Stage.ADMITTED: 0}
        self._soon: asyncio.Handle | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_at: datetime | None = None  # when the plan runs again by itself

    # --- read-only ------------------------------------------------------------------

    def queue_length(self) -> int:
        return self._count[Stage.WAITING]

    def stage(self, session_id: str) -> Stage:
        seat = self.seats.get(session_id)
        return Stage.NONE if seat is None else seat.stage

    def queue(self) -> list[Waiting]:
        """The sessions waiting for a slot (in no particular order: ``queue_order``)."""
        return [s.waiting(sid) for sid, s in self.seats.items() if s.stage is Stage.WAITING]

    @property
    def granted(self) -> dict[str, str]:
        """{session: group} of the starts admitted and not finished."""
        return {sid: s.group for sid, s in self.seats.items() if s.stage is Stage.ADMITTED}

    def asked_to_make_room(self) -> set[str]:
        return {sid for sid, s in self.seats.items() if s.make_room}

    def stats(self) -> AdmissionStats:
        now = self.clock()
        head = min((w.due_since for w in self.queue()), default=None)
        return AdmissionStats(self.cap, len(self.runtime.running()),
                              self._count[Stage.ADMITTED], self.queue_length(),
                              max(0.0, (now - head).total_seconds()) if head else 0.0)

    # --- the seats --------------------------------------------------------------------

    def _seat(self, session_id: str, group: str) -> Seat:
        seat = self.seats.get(session_id)
        if seat is None:
            seat = self.seats[session_id] = Seat(Stage.NONE, group)
        return seat

    def _move(self, session_id: str, group: str, stage: Stage,
              since: datetime | None = None) -> Stage:
        """Put the session's start in ``stage``; the stage it leaves."""
        if stage is Stage.NONE and session_id not in self.seats:
            return Stage.NONE
        seat = self._seat(session_id, group)
        old = seat.stage
        if old in self._count:
            self._count[old] -= 1
        if stage in self._count:
            self._count[stage] += 1
        seat.stage, seat.group, seat.since = stage, group, since
        self._tidy(session_id, seat)
        return old

    def _tidy(self, session_id: str, seat: Seat) -> None:
        if seat.empty():
            del self.seats[session_id]

    # --- the hook in a session's pass ---------------------------------------------------

    def review(self, t: Tracked, verdict: Verdict, now: datetime) -> Verdict:
        """The session's verdict, held back (queued) or turned into a stop for room."""
        sid = t.session_id
        seat = self.seats.get(sid)
        if seat is not None and seat.make_room:
            seat.make_room = False
            agent = self._agent(t, now, fresh=True)
            waiting = self.queue_length()
            if (verdict.action is Action.NONE and self.runtime.is_running(sid) and waiting
                    and not t.ops.blocked(now)
                    and may_give_way(agent, now, self.make_room_after)):
                seat.spared = None
                self._tidy(sid, seat)
                return replace(verdict, action=Action.STOP, mute=False,
                               reason=f"making room for queued work ({waiting} "
                                      f"waiting, max_agents {self.cap})")
            seat.spared = now  # it has work after all: not asked again at once
            self.poke()
        elif self.queue_length() and self.runtime.is_running(sid):
            self._may_free_up(t, now)
        if verdict.action is not Action.START:
            self.forget(sid)
            return verdict
        stage = self.stage(sid)
        if stage is Stage.ADMITTED:
            return verdict
        if not self.queue_length() and self._room_for(t.agent_group):
            self._move(sid, t.agent_group, Stage.ADMITTED, now)
            return verdict
        if stage is not Stage.WAITING:
            self._enqueue(t, now)  # records its own status reason: "queued: #N in line"
        return replace(verdict, reason="queued", action=Action.NONE, record=None, mute=False)

    def _may_free_up(self, t: Tracked, now: datetime) -> None:
        """A live agent's pass while work waits: if it may now give way sooner than the
        plan will next look (its claim has just been answered, say), look now. Without
        this the plan, which saw it working, would not look again until something else
        changed, and the queue would wait for the idle rule (minutes) instead of
        ``make_room_after``."""
        at = gives_way_at(self._agent(t, now, fresh=True), self.make_room_after)
        if at is not None and (self._recheck_at is None or at < self._recheck_at
                               or self._recheck_at <= now):
            self.poke()

    def start_done(self, session_id: str) -> None:
        """The start this session was granted has finished (started or failed)."""
        if self.stage(session_id) is Stage.ADMITTED:
            self._move(session_id, self.seats[session_id].group, Stage.NONE)
            if self.queue_length():
                self.poke()

    def forget(self, session_id: str) -> None:
        """No start wanted any more (work gone, agent alive, start backing off)."""
        seat = self.seats.get(session_id)
        if seat is None or seat.stage is Stage.NONE:  # the common case: nothing to do
            return
        old = self._move(session_id, seat.group, Stage.NONE)
        if old is Stage.WAITING:
            self.registry.set_queued(session_id, None)
        elif old is Stage.ADMITTED and self.queue_length():
            self.poke()

    def runtime_available(self) -> None:
        """The runtime answers again and has listed its agents: the queue may move."""
        if self.queue_length():
            self.poke()

    def agent_exited(self, session_id: str) -> None:
        seat = self.seats.get(session_id)
        if seat is not None and seat.spared is not None:
            seat.spared = None
            self._tidy(session_id, seat)
        if self.queue_length():
            self.poke()

    # --- the plan -----------------------------------------------------------------------

    def poke(self) -> None:
        """Run the plan soon (once, however many things changed meanwhile)."""
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._evaluate)

    def _evaluate(self) -> None:
        self._soon = None
        self.evaluations += 1
        if not self.queue_length() or self._unknown():  # runtime_available() pokes again
            return
        now = self.clock()
        self._expire_grants(now)
        agents = []
        for h in self.runtime.running():
            t = self.tracked.get(h.session_id)
            agents.append(self._agent(t, now) if t is not None
                          else Agent(h.session_id, h.agent_group, None))  # never gives way
        result = plan(agents, self.granted, self.queue(), self.cap, now,
                      self.make_room_after, self.groups)
        for sid in result.start:
            seat = self.seats[sid]
            waited = seat.since
            self._move(sid, seat.group, Stage.ADMITTED, now)
            self.registry.set_queued(sid, None)
            logger.info("session {}: admitted after {:.1f}s in the queue ({} still waiting)",
                        sid, (now - waited).total_seconds() if waited else 0.0,
                        self.queue_length())
            self.mark(sid, Flag.TIMER)
        for sid in result.stop:
            self._seat(sid, self.tracked[sid].agent_group).make_room = True  # (tracked: it
            # may give way only with a last activity, which only a tracked one has)
            self.mark(sid, Flag.TIMER)
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        self._recheck_at = result.recheck_at
        if result.recheck_at is not None:
            delay = max(0.0, (result.recheck_at - now).total_seconds()) + 0.002
            self._recheck = asyncio.get_running_loop().call_later(delay, self.poke)

    def _agent(self, t: Tracked, now: datetime, fresh: bool = False) -> Agent:
        """How admission sees a live agent. ``fresh``: its own pass has just re-read
        everything. Otherwise its due count is left out: for a running agent it is not
        re-read on every reply (the agent picks work up by itself), so it may be stale
        — the agent's own pass re-reads it before any stop.

        Its last work is its start, reply or claim, never a heartbeat (``last_work``):
        an agent that only heartbeats has nothing to do and gives way to waiting work.
        """
        ev = t.evidence
        obs = Observation(alive=True, started_at=t.started_at, last_reply_at=ev.last_reply_at,
                          claims=ev.claims)
        active = last_work(obs)
        # an acked message still owed its answer is work (for answer_wait at most); a
        # tool declared without a claim or an answer owed is not: it would hold the slot
        # for as long as the agent heartbeats
        owed = answers.answer_due(ev.answers, self.answer_wait)
        busy = owed is not None and owed > now
        seat = self.seats.get(t.session_id)
        spared = seat.spared if seat is not None else None
        if spared is not None and (active is None or spared > active):
            active = spared
        if fresh:
            return Agent(t.session_id, t.agent_group, active, len(ev.claims), ev.due,
                         busy=busy)
        stopping = (seat is not None and seat.make_room) or t.op_running()
        return Agent(t.session_id, t.agent_group, active, len(ev.claims), 0, stopping, busy)

    def _expire_grants(self, now: datetime) -> None:
        """A grant whose session never got to start (its passes fail, e.g. an unreadable
        inbound.db) must not hold a slot for ever; a start under way is never expired."""
        for sid, seat in list(self.seats.items()):
            if seat.stage is not Stage.ADMITTED or seat.since is None:
                continue
            t = self.tracked.get(sid)
            if now - seat.since > GRANT_TTL and (t is None or not t.op_running()):
                logger.warning("session {}: admitted {:.0f}s ago but never started; its slot "
                               "goes to the next in line", sid, (now - seat.since).total_seconds())
                self._move(sid, seat.group, Stage.NONE)

    def _unknown(self) -> bool:
        """The runtime has not listed its agents yet (Docker down at start-up): agents
        from before the restart may be alive, so under a cap nothing may start yet."""
        return bool(self.cap) and not self.runtime.listed

    def _room_for(self, group: str) -> bool:
        if self._unknown():
            return False
        live = {h.session_id: h.agent_group for h in self.runtime.running()}
        used = {**self.granted, **live}
        if self.cap and len(used) >= self.cap:
            return False
        gcap = self.groups.get(group, 0)
        return not gcap or sum(1 for g in used.values() if g == group) < gcap

    def _enqueue(self, t: Tracked, now: datetime) -> None:
        try:
            since = inbound.oldest_due_at(t.paths.inbound_db, now) or now
        except (sqlite3.Error, OSError):
            since = now
        self._move(t.session_id, t.agent_group, Stage.WAITING, since)
        ahead = sum(1 for o in self.queue() if (o.due_since, o.session_id) < (since, t.session_id))
        self.registry.set_queued(t.session_id, since)
        self.set_status(t, Status.STOPPED, f"queued: #{ahead + 1} in line, "
                        f"{len(self.runtime.running())} of max_agents {self.cap} running", now)
        self.poke()


def open_gate(cfg: Config, tracked: Mapping[str, Tracked], runtime: Runtime,
              registry: Registry, mark: Callable[[str, Flags], None],
              set_status: Callable[[Tracked, Status, str, datetime], None],
              clock: Callable[[], datetime]) -> AdmissionGate:
    """The supervisor's gate: the cap resolved on this host, last run's queue marks gone
    (the start-up reconcile queues again whatever still waits)."""
    cap, why = resolve_max_agents(cfg.runtime.max_agents, cfg.docker.memory)
    logger.info("admission: {} ({})", f"at most {cap} agents at once" if cap else "no cap", why)
    registry.clear_queued()
    group_caps = {g.name: g.max_agents for g in cfg.groups if g.max_agents}  # [groups.<name>]
    for name, gcap in sorted(group_caps.items()):
        logger.info("admission: at most {} agents of group {} at once", gcap, name)
    return AdmissionGate(cap, cfg.runtime.make_room_after, tracked, runtime, registry, mark,
                         set_status, clock, group_caps, cfg.lifecycle.answer_wait)
