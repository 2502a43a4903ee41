"""Lifecycle decisions as small pure functions of (state, observation, now).

Nothing here reads a file, a clock or a process table: the supervisor gathers an
``Observation`` and applies the ``Verdict``. That keeps the rules table-testable
with an injected clock, and it keeps a peer system's (NanoClaw v2's) mistakes out:
status follows evidence, a freshly started agent that has not heartbeated yet is
never "stuck", and a declared tool timeout widens every stuck window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from orchestrator.config import LifecycleConfig


class Action(enum.Enum):
    NONE = "none"
    START = "start"
    STOP = "stop"  # idle too long: polite stop
    KILL = "kill"  # stuck: kill, then its claims are retried


@dataclass(frozen=True, slots=True)
class Claim:
    message_id: str
    claimed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Observation:
    """What the supervisor knows about one session right now."""

    alive: bool  # the runtime has a live agent for it
    started_at: datetime | None = None  # when the current agent was started/adopted
    heartbeat_at: datetime | None = None  # .heartbeat mtime; None = no file
    last_reply_at: datetime | None = None  # newest reply row seen
    claims: tuple[Claim, ...] = ()  # processing acks
    tool_timeout: float | None = None  # seconds, declared by the agent for its current tool
    due: int = 0  # due, triggered inbound messages
    idle_since: datetime | None = None  # when the status last became idle
    start_blocked_until: datetime | None = None  # runtime unavailable: retry after
    tool_running: bool = False  # container_state.current_tool is set
    answer_due: datetime | None = None  # an acked message may be answered until then


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # running | idle | stopped
    reason: str
    action: Action = Action.NONE
    next_check: datetime | None = None  # re-evaluate then (a timer, not a sweep)
    detail: dict = field(default_factory=dict)


def heartbeat_limit(cfg: LifecycleConfig, tool_timeout: float | None) -> float:
    return max(cfg.ceiling, tool_timeout or 0.0)


def claim_limit(cfg: LifecycleConfig, tool_timeout: float | None) -> float:
    return max(cfg.claim_stuck, tool_timeout or 0.0)


def last_activity(obs: Observation) -> datetime | None:
    """Newest evidence the agent did something: start, heartbeat, reply or claim."""
    times = [t for t in (obs.started_at, obs.heartbeat_at, obs.last_reply_at) if t]
    times += [c.claimed_at for c in obs.claims if c.claimed_at]
    return max(times) if times else None


def claim_tick_end(claimed_at: datetime) -> datetime:
    """The end of the clock tick a claim was stamped in.

    Claims are stamped by the agent, often with SQLite's ``datetime('now')`` (whole
    seconds) or with milliseconds, while the heartbeat is a nanosecond mtime. A
    heartbeat inside the same tick may well have come *before* the claim (agents
    heartbeat at start and claim right after), so only a heartbeat after the whole
    tick proves the agent did something since claiming.
    """
    if claimed_at.microsecond == 0:
        return claimed_at + timedelta(seconds=1)
    if claimed_at.microsecond % 1000 == 0:
        return claimed_at + timedelta(milliseconds=1)
    return claimed_at


def heartbeat_since(obs: Observation, claim: Claim) -> bool:
    return (obs.heartbeat_at is not None and claim.claimed_at is not None
            and obs.heartbeat_at >= claim_tick_end(claim.claimed_at))


def in_flight(obs: Observation, now: datetime) -> bool:
    """Work in flight by any evidence but the heartbeat: a claim, a running tool, or
    a message acknowledged and not answered yet (``answers``). Never idle then."""
    return bool(obs.claims) or obs.tool_running or (
        obs.answer_due is not None and obs.answer_due > now)


def stuck_reason(obs: Observation, now: datetime, cfg: LifecycleConfig) -> str | None:
    """Why a live agent must be killed, or None.

    - heartbeat older than max(ceiling, declared tool timeout) while it holds a claim
      or runs a tool (an agent with neither is idle, not stuck: the idle rule stops
      it politely);
    - a claim older than max(claim_stuck, declared tool timeout) with no heartbeat
      since the claim. No heartbeat file at all means "still starting": not stuck.
    """
    if not obs.alive or obs.heartbeat_at is None:
        return None
    hb_age = (now - obs.heartbeat_at).total_seconds()
    limit = heartbeat_limit(cfg, obs.tool_timeout)
    if (obs.claims or obs.tool_running) and hb_age > limit:
        return f"heartbeat {hb_age:.0f}s old (limit {limit:g}s)"
    climit = claim_limit(cfg, obs.tool_timeout)
    for claim in obs.claims:
        if claim.claimed_at is None or heartbeat_since(obs, claim):
            continue
        age = (now - claim.claimed_at).total_seconds()
        if age > climit:
            return f"claim on {claim.message_id} {age:.0f}s old with no heartbeat since (limit {climit:g}s)"
    return None


def _stuck_deadline(obs: Observation, cfg: LifecycleConfig) -> datetime | None:
    """When ``stuck_reason`` could next become true if nothing else happens."""
    if not obs.alive or obs.heartbeat_at is None:
        return None
    if not obs.claims and not obs.tool_running:
        return None
    times = [obs.heartbeat_at + timedelta(seconds=heartbeat_limit(cfg, obs.tool_timeout))]
    climit = timedelta(seconds=claim_limit(cfg, obs.tool_timeout))
    times += [c.claimed_at + climit for c in obs.claims
              if c.claimed_at is not None and not heartbeat_since(obs, c)]
    return min(times)


def earliest(*times: datetime | None) -> datetime | None:
    """The soonest of some optional times (None if there are none)."""
    present = [t for t in times if t is not None]
    return min(present) if present else None


def decide(obs: Observation, now: datetime, cfg: LifecycleConfig) -> Verdict:
    """The one lifecycle rule set. Order matters: stuck beats idle, idle beats running."""
    if not obs.alive:
        if obs.due > 0:
            if obs.start_blocked_until and obs.start_blocked_until > now:
                return Verdict("stopped", "waiting to retry start",
                               next_check=obs.start_blocked_until)
            return Verdict("stopped", f"{obs.due} message(s) due", Action.START)
        return Verdict("stopped", "no agent")

    reason = stuck_reason(obs, now, cfg)
    if reason:
        return Verdict("running", reason, Action.KILL)
    stuck_at = _stuck_deadline(obs, cfg)

    active = last_activity(obs) or now
    idle_at = active + timedelta(seconds=cfg.idle_after)
    busy = in_flight(obs, now)
    if busy or now < idle_at:
        answer_at = obs.answer_due if obs.answer_due and obs.answer_due > now else None
        return Verdict("running", "active", next_check=earliest(
            None if busy else idle_at, stuck_at, answer_at))

    idle_since = obs.idle_since if obs.idle_since and obs.idle_since >= idle_at else idle_at
    stop_at = idle_since + timedelta(seconds=cfg.stop_idle_after)
    if now >= stop_at and obs.due == 0:
        return Verdict("idle", f"idle for {(now - idle_since).total_seconds():.0f}s",
                       Action.STOP)
    return Verdict("idle", f"no heartbeat, reply or claim for {cfg.idle_after:g}s",
                   next_check=earliest(stop_at if obs.due == 0 else None, stuck_at),
                   detail={"idle_since": idle_since})


def start_backoff(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before trying to start an agent again after ``failures`` failed starts."""
    if failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))


def delivery_backoff(attempts: int, base: float) -> float:
    """Delay before delivery attempt ``attempts + 1`` (``attempts`` already failed)."""
    return base * (2 ** max(0, attempts - 1))
