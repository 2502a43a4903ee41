"""The per-reply delivery rules, as tables: facts in, verdict out, no files, no clock."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.config.sections import DeliveryConfig
from orchestrator.rules.delivery_plan import (
    Plan,
    ReplyFacts,
    Step,
    Trouble,
    after_failure,
    deliverable_since,
    files_recheck,
    plan,
    retry_delay,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
CFG = DeliveryConfig(max_attempts=3, retry_base=2.0, files_wait=10.0)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize("facts, expected", [
    (ReplyFacts(), Plan(Step.TRY)),
    (ReplyFacts(settled=True), Plan(Step.SKIP, "already recorded in delivered")),
    # settled wins over everything, even a defect (a reply is settled once)
    (ReplyFacts(settled=True, problem="content is not valid UTF-8"),
     Plan(Step.SKIP, "already recorded in delivered")),
    (ReplyFacts(problem="content is not valid UTF-8"),
     Plan(Step.FAIL, "content is not valid UTF-8")),
    # a defect fails even a reply scheduled for later, or backing off: it never improves
    (ReplyFacts(problem="too big", deliver_after=at(60)), Plan(Step.FAIL, "too big")),
    (ReplyFacts(problem="too big", attempts=1, retry_at=at(5)), Plan(Step.FAIL, "too big")),
    (ReplyFacts(deliver_after=at(30)), Plan(Step.WAIT, "deliver_after is in the future", at(30))),
    (ReplyFacts(deliver_after=NOW), Plan(Step.TRY)),
    (ReplyFacts(deliver_after=at(-1)), Plan(Step.TRY)),
    (ReplyFacts(attempts=2, retry_at=at(4)),
     Plan(Step.WAIT, "backing off after 2 failed attempt(s)", at(4))),
    (ReplyFacts(attempts=2, retry_at=NOW), Plan(Step.TRY)),
    # deliver_after is looked at before the backoff
    (ReplyFacts(deliver_after=at(30), attempts=1, retry_at=at(4)),
     Plan(Step.WAIT, "deliver_after is in the future", at(30))),
], ids=["new", "settled", "settled-beats-defect", "defect", "defect-beats-later",
        "defect-beats-backoff", "later", "due-now", "overdue", "backing-off", "backoff-over",
        "later-before-backoff"])
def test_plan(facts: ReplyFacts, expected: Plan) -> None:
    assert plan(facts, NOW) == expected


@pytest.mark.parametrize("trouble, attempts, waiting_since, expected", [
    # permanent: failed at once, whatever the count — never retried
    (Trouble.PERMANENT, 0, None, Plan(Step.FAIL, "x")),
    (Trouble.PERMANENT, 2, None, Plan(Step.FAIL, "x")),
    # transient: back off base * 2^(n-1), then fail at max_attempts
    (Trouble.TRANSIENT, 0, None, Plan(Step.RETRY, "x", at(2))),
    (Trouble.TRANSIENT, 1, None, Plan(Step.RETRY, "x", at(4))),
    (Trouble.TRANSIENT, 2, None, Plan(Step.FAIL, "giving up after 3 attempts: x")),
    # files not there yet: wait (no attempt) until files_wait after first seen waiting
    # … looked at again soon, then at most once a second (no outbox/<id>/ events)
    (Trouble.FILES_NOT_READY, 0, None, Plan(Step.WAIT, "x", at(0.05))),
    (Trouble.FILES_NOT_READY, 0, at(-0.4), Plan(Step.WAIT, "x", at(0.1))),
    (Trouble.FILES_NOT_READY, 0, at(-4), Plan(Step.WAIT, "x", at(1))),
    (Trouble.FILES_NOT_READY, 0, at(-9.5), Plan(Step.WAIT, "x", at(0.5))),
    # the 1 s cap with the give-up time far off: waited 8 s of 20, still once a second
    (Trouble.FILES_NOT_READY, 0, at(-8), Plan(Step.WAIT, "x", at(1))),
    # boundary: the give-up time is exactly now: no more free looks, an attempt counts
    (Trouble.FILES_NOT_READY, 0, at(-10), Plan(Step.RETRY, "x", at(2))),
    (Trouble.FILES_NOT_READY, 2, at(-60), Plan(Step.FAIL, "giving up after 3 attempts: x")),
], ids=["permanent", "permanent-after-attempts", "transient-1", "transient-2",
        "transient-last", "files-first-seen", "files-soon", "files-waiting",
        "files-wait-ends-first", "files-capped-at-1s",
        "files-wait-over",
        "files-last-attempt"])
def test_after_failure(trouble: Trouble, attempts: int, waiting_since: datetime | None,
                       expected: Plan) -> None:
    cfg = CFG if waiting_since != at(-8) else DeliveryConfig(max_attempts=3, retry_base=2.0,
                                                               files_wait=20.0)
    assert after_failure(trouble, "x", attempts, waiting_since, NOW, cfg) == expected


@pytest.mark.parametrize("waited, recheck", [
    (0.0, 0.05), (0.2, 0.05), (0.4, 0.1), (2.0, 0.5), (4.0, 1.0), (8.0, 1.0), (3600.0, 1.0),
])
def test_files_recheck_is_soon_at_first_then_at_most_once_a_second(waited, recheck) -> None:
    assert files_recheck(waited) == pytest.approx(recheck)


def test_a_short_backoff_without_retry_after_is_not_lengthened() -> None:
    cfg = DeliveryConfig(retry_base=0.25, max_attempts=5)
    result = after_failure(Trouble.TRANSIENT, "x", 0, None, NOW, cfg)
    assert result == Plan(Step.RETRY, "x", NOW + timedelta(seconds=0.25))


def test_retry_after_lengthens_the_backoff_never_shortens_it() -> None:
    """HTTP Retry-After (the webhook channel): the next try is never sooner than asked."""
    cfg = DeliveryConfig(retry_base=2.0, max_attempts=5)
    longer = after_failure(Trouble.TRANSIENT, "429", 0, None, NOW, cfg, retry_after=30.0)
    assert longer.step is Step.RETRY and longer.at == NOW + timedelta(seconds=30)
    shorter = after_failure(Trouble.TRANSIENT, "429", 0, None, NOW, cfg, retry_after=0.5)
    assert shorter.at == NOW + timedelta(seconds=2)
    last = after_failure(Trouble.TRANSIENT, "429", 4, None, NOW, cfg, retry_after=30.0)
    assert last.step is Step.FAIL


@pytest.mark.parametrize("attempts, rand, delay", [
    (1, 1.0, 2.0), (2, 1.0, 4.0), (3, 1.0, 8.0), (11, 1.0, 2048.0),
    (13, 1.0, 3600.0),  # capped at retry_max_delay
    (1000, 1.0, 3600.0),  # no overflow
    (3, 0.5, 4.0), (3, 0.0, 2.0),  # full jitter, never under the base
    (13, 0.25, 900.0),
])
def test_retry_delay_is_exponential_with_full_jitter(attempts: int, rand: float,
                                                     delay: float) -> None:
    assert retry_delay(attempts, 2.0, 3600.0, rand) == delay


def test_retry_delay_exponent_stops_at_64_without_a_cap() -> None:
    """No OverflowError (2.0 ** 1025 raises) whatever the attempt count; 2^64 is the end."""
    assert retry_delay(10_000, 1.0, math.inf, 1.0) == 2.0 ** 64


HORIZON = DeliveryConfig(retry_base=2.0, max_attempts=1000, retry_horizon=3600.0,
                         retry_max_delay=600.0)


@pytest.mark.parametrize("since, attempts, retry_after, expected", [
    (at(0), 0, None, Plan(Step.RETRY, "x", at(2))),
    (at(-3590), 20, None, Plan(Step.RETRY, "x", at(10))),  # cut short: the last try at the end
    (at(-3600), 20, None,
     Plan(Step.FAIL, "giving up after 21 attempts over [delivery] retry_horizon (3600s): x")),
    (at(-7200), 0, None,
     Plan(Step.FAIL, "giving up after 1 attempts over [delivery] retry_horizon (3600s): x")),
    (at(600), 0, None, Plan(Step.RETRY, "x", at(2))),  # a stamp in the future counts as now
    (at(-3590), 0, 30.0, Plan(Step.RETRY, "x", at(30))),  # the receiver asked: honoured
    (at(0), 0, 99999.0, Plan(Step.RETRY, "x", at(600))),  # ... up to retry_max_delay
], ids=["first", "cut-at-horizon", "horizon-over", "long-over", "future-stamp",
        "retry-after-past-horizon", "retry-after-capped"])
def test_retries_end_at_the_horizon(since, attempts, retry_after, expected) -> None:
    assert after_failure(Trouble.TRANSIENT, "x", attempts, None, NOW, HORIZON,
                         retry_after=retry_after, since=since) == expected


def test_the_defaults_retry_for_a_day() -> None:
    """With the defaults a receiver may be down for 24 h: attempts (at the top of the
    jitter, the fewest) keep coming until the horizon, and max_attempts is not what ends
    them."""
    cfg = DeliveryConfig()
    now, attempts, since = NOW, 0, NOW
    while True:
        verdict = after_failure(Trouble.TRANSIENT, "down", attempts, None, now, cfg,
                                since=since)
        if verdict.step is Step.FAIL:
            break
        attempts += 1
        assert verdict.at is not None
        now = verdict.at
    assert "retry_horizon" in verdict.reason
    assert now - since >= timedelta(hours=24) and attempts < cfg.max_attempts


@pytest.mark.parametrize("timestamp, deliver_after, since", [
    ("2025-03-01 12:00:00.000", None, at(0)),
    ("2025-03-01 12:00:00.000", at(60), at(60)),  # due later: counted from then
    ("2025-03-01 12:00:00.000", at(-60), at(0)),
    ("not a time", at(5), at(5)), ("not a time", None, None), (None, None, None),
])
def test_deliverable_since(timestamp, deliver_after, since) -> None:
    assert deliverable_since(timestamp, deliver_after) == since
