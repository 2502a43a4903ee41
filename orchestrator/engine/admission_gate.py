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
read (claims, due work, heartbeat): a claim that arrived meanwhile keeps it running.

Nothing here is the only copy of the queue: it is rebuilt from the session folders
(due work and no agent) by the start-up reconcile, and the registry's
``queued_since`` only shows it to ``status``.
"""

from __future__ import annotations

import asyncio
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
from orchestrator.rules.admission import Agent, Waiting, may_give_way, plan, resolve_max_agents
from orchestrator.rules.lifecycle import Action, Observation, Verdict, last_activity
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


class AdmissionGate:
    def __init__(self, cap: int, make_room_after: float, tracked: Mapping[str, Tracked],
                 runtime: Runtime, registry: Registry, mark: Callable[[str, Flags], None],
                 set_status: Callable[[Tracked, Status, str, datetime], None],
                 clock: Callable[[], datetime], groups: Mapping[str, int] | None = None
                 ) -> None:
        self.cap = cap
        self.make_room_after = make_room_after
        self.groups = dict(groups or {})  # per-group caps ({group: max_agents}), 0 = none
        self.tracked = tracked
        self.runtime = runtime
        self.registry = registry
        self.mark = mark
        self.set_status = set_status
        self.clock = clock
        self.queue: dict[str, Waiting] = {}
        self.granted: dict[str, str] = {}  # session -> group: starts allowed, not finished
        self.granted_at: dict[str, datetime] = {}
        self.make_room: set[str] = set()  # asked to stop for room; their pass decides
        self.spared: dict[str, datetime] = {}  # declined to make room at: counts as activity
        self._soon: asyncio.Handle | None = None
        self._recheck: asyncio.TimerHandle | None = None

    # --- read-only ------------------------------------------------------------------

    def queue_length(self) -> int:
        return len(self.queue)

    def stats(self) -> AdmissionStats:
        now = self.clock()
        head = min((w.due_since for w in self.queue.values()), default=None)
        return AdmissionStats(self.cap, len(self.runtime.running()), len(self.granted),
                              len(self.queue),
                              max(0.0, (now - head).total_seconds()) if head else 0.0)

    # --- the hook in a session's pass ---------------------------------------------------

    def review(self, t: Tracked, verdict: Verdict, now: datetime) -> Verdict:
        """The session's verdict, held back (queued) or turned into a stop for room."""
        sid = t.session_id
        if sid in self.make_room:
            self.make_room.discard(sid)
            blocked = t.op_blocked_until is not None and t.op_blocked_until > now
            agent = self._agent(t, fresh=True)
            if (verdict.action is Action.NONE and self.runtime.is_running(sid) and self.queue
                    and not blocked and may_give_way(agent, now, self.make_room_after)):
                self.spared.pop(sid, None)
                return replace(verdict, action=Action.STOP, mute=False,
                               reason=f"making room for queued work ({len(self.queue)} "
                                      f"waiting, max_agents {self.cap})")
            self.spared[sid] = now  # it has work after all: not asked again at once
            self.poke()
        if verdict.action is not Action.START:
            self.forget(sid)
            return verdict
        if sid in self.granted:
            return verdict
        if not self.queue and self._room_for(t.agent_group):
            self._grant(sid, t.agent_group, now)
            return verdict
        if sid not in self.queue:
            self._enqueue(t, now)  # records its own status reason: "queued: #N in line"
        return replace(verdict, reason="queued", action=Action.NONE, record=None, mute=False)

    def start_done(self, session_id: str) -> None:
        """The start this session was granted has finished (started or failed)."""
        self.granted_at.pop(session_id, None)
        if self.granted.pop(session_id, None) is not None and self.queue:
            self.poke()

    def forget(self, session_id: str) -> None:
        """No start wanted any more (work gone, agent alive, start backing off)."""
        if self.queue.pop(session_id, None) is not None:
            self.registry.set_queued(session_id, None)
        self.granted_at.pop(session_id, None)
        if self.granted.pop(session_id, None) is not None and self.queue:
            self.poke()

    def runtime_available(self) -> None:
        """The runtime answers again and has listed its agents: the queue may move."""
        if self.queue:
            self.poke()

    def agent_exited(self, session_id: str) -> None:
        self.spared.pop(session_id, None)
        if self.queue:
            self.poke()

    # --- the plan -----------------------------------------------------------------------

    def poke(self) -> None:
        """Run the plan soon (once, however many things changed meanwhile)."""
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._evaluate)

    def _evaluate(self) -> None:
        self._soon = None
        if not self.queue or self._unknown():  # runtime_available() pokes again
            return
        now = self.clock()
        self._expire_grants(now)
        agents = []
        for h in self.runtime.running():
            t = self.tracked.get(h.session_id)
            agents.append(self._agent(t) if t is not None
                          else Agent(h.session_id, h.agent_group, None))  # never gives way
        result = plan(agents, self.granted, list(self.queue.values()), self.cap, now,
                      self.make_room_after, self.groups)
        for sid in result.start:
            w = self.queue.pop(sid)
            self._grant(sid, w.group, now)
            self.registry.set_queued(sid, None)
            logger.info("session {}: admitted after {:.1f}s in the queue ({} still waiting)",
                        sid, (now - w.due_since).total_seconds(), len(self.queue))
            self.mark(sid, Flag.TIMER)
        for sid in result.stop:
            self.make_room.add(sid)
            self.mark(sid, Flag.TIMER)
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if result.recheck_at is not None:
            delay = max(0.0, (result.recheck_at - now).total_seconds()) + 0.002
            self._recheck = asyncio.get_running_loop().call_later(delay, self.poke)

    def _agent(self, t: Tracked, fresh: bool = False) -> Agent:
        """How admission sees a live agent. ``fresh``: its own pass has just re-read
        everything. Otherwise its due count is left out: for a running agent it is not
        re-read on every reply (the agent picks work up by itself), so it may be stale
        — the agent's own pass re-reads it before any stop."""
        active = last_activity(Observation(alive=True, started_at=t.started_at,
                                           heartbeat_at=t.heartbeat_at,
                                           last_reply_at=t.last_reply_at, claims=t.claims))
        spared = self.spared.get(t.session_id)
        if spared is not None and (active is None or spared > active):
            active = spared
        if fresh:
            return Agent(t.session_id, t.agent_group, active, len(t.claims), t.due)
        stopping = t.session_id in self.make_room or (t.op is not None and not t.op.done())
        return Agent(t.session_id, t.agent_group, active, len(t.claims), 0, stopping)

    def _grant(self, session_id: str, group: str, now: datetime) -> None:
        self.granted[session_id] = group
        self.granted_at[session_id] = now

    def _expire_grants(self, now: datetime) -> None:
        """A grant whose session never got to start (its passes fail, e.g. an unreadable
        inbound.db) must not hold a slot for ever; a start under way is never expired."""
        for sid, at in list(self.granted_at.items()):
            t = self.tracked.get(sid)
            if sid not in self.granted:
                del self.granted_at[sid]
            elif now - at > GRANT_TTL and (t is None or t.op is None or t.op.done()):
                logger.warning("session {}: admitted {:.0f}s ago but never started; its slot "
                               "goes to the next in line", sid, (now - at).total_seconds())
                del self.granted[sid], self.granted_at[sid]

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
        w = Waiting(t.session_id, t.agent_group, since)
        self.queue[t.session_id] = w
        ahead = sum(1 for o in self.queue.values()
                    if (o.due_since, o.session_id) < (w.due_since, w.session_id))
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
                         set_status, clock, group_caps)
