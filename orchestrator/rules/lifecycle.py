"""Lifecycle decisions as small pure functions of (state, observation, now).

Nothing here reads a file, a clock or a process table: the supervisor gathers an
``Observation`` and applies the ``Verdict``. That keeps the rules table-testable
with an injected clock, and it keeps a peer system's (NanoClaw v2's) mistakes out:
status follows evidence, a freshly started agent that has not heartbeated yet is
never "stuck", and a declared tool timeout widens every stuck window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from orchestrator.config.sections import LifecycleConfig
from orchestrator.contract.session_status import Status


class Action(enum.Enum):
    NONE = "none"
    START = "start"
    STOP = "stop"  # idle too long: polite stop
    KILL = "kill"  # stuck: kill, then its claims are retried
    FAIL_DUE = "fail-due"  # the agent cannot be started: fail the due messages
    PAUSE = "pause"  # idle a while: freeze it (docker pause / SIGSTOP), memory kept
    RESUME = "resume"  # paused and work arrived: thaw it


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
    paused: bool = False  # frozen by us (a detail of idle: see ``thawed``)
    resumed_at: datetime | None = None  # last thaw: frozen time before it is no hang
    # --- what the worker knows beyond the evidence (the gates of ``decide``) ---
    status: Status = Status.STOPPED  # the status recorded now
    op_running: bool = False  # a start/stop/kill of ours is still under way
    op_blocked_until: datetime | None = None  # a stop/kill failed: no new op before
    listed: bool = True  # the runtime has listed its agents (else "not alive" = unknown)
    start_failures: int = 0  # starts in a row that failed for this session's own reasons
    timers: tuple[datetime | None, ...] = ()  # other due times (delivery retry, process_after)
    over_space: str | None = None  # over its space quota / biggest on a full disk (rules.space)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status  # what the evidence says
    reason: str
    action: Action = Action.NONE
    next_check: datetime | None = None  # re-evaluate then (a timer, not a sweep)
    detail: dict = field(default_factory=dict)
    record: tuple[str, str] | None = None  # (status, reason) to write now; None = keep
    reset_claims: bool = False  # give a dead agent's claims back, then decide again
    mute: bool = False  # drop this session's heartbeats until the next pass
    idle_since: datetime | None = None  # what to remember as the start of the idle spell


def heartbeat_limit(cfg: LifecycleConfig, tool_timeout: float | None) -> float:
    return max(cfg.ceiling, tool_timeout or 0.0)


def claim_limit(cfg: LifecycleConfig, tool_timeout: float | None) -> float:
    return max(cfg.claim_stuck, tool_timeout or 0.0)


def last_activity(obs: Observation) -> datetime | None:
    """Newest evidence the agent did something: start, heartbeat, reply or claim."""
    times = [t for t in (obs.started_at, obs.heartbeat_at, obs.last_reply_at) if t]
    times += [c.claimed_at for c in obs.claims if c.claimed_at]
    return max(times) if times else None


def last_work(obs: Observation) -> datetime | None:
    """Newest evidence the agent *worked*: start, reply or claim. Not the heartbeat,
    which only says it is alive: admission's make-room rule counts from this, so an
    agent that only heartbeats cannot hold a slot others wait for."""
    times = [t for t in (obs.started_at, obs.last_reply_at) if t]
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


def thawed(obs: Observation) -> tuple[datetime | None, tuple[Claim, ...]]:
    """The heartbeat time the heartbeat rule counts from (None: no heartbeat file), and
    the claims as the claim rule sees them, with the time the agent spent frozen taken
    out.

    A paused agent cannot heartbeat; once thawed, its old heartbeat or a claim it
    wrote just before the freeze would look like a hang. Both count from the thaw
    at the earliest, so the usual windows start again when the agent can move. The
    claim rule still asks for a *real* heartbeat after the (moved) claim: the thaw
    itself is no sign of life.
    """
    r = obs.resumed_at
    if r is None:
        return obs.heartbeat_at, obs.claims
    beat = max(obs.heartbeat_at, r) if obs.heartbeat_at is not None else None
    return beat, tuple(
        Claim(c.message_id, max(c.claimed_at, r)) if c.claimed_at else c for c in obs.claims)


def stuck_reason(obs: Observation, now: datetime, cfg: LifecycleConfig) -> str | None:
    """Why a live agent must be killed, or None.

    - heartbeat older than max(ceiling, declared tool timeout) while it holds a claim
      or runs a tool (an agent with neither is idle, not stuck: the idle rule stops
      it politely);
    - a claim older than max(claim_stuck, declared tool timeout) with no heartbeat since
      the claim — no heartbeat file at all included: an agent that claims work and never
      heartbeats would otherwise hold its claim, and its slot, for ever. (Without a claim,
      no heartbeat file means "still starting": the idle rule, not this one, ends an agent
      that never shows life.) The age counts from the end of the claim stamp's tick
      (``claim_tick_end``): the claim may have come that late, and only a heartbeat after
      it counts, so counting from the stamp itself would leave the agent no time at all to
      show one (a whole-second stamp, or a millisecond one ending in .000, reached its
      limit in the very instant its first countable heartbeat could come).
    A paused agent is frozen by us, not hung; after a thaw see ``thawed``.
    """
    if not obs.alive or obs.paused:
        return None
    beat, claims = thawed(obs)
    limit = heartbeat_limit(cfg, obs.tool_timeout)
    if beat is not None and (claims or obs.tool_running) and (now - beat).total_seconds() > limit:
        return f"heartbeat {(now - beat).total_seconds():.0f}s old (limit {limit:g}s)"
    climit = claim_limit(cfg, obs.tool_timeout)
    for claim in claims:
        if claim.claimed_at is None or heartbeat_since(obs, claim):
            continue
        age = (now - claim_tick_end(claim.claimed_at)).total_seconds()
        if age > climit:
            since = "since" if obs.heartbeat_at is not None else "at all"
            return (f"claim on {claim.message_id} {age:.0f}s old with no heartbeat {since}"
                    f" (limit {climit:g}s)")
    return None


def _stuck_deadline(obs: Observation, cfg: LifecycleConfig) -> datetime | None:
    """When ``stuck_reason`` could next become true if nothing else happens."""
    if not obs.alive or obs.paused or (not obs.claims and not obs.tool_running):
        return None
    beat, claims = thawed(obs)
    times = ([beat + timedelta(seconds=heartbeat_limit(cfg, obs.tool_timeout))]
             if beat is not None else [])
    climit = timedelta(seconds=claim_limit(cfg, obs.tool_timeout))
    times += [claim_tick_end(c.claimed_at) + climit for c in claims
              if c.claimed_at is not None and not heartbeat_since(obs, c)]
    return min(times) if times else None


def earliest(*times: datetime | None) -> datetime | None:
    """The soonest of some optional times (None if there are none)."""
    present = [t for t in times if t is not None]
    return min(present) if present else None


_RUNTIME_OPS = (Action.START, Action.STOP, Action.KILL, Action.PAUSE, Action.RESUME)


def decide(obs: Observation, now: datetime, cfg: LifecycleConfig) -> Verdict:
    """The one lifecycle rule set: what the evidence says (``judge``), then the
    worker's gates on it.

    - Claims held while no agent runs are a dead agent's, and so are messages it
      acked but had not answered (``answers``): give them back first
      (only once the runtime has listed its agents, and no op of ours is under way:
      until then "not alive" may just be "not known yet").
    - While one of our runtime ops runs, nothing is recorded or started: its end
      brings the next pass.
    - After a failed stop/kill the same op is not retried before ``op_blocked_until``
      (the same verdict on every pass would be a hot loop against a dead daemon).
    - The recorded status follows the evidence, except that "stopped" is recorded
      with its own reason (the agent's exit writes the precise one).
    - Heartbeats are muted when they cannot change anything: the agent runs, is
      recorded running, no op is pending and a timer will bring the next pass.
    """
    unanswered = obs.answer_due is not None and obs.answer_due > now
    if (obs.claims or unanswered) and not obs.alive and obs.listed and not obs.op_running:
        what = (f"{len(obs.claims)} claim(s)" if obs.claims else
                "acked message(s) not answered")
        return Verdict(obs.status, f"{what} held with no agent running", reset_claims=True)
    verdict = judge(obs, now, cfg)
    next_check = earliest(verdict.next_check, *obs.timers)
    if obs.op_running:
        return replace(verdict, action=Action.NONE, next_check=next_check,
                       idle_since=obs.idle_since)
    gated = (obs.op_blocked_until is not None and obs.op_blocked_until > now
             and verdict.action in _RUNTIME_OPS)
    if gated:
        next_check = earliest(next_check, obs.op_blocked_until)
    action = Action.NONE if gated else verdict.action
    record: tuple[str, str] | None = None
    if verdict.status != obs.status:
        record = ((verdict.status, verdict.reason) if verdict.status != Status.STOPPED
                  else (Status.STOPPED, "no agent running"))
    status = record[0] if record else obs.status
    mute = (status == Status.RUNNING and obs.alive and action is Action.NONE
            and next_check is not None)
    idle_since = verdict.detail.get("idle_since") if verdict.status == Status.IDLE else None
    return replace(verdict, action=action, next_check=next_check, record=record, mute=mute,
                   idle_since=idle_since)


def judge(obs: Observation, now: datetime, cfg: LifecycleConfig) -> Verdict:
    """What the evidence says (``evidence``), then the agent's lifetime (``lifetime``)."""
    return lifetime(obs, now, cfg, evidence(obs, now, cfg))


def run_deadlines(obs: Observation, cfg: LifecycleConfig) -> tuple[datetime, datetime] | None:
    """When a live agent's run reaches ``max_run`` (stopped at its next idle moment from
    then) and when its grace ends (killed); None without a limit or a known start."""
    if cfg.max_run <= 0 or not obs.alive or obs.started_at is None:
        return None
    stop_at = obs.started_at + timedelta(seconds=cfg.max_run)
    return stop_at, stop_at + timedelta(seconds=cfg.max_run_grace)


def lifetime(obs: Observation, now: datetime, cfg: LifecycleConfig, base: Verdict) -> Verdict:
    """``[lifecycle] max_run`` over the evidence's verdict ``base``.

    Before ``max_run`` nothing changes but the next check (the moment it is reached).
    From ``max_run`` on (the boundary included) the agent is stopped politely at its
    first idle moment — no claim, no running tool, no answer owed, nothing due: the
    same evidence that lets the idle rule stop it, so no work is cut off. From
    ``max_run + max_run_grace`` on it is killed whatever it does, and its claims and
    unanswered acks are given back (tries + 1, backoff) exactly as after a stuck kill.
    A kill the evidence already asks for (stuck, over its space) keeps its own reason.
    The reasons start with ``max_run`` (``status``, events, the stop-reason metric).
    """
    ends = run_deadlines(obs, cfg)
    if ends is None or base.action is Action.KILL:
        return base
    stop_at, kill_at = ends
    if now < stop_at:
        return replace(base, next_check=earliest(base.next_check, stop_at))
    assert obs.started_at is not None  # (run_deadlines needs it)
    ran = (now - obs.started_at).total_seconds()
    if now >= kill_at:
        return replace(base, status=Status.RUNNING, action=Action.KILL, next_check=None,
                       reason=f"max_run: ran {ran:.0f}s (max_run {cfg.max_run:g}s) and was not "
                              f"idle within max_run_grace ({cfg.max_run_grace:g}s)")
    if not in_flight(obs, now) and obs.due == 0:
        return replace(base, action=Action.STOP, next_check=None,
                       reason=f"max_run: ran {ran:.0f}s (max_run {cfg.max_run:g}s)")
    # busy (so neither an idle stop nor a pause is asked for): the end of its work brings
    # a pass (a reply or an ack is an outbound.db commit, new work an inbound.db one)
    return replace(base, next_check=earliest(base.next_check, kill_at))


def evidence(obs: Observation, now: datetime, cfg: LifecycleConfig) -> Verdict:
    """What the evidence says. Order matters: stuck beats idle, idle beats running."""
    if not obs.alive:
        if obs.due > 0:
            if obs.start_failures >= cfg.max_tries:
                return Verdict(Status.STOPPED, f"the agent could not be started "
                               f"{obs.start_failures} times", Action.FAIL_DUE)
            if obs.start_blocked_until and obs.start_blocked_until > now:
                return Verdict(Status.STOPPED, "waiting to retry start",
                               next_check=obs.start_blocked_until)
            return Verdict(Status.STOPPED, f"{obs.due} message(s) due", Action.START)
        return Verdict(Status.STOPPED, "no agent")

    if obs.paused and obs.claims:  # it claimed just as it was frozen: let it work
        return Verdict(Status.RUNNING, "claim held by a paused agent: resuming", Action.RESUME)
    # over its space it must not write more (its starts are then refused, counted)
    reason = obs.over_space or stuck_reason(obs, now, cfg)
    if reason:
        return Verdict(Status.RUNNING, reason, Action.KILL)
    stuck_at = _stuck_deadline(obs, cfg)

    active = last_activity(obs) or now
    idle_at = active + timedelta(seconds=cfg.idle_after)
    busy = in_flight(obs, now)
    if busy or now < idle_at:
        answer_at = obs.answer_due if obs.answer_due and obs.answer_due > now else None
        return Verdict(Status.RUNNING, "active",
                       Action.RESUME if obs.paused and obs.due > 0 else Action.NONE,
                       next_check=earliest(None if busy else idle_at, stuck_at, answer_at))

    idle_since = obs.idle_since if obs.idle_since and obs.idle_since >= idle_at else idle_at
    stop_at = idle_since + timedelta(seconds=cfg.stop_idle_after)
    if now >= stop_at and obs.due == 0:
        return Verdict(Status.IDLE, f"idle for {(now - idle_since).total_seconds():.0f}s",
                       Action.STOP)
    kept = {"idle_since": idle_since}
    if obs.paused:
        if obs.due > 0:
            return Verdict(Status.IDLE, f"resumed: {obs.due} message(s) due", Action.RESUME,
                           detail=kept)
        return Verdict(Status.IDLE, "paused", next_check=stop_at, detail=kept | {"paused": True})
    pause_at = pause_deadline(idle_since, stop_at, obs.due, cfg)
    if pause_at is not None and now >= pause_at:
        return Verdict(Status.IDLE, f"paused after {(now - idle_since).total_seconds():.0f}s idle",
                       Action.PAUSE, next_check=stop_at, detail=kept)
    return Verdict(Status.IDLE, f"no heartbeat, reply or claim for {cfg.idle_after:g}s",
                   next_check=earliest(stop_at if obs.due == 0 else None, pause_at, stuck_at),
                   detail=kept)


def pause_deadline(idle_since: datetime, stop_at: datetime, due: int,
                   cfg: LifecycleConfig) -> datetime | None:
    """When an idle agent is frozen: ``pause_idle_after`` s into its idle spell, if
    pausing is on (> 0), nothing is due, and the stop would not come first anyway."""
    if cfg.pause_idle_after <= 0 or due > 0:
        return None
    pause_at = idle_since + timedelta(seconds=cfg.pause_idle_after)
    return pause_at if pause_at < stop_at else None


def start_backoff(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before trying to start an agent again after ``failures`` failed starts."""
    if failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))


def delivery_backoff(attempts: int, base: float) -> float:
    """Delay before delivery attempt ``attempts + 1`` (``attempts`` already failed)."""
    return base * (2 ** max(0, attempts - 1))
