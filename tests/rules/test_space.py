"""rules.space: the quota and the reserve, as tables."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from orchestrator.config.sections import LifecycleConfig
from orchestrator.rules.lifecycle import Action, Observation, judge
from orchestrator.rules.space import Disk, Step, biggest, disk_verdict, over_quota

M = 1 << 20


@pytest.mark.parametrize("used, limit, over", [
    (0, 0, False), (10 * M, 0, False),  # 0 = no quota
    (M, M, False), (M + 1, M, True), (0, M, False), (2, 1, True), (1, 1, False),
])
def test_over_quota(used: int, limit: int, over: bool) -> None:
    reason = over_quota(used, limit)
    assert (reason is not None) == over
    if over:
        assert reason == f"session over its space quota: {used} bytes > {limit}"


@pytest.mark.parametrize("free, held, ever, min_free, step, low", [
    (0, 0, False, 0, Step.NONE, False),  # no reserve configured
    (100 * M, 0, False, 10 * M, Step.TAKE, False),  # room: take it
    (15 * M, 0, False, 10 * M, Step.NONE, False),  # never had room: nothing to defend
    (20 * M, 0, False, 10 * M, Step.TAKE, False),  # reserve and as much again
    (50 * M, 10 * M, True, 10 * M, Step.NONE, False),  # held, plenty free
    (10 * M, 10 * M, True, 10 * M, Step.NONE, False),  # held, exactly min_free free
    (10 * M - 1, 10 * M, True, 10 * M, Step.RELEASE, True),  # an agent ate into it
    (0, 10 * M, True, 10 * M, Step.RELEASE, True),  # disk full up to the reserve
    (12 * M, 0, True, 10 * M, Step.NONE, True),  # released, not yet back: still low
    (20 * M, 0, True, 10 * M, Step.TAKE, False),  # space back: take it again
    (0, 1, True, 1, Step.RELEASE, True),  # boundary: a one-byte reserve is a reserve
])
def test_disk_verdict(free: int, held: int, ever: bool, min_free: int, step: Step,
                      low: bool) -> None:
    v = disk_verdict(Disk(free, held, ever), min_free)
    assert (v.step, v.low) == (step, low)


def test_biggest() -> None:
    assert biggest({}) is None
    assert biggest({"a": 1, "b": 3, "c": 2}) == "b"
    assert biggest({"b": 3, "a": 3}) == "a"  # ties: the first id


NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_a_live_agent_over_its_space_is_killed_with_the_reason() -> None:
    obs = Observation(alive=True, started_at=NOW, heartbeat_at=NOW,
                      over_space="session over its space quota: 2 bytes > 1")
    v = judge(obs, NOW, LifecycleConfig())
    assert v.action is Action.KILL and v.reason == obs.over_space


def test_a_stopped_agent_over_its_space_is_started_then_refused_until_max_tries() -> None:
    """The start itself is refused (``SpaceWatch.refusal``); each refusal is a start
    failure of its own, so the rule fails the due work at max_tries."""
    cfg = LifecycleConfig()
    obs = Observation(alive=False, due=1, over_space="over")
    assert judge(obs, NOW, cfg).action is Action.START
    done = Observation(alive=False, due=1, over_space="over", start_failures=cfg.max_tries)
    assert judge(done, NOW, cfg).action is Action.FAIL_DUE
