"""Lifecycle rules as tables: an injected clock (fixed datetimes), no waiting.

Times in the tables are seconds relative to ``NOW`` (negative = in the past), so
each row reads like the situation it describes. The config is NanoClaw's
numbers (the defaults): idle after 30 s, stop after 300 s idle, heartbeat
ceiling 30 min, claim without heartbeat 60 s.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.config.sections import LifecycleConfig
from orchestrator.contract.schema import parse_ts
from orchestrator.rules.lifecycle import (
    Action,
    Claim,
    Observation,
    claim_limit,
    claim_tick_end,
    decide,
    delivery_backoff,
    heartbeat_limit,
    last_activity,
    last_work,
    pause_deadline,
    start_backoff,
    stuck_reason,
)

# stamped to the microsecond, so the tables' claims are exact (``claim_tick_end`` is
# the stamp itself); coarse stamps have their own test below
NOW = datetime(2025, 3, 1, 12, 0, 0, 250_001, tzinfo=timezone.utc)
CFG = LifecycleConfig()  # idle 30, stop 300, ceiling 1800, claim 60


def at(seconds: float | None) -> datetime | None:
    return None if seconds is None else NOW + timedelta(seconds=seconds)


def obs(alive: bool = True, *, started: float | None = None, hb: float | None = None,
        reply: float | None = None, claims: tuple = (), tool: float | None = None,
        due: int = 0, idle_since: float | None = None,
        blocked: float | None = None, tool_running: bool = False,
        answer: float | None = None) -> Observation:
    return Observation(
        alive=alive, started_at=at(started), heartbeat_at=at(hb), last_reply_at=at(reply),
        claims=tuple(Claim(mid, at(t)) for mid, t in claims), tool_timeout=tool, due=due,
        idle_since=at(idle_since), start_blocked_until=at(blocked), tool_running=tool_running,
        answer_due=at(answer))


# status, action, next_check (relative s or None), reason (substring)
DECIDE_CASES = [
    # --- no agent ---------------------------------------------------------------------
    ("stopped, nothing to do", obs(False), "stopped", Action.NONE, None, "no agent"),
    ("start when due and not alive", obs(False, due=2), "stopped", Action.START, None,
     "2 message(s) due"),
    ("start blocked until a time", obs(False, due=1, blocked=10), "stopped", Action.NONE, 10,
     "waiting to retry start"),
    ("start once the block has passed", obs(False, due=1, blocked=-0.001), "stopped",
     Action.START, None, "1 message(s) due"),
    ("start exactly when the block ends", obs(False, due=1, blocked=0), "stopped",
     Action.START, None, "1 message(s) due"),
    ("a dead agent's stale heartbeat changes nothing: its claim is given back",
     obs(False, hb=-5000, claims=(("m", -4000),)), "stopped", Action.NONE, None,
     "1 claim(s) held with no agent running"),
    # --- running --------------------------------------------------------------------
    ("fresh start, no heartbeat yet: running until idle_after", obs(started=-10),
     "running", Action.NONE, 20, "active"),
    ("recent heartbeat: idle check at hb + idle_after", obs(started=-100, hb=-5),
     "running", Action.NONE, 25, "active"),
    ("a reply counts as activity", obs(started=-100, hb=-50, reply=-1),
     "running", Action.NONE, 29, "active"),
    ("a claim counts as activity and holds running (next check: claim rule)",
     obs(started=-100, hb=-50, claims=(("m1", -40),)), "running", Action.NONE, 20, "active"),
    ("activity after an old idle period is running again",
     obs(started=-500, hb=-1, idle_since=-400), "running", Action.NONE, 29, "active"),
    # --- idle and stop --------------------------------------------------------------
    ("idle after idle_after without activity; stop check at idle + stop_idle_after",
     obs(started=-100, hb=-40), "idle", Action.NONE, -10 + 300,
     "no heartbeat, reply or claim for 30s"),
    ("exactly at idle_after: idle", obs(started=-100, hb=-30), "idle", Action.NONE, 300,
     "no heartbeat, reply or claim"),
    ("stop after stop_idle_after", obs(started=-1000, hb=-330), "idle", Action.STOP, None,
     "idle for 300s"),
    ("idle_since from an earlier period does not shorten the wait",
     obs(started=-1000, hb=-40, idle_since=-900), "idle", Action.NONE, 290, "no heartbeat"),
    ("idle_since kept across passes", obs(started=-1000, hb=-100, idle_since=-50),
     "idle", Action.NONE, 250, "no heartbeat"),
    ("no stop while work is due (the agent will pick it up)",
     obs(started=-1000, hb=-400, due=1), "idle", Action.NONE, None, "no heartbeat"),
    # --- stuck ----------------------------------------------------------------------
    ("kill on heartbeat ceiling", obs(started=-4000, hb=-1801, claims=(("m1", -1900),)),
     "running", Action.KILL, None, "heartbeat 1801s old (limit 1800s)"),
    ("heartbeat at the ceiling is not yet stuck", obs(started=-4000, hb=-1800,
                                                       claims=(("m1", -1900),)),
     "running", Action.NONE, 0, "active"),
    ("kill on claim without heartbeat since the claim",
     obs(started=-200, hb=-120, claims=(("m1", -61),)), "running", Action.KILL, None,
     "claim on m1 61s old with no heartbeat since (limit 60s)"),
    ("claim rule: next check when the claim turns stuck",
     obs(started=-200, hb=-120, claims=(("m1", -20),)), "running", Action.NONE, 40, "active"),
    ("heartbeat after the claim: the claim rule does not apply",
     obs(started=-200, hb=-10, claims=(("m1", -100),)), "running", Action.NONE, 1790, "active"),
    ("a claim with no heartbeat file at all is stuck like one with none since",
     obs(started=-4000, claims=(("m1", -3000),)), "running", Action.KILL, None,
     "claim on m1 3000s old with no heartbeat at all (limit 60s)"),
    ("no heartbeat file yet, a young claim: next check when it turns stuck",
     obs(started=-30, claims=(("m1", -20),)), "running", Action.NONE, 40, "active"),
    ("no heartbeat file and no claim: still starting, the idle rule applies",
     obs(started=-10), "running", Action.NONE, 20, "active"),
    ("a claim without a time is never stuck", obs(started=-200, hb=-120, claims=(("m1", None),)),
     "running", Action.NONE, 1680, "active"),
    ("... and does not hide a stuck claim after it",
     obs(started=-200, hb=-100, claims=(("a", None), ("x", -61))), "running", Action.KILL,
     None, "claim on x 61s old with no heartbeat since (limit 60s)"),
    ("a claim exactly claim_stuck old is not yet stuck (its deadline is now)",
     obs(started=-200, hb=-120, claims=(("m1", -60),)), "running", Action.NONE, 0, "active"),
    ("declared tool timeout widens the claim window",
     obs(started=-500, hb=-400, claims=(("m1", -300),), tool=600), "running", Action.NONE, 300,
     "active"),
    ("declared tool timeout widens the heartbeat ceiling",
     obs(started=-9000, hb=-2000, claims=(("m1", -2500),), tool=3600), "running", Action.NONE,
     1600, "active"),
    ("past a declared tool timeout: killed, limit named",
     obs(started=-9000, hb=-3700, claims=(("m1", -3800),), tool=3600), "running", Action.KILL,
     None, "heartbeat 3700s old (limit 3600s)"),
    ("a tool timeout below the defaults does not shrink them",
     obs(started=-500, hb=-400, claims=(("m1", -59),), tool=5), "running", Action.NONE, 1,
     "active"),
    # --- work in flight without a claim (NanoClaw's runner: issue 15) ----------------
    ("a running tool is work: a 10-minute silent tool call is not idle",
     obs(started=-700, hb=-600, tool_running=True), "running", Action.NONE, 1200, "active"),
    ("a running tool past the heartbeat ceiling is stuck",
     obs(started=-4000, hb=-1801, tool_running=True), "running", Action.KILL, None,
     "heartbeat 1801s old"),
    ("a declared timeout widens the ceiling for a claimless tool too",
     obs(started=-4000, hb=-2000, tool_running=True, tool=3600), "running", Action.NONE, 1600,
     "active"),
    ("an acked, unanswered message is work: a 2-minute silent model call is not idle",
     obs(started=-200, hb=-120, answer=480), "running", Action.NONE, 480, "active"),
    ("the answer window's end is the next check, before the idle time",
     obs(started=-200, hb=-1, answer=5), "running", Action.NONE, 5, "active"),
    ("an unanswered message does not make the agent stuck (no kill on the ceiling)",
     obs(started=-4000, hb=-1900, answer=60), "running", Action.NONE, 60, "active"),
    ("once the answer window is over, the usual idle rule applies",
     obs(started=-1000, hb=-700, answer=-100), "idle", Action.STOP, None, "idle for"),
    ("tool cleared and no answer awaited: idle as before",
     obs(started=-100, hb=-40, tool_running=False, answer=None), "idle", Action.NONE, 290,
     "no heartbeat"),
    ("an answer window ending exactly now is over: idle",
     obs(started=-100, hb=-40, answer=0), "idle", Action.NONE, 290, "no heartbeat"),
    ("an answer window that has ended is no next check", obs(started=-1, answer=-5),
     "running", Action.NONE, 29, "active"),
    ("an answer window ending exactly now is no next check", obs(started=-1, answer=0),
     "running", Action.NONE, 29, "active"),
    ("due work for a live agent that is not paused: nothing to resume",
     obs(started=-10, due=1), "running", Action.NONE, 20, "active"),
]


@pytest.mark.parametrize(("case", "observation", "status", "action", "next_check", "reason"),
                         DECIDE_CASES, ids=[c[0] for c in DECIDE_CASES])
def test_decide(case: str, observation: Observation, status: str, action: Action,
                next_check: float | None, reason: str) -> None:
    verdict = decide(observation, NOW, CFG)
    assert (verdict.status, verdict.action) == (status, action), verdict
    assert verdict.next_check == at(next_check), verdict
    assert verdict.reason.startswith(reason), verdict


def test_idle_verdict_carries_idle_since() -> None:
    verdict = decide(obs(started=-100, hb=-40), NOW, CFG)
    assert verdict.detail == {"idle_since": at(-10)}
    # the supervisor feeds it back; a later pass keeps the same idle period
    later = NOW + timedelta(seconds=100)
    again = decide(obs(started=-100, hb=-40, idle_since=-10), later, CFG)
    assert again.detail == {"idle_since": at(-10)}
    assert again.next_check == at(290)


def test_idle_then_stop_with_short_windows() -> None:
    """The same rules with the test suite's short windows, walked along a clock."""
    cfg = LifecycleConfig(idle_after=0.5, stop_idle_after=0.5)
    o = obs(started=-0.1, hb=0)
    v = decide(o, NOW, cfg)
    assert (v.status, v.next_check) == ("running", at(0.5))
    v = decide(o, at(0.5), cfg)
    assert (v.status, v.action, v.next_check) == ("idle", Action.NONE, at(1.0))
    o2 = obs(started=-0.1, hb=0, idle_since=v.detail["idle_since"].timestamp() - NOW.timestamp())
    v = decide(o2, at(1.0), cfg)
    assert (v.status, v.action) == ("idle", Action.STOP)


# --- the worker's gates: what to record, start, stop, give back, mute ------------------


def gated(alive: bool = True, *, status: str = "stopped", op: bool = False,
          blocked_ops: float | None = None, listed: bool = True, failures: int = 0,
          timers: tuple = (), **evidence) -> Observation:
    """``obs`` plus what the session worker knows beyond the evidence."""
    return replace(obs(alive, **evidence), status=status, op_running=op,
                   op_blocked_until=at(blocked_ops), listed=listed, start_failures=failures,
                   timers=tuple(at(t) for t in timers))


# action, record (status, reason substring) or None, reset_claims, mute, next_check
GATE_CASES = [
    # --- which status to write ----------------------------------------------------------
    ("fresh agent recorded stopped: write running", gated(started=-1, status="stopped"),
     Action.NONE, ("running", "active"), False, True, 29),
    ("already recorded running: write nothing, mute (a timer will come)",
     gated(started=-1, status="running"), Action.NONE, None, False, True, 29),
    ("idle evidence on a running record: write idle, no mute",
     gated(started=-100, hb=-40, status="running"), Action.NONE, ("idle", "no heartbeat"),
     False, False, 290),
    ("no agent on a running record: write stopped with its own reason",
     gated(False, status="running"), Action.NONE, ("stopped", "no agent running"), False,
     False, None),
    ("no agent, recorded stopped: nothing to write", gated(False), Action.NONE, None, False,
     False, None),
    # --- an op of ours is under way: nothing written, nothing started ---------------------
    ("op running: no start, no record", gated(False, due=1, op=True, status="running"),
     Action.NONE, None, False, False, None),
    ("op running: no kill, no mute", gated(started=-200, hb=-120, claims=(("m1", -61),),
                                           op=True, status="running"),
     Action.NONE, None, False, False, None),
    ("op running: the other timers still join the next check",
     gated(started=-1, op=True, status="running", timers=(4,)), Action.NONE, None, False,
     False, 4),
    # --- the back-off gate after a failed stop/kill ---------------------------------------
    ("failed kill: not retried before the gate, which is the next check (the gate's pass"
     " re-reads the heartbeat, so muting meanwhile loses nothing)",
     gated(started=-200, hb=-120, claims=(("m1", -61),), blocked_ops=7, status="running"),
     Action.NONE, None, False, True, 7),
    ("failed kill: retried once the gate has passed",
     gated(started=-200, hb=-120, claims=(("m1", -61),), blocked_ops=-1, status="running"),
     Action.KILL, None, False, False, None),
    ("failed kill: retried exactly when the gate ends",
     gated(started=-200, hb=-120, claims=(("m1", -61),), blocked_ops=0, status="running"),
     Action.KILL, None, False, False, None),
    ("the gate holds a start too", gated(False, due=1, blocked_ops=3),
     Action.NONE, None, False, False, 3),
    ("the gate joins the next check; a sooner timer still comes first",
     gated(False, due=1, blocked_ops=3, timers=(2,)), Action.NONE, None, False, False, 2),
    ("the gate does not hold what is no op", gated(started=-10, blocked_ops=3,
                                                   status="running"),
     Action.NONE, None, False, True, 20),
    # --- orphan claims --------------------------------------------------------------------
    ("claims and no agent: give them back first", gated(False, claims=(("m1", -5),), due=1),
     Action.NONE, None, True, False, None),
    ("claims and no agent, runtime not listed yet: unknown, keep them",
     gated(False, claims=(("m1", -5),), listed=False), Action.NONE, None, False, False, None),
    ("claims and no agent while our op runs (a start): keep them",
     gated(False, claims=(("m1", -5),), op=True), Action.NONE, None, False, False, None),
    ("acked-but-unanswered messages and no agent: give them back too (issue 15)",
     gated(False, answer=300), Action.NONE, None, True, False, None),
    ("... unless the answer window is over: the silence was the answer",
     gated(False, answer=-1), Action.NONE, None, False, False, None),
    ("... over exactly now too", gated(False, answer=0), Action.NONE, None, False, False,
     None),
    ("... and not before the runtime has listed its agents",
     gated(False, answer=300, listed=False), Action.NONE, None, False, False, None),
    # --- starts that keep failing ---------------------------------------------------------
    ("start failed below max_tries: retry after the backoff",
     gated(False, due=1, failures=CFG.max_tries - 1, blocked=2), Action.NONE, None, False,
     False, 2),
    ("start failed max_tries times: fail the due messages at once (no more backoff)",
     gated(False, due=2, failures=CFG.max_tries, blocked=2), Action.FAIL_DUE, None, False,
     False, None),
    ("failed starts with nothing due: nothing to fail", gated(False, failures=CFG.max_tries),
     Action.NONE, None, False, False, None),
    # --- other timers join the next check -------------------------------------------------
    ("a delivery retry sooner than the idle check", gated(started=-1, status="running",
                                                          timers=(4, None)),
     Action.NONE, None, False, True, 4),
    ("a process_after of a stopped session is its only timer", gated(False, timers=(None, 60)),
     Action.NONE, None, False, False, 60),
    ("no mute without a timer (a tool running, no heartbeat yet, no claim)",
     gated(started=-4000, tool_running=True, status="running"), Action.NONE, None,
     False, False, None),
    ("a claim with no heartbeat yet has its timer: muted until it turns stuck",
     gated(started=-30, claims=(("m1", -20),), status="running"), Action.NONE, None,
     False, True, 40),
]


@pytest.mark.parametrize(("case", "observation", "action", "record", "reset", "mute",
                          "next_check"), GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_decide_gates(case: str, observation: Observation, action: Action,
                      record: tuple[str, str] | None, reset: bool, mute: bool,
                      next_check: float | None) -> None:
    verdict = decide(observation, NOW, CFG)
    assert verdict.action == action, verdict
    if record is None:
        assert verdict.record is None, verdict
    else:
        assert verdict.record is not None and verdict.record[0] == record[0], verdict
        assert verdict.record[1].startswith(record[1]), verdict
    assert (verdict.reset_claims, verdict.mute) == (reset, mute), verdict
    assert verdict.next_check == at(next_check), verdict


@pytest.mark.parametrize(("observation", "reason"), [
    (gated(False, claims=(("m1", -5), ("m2", -3)), due=1),
     "2 claim(s) held with no agent running"),
    (gated(False, claims=(("m1", -5),), answer=300), "1 claim(s) held with no agent running"),
    (gated(False, answer=300), "acked message(s) not answered held with no agent running"),
])
def test_what_is_given_back_is_named(observation: Observation, reason: str) -> None:
    verdict = decide(observation, NOW, CFG)
    assert verdict.reset_claims and verdict.reason == reason


def test_failed_starts_name_the_count() -> None:
    verdict = decide(gated(False, due=1, failures=5), NOW, CFG)
    assert verdict.action is Action.FAIL_DUE
    assert verdict.reason == "the agent could not be started 5 times"


def test_idle_since_is_kept_while_an_op_runs_and_cleared_when_running() -> None:
    idle = gated(started=-100, hb=-40, idle_since=-10, status="idle", op=True)
    assert decide(idle, NOW, CFG).idle_since == at(-10)
    assert decide(gated(started=-100, hb=-40, status="idle"), NOW, CFG).idle_since == at(-10)
    assert decide(gated(started=-1, idle_since=-10, status="idle"), NOW, CFG).idle_since is None


# --- the pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(("tool", "heartbeat", "claim"), [
    (None, 1800, 60), (0, 1800, 60), (30, 1800, 60), (120, 1800, 120), (7200, 7200, 7200),
])
def test_limits(tool: float | None, heartbeat: float, claim: float) -> None:
    assert heartbeat_limit(CFG, tool) == heartbeat
    assert claim_limit(CFG, tool) == claim


@pytest.mark.parametrize("tool", [None, 0])
def test_limits_below_a_second_are_kept_without_a_tool(tool: float | None) -> None:
    short = LifecycleConfig(ceiling=0.5, claim_stuck=0.25)  # the config allows 0.1
    assert (heartbeat_limit(short, tool), claim_limit(short, tool)) == (0.5, 0.25)


@pytest.mark.parametrize(("observation", "expected"), [
    (obs(), None),
    (obs(started=-50), -50),
    (obs(started=-50, hb=-40, reply=-30), -30),
    (obs(started=-50, hb=-40, claims=(("a", -20), ("b", None))), -20),
    (obs(hb=-5, claims=(("a", -20),)), -5),
])
def test_last_activity(observation: Observation, expected: float | None) -> None:
    assert last_activity(observation) == at(expected)


@pytest.mark.parametrize(("observation", "expected"), [
    (obs(), None),
    (obs(hb=-1), None),  # a heartbeat is life, not work
    (obs(started=-50, hb=-1), -50),
    (obs(started=-50, hb=-1, reply=-30), -30),
    (obs(started=-50, hb=-1, claims=(("a", -20), ("b", None))), -20),
])
def test_last_work_ignores_heartbeats(observation: Observation, expected: float | None) -> None:
    assert last_work(observation) == at(expected)


@pytest.mark.parametrize(("observation", "stuck"), [
    (obs(False, hb=-5000), None),  # dead: nothing to kill
    (obs(False, hb=-5000, claims=(("x", -4000),)), None),  # dead with claims: given back
    (replace(obs(hb=-5000, claims=(("x", -4000),)), paused=True), None),  # frozen by us
    (obs(started=-5000), None),  # no heartbeat file yet, no claim: the idle rule's
    (obs(started=-5000, claims=(("x", -61),)), "claim on x 61s old with no heartbeat at all"),
    (obs(started=-5000, claims=(("x", -59),)), None),
    (obs(started=-5000, claims=(("x", -61),), tool=600), None),  # a declared tool widens it
    (obs(hb=-1800.5), None),  # no claim: idle, not stuck (the idle rule stops it)
    (obs(hb=-1800.5, claims=(("x", -1900),)), "heartbeat"),
    (obs(hb=-100, claims=(("x", -30),)), None),  # claim after hb, but young
    (obs(hb=-100, claims=(("x", -61),)), "claim on x"),
    (obs(hb=-100.5, claims=(("x", -100),)), "claim on x"),  # a beat just before: none *since*
    (obs(hb=-60, claims=(("x", -61),)), None),  # heartbeat since the claim
])
def test_stuck_reason(observation: Observation, stuck: str | None) -> None:
    reason = stuck_reason(observation, NOW, CFG)
    if stuck is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(stuck)


@pytest.mark.parametrize(("claimed", "heartbeat", "since"), [
    # the reference agent stamps milliseconds; the heartbeat is an ns mtime
    ("2025-03-01 12:00:50.773", "2025-03-01 12:00:50.773102471", False),  # same ms: before?
    ("2025-03-01 12:00:50.773", "2025-03-01 12:00:50.774", True),
    ("2025-03-01 12:00:50.773", "2025-03-01 12:00:50.772999", False),
    # SQLite's datetime('now') stamps whole seconds
    ("2025-03-01 12:00:50", "2025-03-01 12:00:50.5", False),
    ("2025-03-01 12:00:50", "2025-03-01 12:00:51", True),
    # a stamp with microseconds is taken as exact
    ("2025-03-01 12:00:50.773102", "2025-03-01 12:00:50.773103", True),
    ("2025-03-01 12:00:50.773102", "2025-03-01 12:00:50.773101", False),
])
def test_claim_rule_respects_the_claim_stamp_precision(claimed: str, heartbeat: str,
                                                       since: bool) -> None:
    """A heartbeat in the same tick as a coarse claim stamp does not count as 'since the
    claim': agents heartbeat at start and claim right after, within one tick."""
    claimed_at, hb = parse_ts(claimed), parse_ts(heartbeat)
    observation = Observation(alive=True, started_at=hb, heartbeat_at=hb,
                              claims=(Claim("m1", claimed_at),))
    later = claim_tick_end(claimed_at) + timedelta(seconds=CFG.claim_stuck + 1)
    reason = stuck_reason(observation, later, CFG)
    assert (reason is None) == since, reason
    verdict = decide(observation, claimed_at + timedelta(seconds=1), CFG)
    expected = (hb + timedelta(seconds=CFG.ceiling) if since
                else claim_tick_end(claimed_at) + timedelta(seconds=CFG.claim_stuck))
    assert verdict.next_check == expected


@pytest.mark.parametrize("claimed", [
    "2025-03-01 12:00:50",  # SQLite's datetime('now')
    "2025-03-01 12:00:50.000",  # the reference agent's milliseconds, on a whole second
    "2025-03-01 12:00:50.773",
])
def test_a_heartbeating_agent_is_never_killed_at_its_claim_deadline(claimed: str) -> None:
    """The pass at the claim rule's deadline finds an agent that heartbeats every 0.1 s
    and has not beaten since the deadline's instant: it must get its time, whatever the
    stamp's precision (a whole-second stamp once made that deadline the end of its tick,
    killing healthy agents in CI)."""
    cfg = LifecycleConfig(claim_stuck=1.0)
    claimed_at = parse_ts(claimed)
    deadline = decide(Observation(alive=True, heartbeat_at=claimed_at,
                                  claims=(Claim("m1", claimed_at),)), claimed_at, cfg).next_check
    assert deadline is not None and deadline > claim_tick_end(claimed_at)
    beats = [claimed_at + timedelta(seconds=0.1 * i - 0.05) for i in range(1, 40)]
    for now in (deadline, deadline + timedelta(milliseconds=2)):
        last = max(b for b in beats if b <= now)
        observation = Observation(alive=True, heartbeat_at=last,
                                  claims=(Claim("m1", claimed_at),))
        assert stuck_reason(observation, now, cfg) is None, (now, last)


@pytest.mark.parametrize(("failures", "base", "cap", "delay"), [
    (0, 1.0, 60.0, 0.0),
    (1, 1.0, 60.0, 1.0),
    (2, 1.0, 60.0, 2.0),
    (3, 1.0, 60.0, 4.0),
    (7, 1.0, 60.0, 60.0),  # 64 capped
    (30, 1.0, 60.0, 60.0),
    (2, 0.5, 60.0, 1.0),
])
def test_start_backoff(failures: int, base: float, cap: float, delay: float) -> None:
    assert start_backoff(failures, base, cap) == delay


def test_start_backoff_defaults_are_one_second_doubling_to_a_minute() -> None:
    assert [start_backoff(n) for n in (1, 2, 6, 7, 30)] == [1.0, 2.0, 32.0, 60.0, 60.0]


@pytest.mark.parametrize(("attempts", "base", "delay"), [
    (0, 2.0, 2.0),
    (1, 2.0, 2.0),  # after the first failure: base
    (2, 2.0, 4.0),
    (3, 2.0, 8.0),
    (5, 0.1, 1.6),
    (4, 0.0, 0.0),
])
def test_delivery_backoff(attempts: int, base: float, delay: float) -> None:
    assert delivery_backoff(attempts, base) == pytest.approx(delay)


# --- the paused tier (pause_idle_after = 60: idle 30 s, paused 60 s later, stopped at 300) ---

PCFG = LifecycleConfig(pause_idle_after=60.0)


def pobs(*, paused: bool = False, resumed: float | None = None, **kw) -> Observation:
    return replace(obs(**kw), paused=paused, resumed_at=at(resumed))


PAUSE_CASES = [
    ("idle, not yet paused: next check at the pause", pobs(started=-100, hb=-40),
     "idle", Action.NONE, 50, "no heartbeat"),
    ("idle for pause_idle_after: pause", pobs(started=-200, hb=-90),
     "idle", Action.PAUSE, 240, "paused after 60s idle"),
    ("no pause while work is due", pobs(started=-200, hb=-90, due=1),
     "idle", Action.NONE, None, "no heartbeat"),
    ("paused: nothing to do until the stop", pobs(started=-200, hb=-100, paused=True),
     "idle", Action.NONE, 230, "paused"),
    ("paused and work due: resume at once", pobs(started=-200, hb=-100, paused=True, due=1),
     "idle", Action.RESUME, None, "resumed: 1 message(s) due"),
    ("paused still stops after stop_idle_after", pobs(started=-1000, hb=-400, paused=True),
     "idle", Action.STOP, None, "idle for 370s"),
    ("paused with a claim (claimed as it froze): resume, never kill",
     pobs(started=-9000, hb=-5000, claims=(("m1", -4000),), paused=True),
     "running", Action.RESUME, None, "claim held by a paused agent: resuming"),
    ("frozen time is no hang: an old heartbeat counts from the thaw",
     pobs(started=-9000, hb=-5000, claims=(("m1", -1),), resumed=-2),
     "running", Action.NONE, 59, "active"),
    ("a claim from before the freeze counts from the thaw too",
     pobs(started=-9000, hb=-5000, claims=(("m1", -4000),), resumed=-10),
     "running", Action.NONE, 50, "active"),
    ("after the thaw the usual windows apply",
     pobs(started=-9000, hb=-5000, claims=(("m1", -4000),), resumed=-61),
     "running", Action.KILL, None, "claim on m1 61s old"),
    ("after the thaw the heartbeat ceiling applies to a running tool",
     pobs(started=-9000, hb=-5000, tool_running=True, resumed=-1801),
     "running", Action.KILL, None, "heartbeat 1801s old (limit 1800s)"),
    ("thawed with no heartbeat file: the claim counts from the thaw",
     pobs(started=-100, claims=(("m1", -50),), resumed=-5), "running", Action.NONE, 55,
     "active"),
    ("thawed with a claim that has no time: the heartbeat ceiling is the timer",
     pobs(started=-100, hb=-1, claims=(("m1", None),), resumed=-5), "running", Action.NONE,
     1799, "active"),
    ("paused with a tool running: no stuck timer while frozen",
     pobs(started=-100, hb=-10, tool_running=True, paused=True), "running", Action.NONE,
     None, "active"),
    ("paused before it was idle, work due: resume",
     pobs(started=-10, paused=True, due=1), "running", Action.RESUME, 20, "active"),
    ("paused before it was idle, nothing due: stays paused",
     pobs(started=-10, paused=True), "running", Action.NONE, 20, "active"),
]


@pytest.mark.parametrize(("case", "observation", "status", "action", "next_check", "reason"),
                         PAUSE_CASES, ids=[c[0] for c in PAUSE_CASES])
def test_decide_paused_tier(case: str, observation: Observation, status: str, action: Action,
                            next_check: float | None, reason: str) -> None:
    verdict = decide(observation, NOW, PCFG)
    assert (verdict.status, verdict.action) == (status, action), verdict
    assert verdict.next_check == at(next_check), verdict
    assert verdict.reason.startswith(reason), verdict


@pytest.mark.parametrize(("observation", "detail"), [
    (pobs(started=-200, hb=-90), {"idle_since": at(-60)}),  # paused now
    (pobs(started=-200, hb=-100, paused=True), {"idle_since": at(-70), "paused": True}),
    (pobs(started=-200, hb=-100, paused=True, due=1), {"idle_since": at(-70)}),  # resumed
])
def test_paused_tier_verdicts_keep_the_idle_spell(observation: Observation,
                                                  detail: dict) -> None:
    """The worker remembers ``idle_since`` from the detail: a pause or a resume must
    not restart the idle spell (the stop would move), and "paused" marks the state."""
    assert decide(observation, NOW, PCFG).detail == detail


@pytest.mark.parametrize(("pause_after", "stop_after", "due", "expected"), [
    (60.0, 300.0, 0, 60),
    (0.5, 300.0, 0, 0.5),  # under a second is still on (0 = off)
    (0.0, 300.0, 0, None),
    (60.0, 300.0, 1, None),  # work due: no pause
    (300.0, 300.0, 0, None),  # at the stop exactly: the stop comes first
    (400.0, 300.0, 0, None),  # after the stop
])
def test_pause_deadline(pause_after: float, stop_after: float, due: int,
                        expected: float | None) -> None:
    cfg = LifecycleConfig(pause_idle_after=pause_after, stop_idle_after=stop_after)
    assert pause_deadline(NOW, at(stop_after), due, cfg) == at(expected)


def test_no_pause_when_the_stop_comes_first() -> None:
    cfg = LifecycleConfig(pause_idle_after=300.0, stop_idle_after=300.0)
    verdict = decide(obs(started=-200, hb=-100), NOW, cfg)
    assert (verdict.action, verdict.next_check) == (Action.NONE, at(230))


# --- [lifecycle] max_run: the lifetime of one run ------------------------------------------

LIFE = LifecycleConfig(max_run=3600, max_run_grace=300)

# status, action, next_check (relative s or None), reason (substring)
MAX_RUN_CASES = [
    ("off (0): an old busy agent runs on", LifecycleConfig(),
     obs(started=-100_000, hb=-1, claims=(("m", -5),)), "running", Action.NONE, 1799, "active"),
    ("before max_run: next check at max_run", LIFE, obs(started=-100, hb=-1),
     "running", Action.NONE, 29, "active"),
    ("before max_run, idle: next check is max_run if that comes before the stop", LIFE,
     obs(started=-3500, hb=-40), "idle", Action.NONE, 100, "no heartbeat"),
    ("a hair before max_run, idle: not yet", LIFE, obs(started=-3599.999, hb=-40),
     "idle", Action.NONE, 0.001, "no heartbeat"),
    ("exactly at max_run and idle: stopped politely", LIFE, obs(started=-3600, hb=-40),
     "idle", Action.STOP, None, "max_run: ran 3600s (max_run 3600s)"),
    ("at max_run, recently active but holding nothing: stopped (an idle moment)", LIFE,
     obs(started=-3600, hb=-1, reply=-1), "running", Action.STOP, None, "max_run: ran 3600s"),
    ("past max_run with a claim: runs on, next check at the grace's end", LIFE,
     obs(started=-3700, hb=-1, claims=(("m", -5),)), "running", Action.NONE, 200, "active"),
    ("past max_run with a running tool: runs on", LIFE,
     obs(started=-3700, hb=-1, tool_running=True), "running", Action.NONE, 200, "active"),
    ("past max_run with an answer owed: runs on until the answer or the grace", LIFE,
     obs(started=-3700, hb=-1, answer=60), "running", Action.NONE, 60, "active"),
    ("past max_run with work due: runs on (it is about to claim it)", LIFE,
     obs(started=-3700, hb=-400, due=1), "idle", Action.NONE, 200, "no heartbeat"),
    ("a hair before the grace's end, busy: not yet", LIFE,
     obs(started=-3899.999, hb=-1, claims=(("m", -5),)), "running", Action.NONE, 0.001, "active"),
    ("exactly at max_run + grace, busy: killed", LIFE,
     obs(started=-3900, hb=-1, claims=(("m", -5),)), "running", Action.KILL, None,
     "max_run: ran 3900s (max_run 3600s) and was not idle within max_run_grace (300s)"),
    ("past the grace, idle: a polite stop is not enough any more, killed", LIFE,
     obs(started=-5000, hb=-40), "running", Action.KILL, None, "max_run: ran 5000s"),
    ("stuck past max_run: the stuck reason is kept", LIFE,
     obs(started=-5000, hb=-1900, claims=(("m", -1950),)), "running", Action.KILL, None,
     "heartbeat 1900s old"),
    ("past max_run and over its idle stop: the lifetime is the reason", LIFE,
     obs(started=-3800, hb=-400), "idle", Action.STOP, None, "max_run: ran 3800s"),
    ("zero grace: killed at max_run if busy", LifecycleConfig(max_run=60, max_run_grace=0),
     obs(started=-60, hb=-1, claims=(("m", -5),)), "running", Action.KILL, None, "max_run"),
    ("no agent: no lifetime", LIFE, obs(False, started=-5000), "stopped", Action.NONE, None,
     "no agent"),
    ("start unknown: no lifetime", LIFE, obs(hb=-1), "running", Action.NONE, 29, "active"),
]


@pytest.mark.parametrize(("case", "cfg", "observation", "status", "action", "next_check",
                          "reason"), MAX_RUN_CASES, ids=[c[0] for c in MAX_RUN_CASES])
def test_max_run(case: str, cfg: LifecycleConfig, observation: Observation, status: str,
                 action: Action, next_check: float | None, reason: str) -> None:
    verdict = decide(observation, NOW, cfg)
    assert (verdict.status, verdict.action) == (status, action), verdict
    assert verdict.next_check == at(next_check), verdict
    assert reason in verdict.reason, verdict


def test_max_run_stops_a_paused_agent() -> None:
    """A frozen agent past its lifetime holds nothing: stopped, not thawed first."""
    o = replace(obs(started=-3700, hb=-400, idle_since=-370), paused=True)
    verdict = decide(o, NOW, LIFE)
    assert (verdict.action, verdict.reason) == (Action.STOP, "max_run: ran 3700s (max_run 3600s)")
