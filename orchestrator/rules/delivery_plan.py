"""What to do with one reply, as pure functions of (facts, now, config).

``plan`` says, before an attempt, whether a reply is skipped, waits until a
time, is tried, or fails for good; ``after_failure`` says what a failed attempt
leads to. ``delivery.Deliverer`` gathers the facts (inbound.db, the registry,
the row) and applies the verdict; nothing here reads a file or a clock, so
every rule is table-tested (tests/rules/test_delivery_plan.py).

The rules that keep one bad reply from holding up the others: a defect of the
row itself (not UTF-8, too big, an id that cannot name a folder) or of its
files (a traversal name, a symlink, a FIFO, an unreadable ``outbox/<id>/``) is
permanent and fails the reply at once with its reason; only a failure that
may pass by itself (the channel is down, a file is not there yet) is retried
with jittered exponential backoff for ``[delivery] retry_horizon`` (at most
``max_attempts`` times).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from orchestrator.config.sections import DeliveryConfig
from orchestrator.contract.schema import parse_ts


class Step(enum.Enum):
    SKIP = "skip"  # already settled in inbound.db
    WAIT = "wait"  # not now: look again at ``at`` (no attempt spent)
    TRY = "try"  # hand it to the channel now
    RETRY = "retry"  # an attempt failed: count it, try again at ``at``
    FAIL = "fail"  # record it failed, tell the channel, never try again


class Trouble(enum.Enum):
    """How a failed attempt failed."""

    TRANSIENT = "transient"  # may pass by itself: back off and retry
    FILES_NOT_READY = "files not ready"  # a listed file is not in outbox/ yet
    PERMANENT = "permanent"  # can never succeed: fail at once


@dataclass(frozen=True, slots=True)
class ReplyFacts:
    settled: bool = False  # a ``delivered`` row exists (delivered or failed)
    problem: str | None = None  # a defect of the row itself, found while reading it
    deliver_after: datetime | None = None
    attempts: int = 0  # failed attempts so far (registry)
    retry_at: datetime | None = None  # backoff after the last failed attempt


@dataclass(frozen=True, slots=True)
class Plan:
    step: Step
    reason: str = ""
    at: datetime | None = None


def plan(facts: ReplyFacts, now: datetime) -> Plan:
    """Before an attempt. Order matters: settled beats everything (a reply is settled
    once), a defect fails even a reply scheduled for later (it will never improve)."""
    if facts.settled:
        return Plan(Step.SKIP, "already recorded in delivered")
    if facts.problem:
        return Plan(Step.FAIL, facts.problem)
    if facts.deliver_after is not None and facts.deliver_after > now:
        return Plan(Step.WAIT, "deliver_after is in the future", facts.deliver_after)
    if facts.retry_at is not None and facts.retry_at > now:
        return Plan(Step.WAIT, f"backing off after {facts.attempts} failed attempt(s)",
                    facts.retry_at)
    return Plan(Step.TRY)


def files_recheck(waited: float) -> float:
    """Seconds until a reply waiting for its files is looked at again: soon at first
    (an agent that writes the row a moment before its files), then less often, at
    most once a second (one stat per listed file each time)."""
    return min(1.0, max(0.05, waited / 4))


def deliverable_since(timestamp: str | None, deliver_after: datetime | None
                      ) -> datetime | None:
    """When a reply became deliverable: written (its row's ``timestamp``) or, if later,
    due (``deliver_after``); where ``[delivery] retry_horizon`` is counted from (a
    stamp in the future is clamped to now by ``after_failure``)."""
    try:
        written = parse_ts(timestamp)
    except ValueError:
        written = None
    if written is None or (deliver_after is not None and deliver_after > written):
        return deliver_after
    return written


def retry_delay(attempts: int, base: float, cap: float, rand: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: exponential with
    full jitter (``rand`` in [0, 1) picks a point of ``[0, base * 2^(attempts-1)]``), so
    many replies that failed together do not all come back at once; never under
    ``base`` (no hammering), never over ``cap``."""
    ceiling = min(cap, base * 2.0 ** min(max(0, attempts - 1), 64))
    return min(cap, max(base, rand * ceiling))


def after_failure(trouble: Trouble, reason: str, attempts: int,
                  files_waiting_since: datetime | None, now: datetime,
                  cfg: DeliveryConfig, retry_after: float | None = None,
                  since: datetime | None = None, rand: float = 1.0) -> Plan:
    """After a failed attempt (``attempts`` failed before this one).

    Files not there yet are not an attempt for ``files_wait`` seconds after the
    reply was first seen waiting (agents may commit the row first): the reply
    waits without backoff, looked at again after ``files_recheck`` (files written
    into ``outbox/<id>/`` raise no event: the host does not watch below ``outbox/``).
    ``retry_after``: the receiver asked to wait at least this long (HTTP Retry-After,
    honoured up to ``retry_max_delay``). ``since``: when the reply became deliverable;
    retries end ``retry_horizon`` after it (our own backoff is cut short to make one
    last attempt at the horizon), or after ``max_attempts``. ``rand``: the jitter.
    """
    if trouble is Trouble.PERMANENT:
        return Plan(Step.FAIL, reason)
    if trouble is Trouble.FILES_NOT_READY:
        since_files = files_waiting_since or now
        give_up_at = since_files + timedelta(seconds=cfg.files_wait)
        if give_up_at > now:
            recheck = now + timedelta(seconds=files_recheck((now - since_files)
                                                            .total_seconds()))
            return Plan(Step.WAIT, reason, min(give_up_at, recheck))
    attempts += 1
    if attempts >= cfg.max_attempts:
        return Plan(Step.FAIL, f"giving up after {attempts} attempts: {reason}")
    end = min(since or now, now) + timedelta(seconds=cfg.retry_horizon)
    if now >= end:
        return Plan(Step.FAIL, f"giving up after {attempts} attempts over "
                    f"[delivery] retry_horizon ({cfg.retry_horizon:g}s): {reason}")
    own = now + timedelta(seconds=retry_delay(attempts, cfg.retry_base,
                                              cfg.retry_max_delay, rand))
    asked = now + timedelta(seconds=min(retry_after or 0.0, cfg.retry_max_delay))
    return Plan(Step.RETRY, reason, max(min(own, end), asked))
