"""Agent-written values, clamped before any rule uses them: a table per kind."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.rules.agent_values import (
    EPOCH,
    MAX_NS,
    agent_time,
    claim_time,
    time_from_ns,
    timeout_seconds,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, 250_001, tzinfo=timezone.utc)
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
FAR_PAST = datetime(1, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize("value, previous, expected", [
    (None, None, None),  # absent stays absent
    (at(-5), None, at(-5)),  # a plain past time as written
    (NOW, None, NOW),
    (at(0.001), None, NOW),  # the future is now ...
    (FAR_FUTURE, None, NOW),
    (FAR_FUTURE, at(-30), at(-30)),  # ... or when it was first read in the future: it ages
    (at(5), at(-30), at(-30)),
    (FAR_FUTURE, at(30), NOW),  # a "previous" that is itself ahead is no anchor
    (at(-5), at(-30), at(-5)),  # a real new time replaces the remembered one
    (FAR_PAST, None, EPOCH),  # the far past is just old
    (datetime(1969, 12, 31, tzinfo=timezone.utc), None, EPOCH),
    (datetime(2026, 3, 1, 11, 0), None, datetime(2026, 3, 1, 11, 0, tzinfo=timezone.utc)),
    (NOW, at(-30), NOW),  # boundary: exactly now is not the future, previous is not used
], ids=["none", "past", "now", "just ahead", "year 9999", "year 9999 seen before",
        "ahead seen before", "previous ahead", "past replaces previous", "year 1",
        "before 1970", "naive is utc", "exactly now"])
def test_agent_time(value, previous, expected) -> None:
    assert agent_time(value, NOW, previous) == expected


@pytest.mark.parametrize("value, previous, expected", [
    (None, None, NOW),  # NULL or unparsable: from when it was first read
    (None, at(-30), at(-30)),
    (FAR_FUTURE, None, NOW),
    (FAR_FUTURE, at(-30), at(-30)),
    (at(-5), None, at(-5)),
    (FAR_PAST, None, EPOCH),
])
def test_claim_time_is_never_absent(value, previous, expected) -> None:
    assert claim_time(value, NOW, previous) == expected


@pytest.mark.parametrize("ns, expected", [
    (0, EPOCH),
    (1_500_000_000_123_456_789, datetime(2017, 7, 14, 2, 40, 0, 123456, tzinfo=timezone.utc)),
    (-1, EPOCH),
    (-(1 << 63), EPOCH),
    ((1 << 63) - 1, EPOCH + timedelta(microseconds=MAX_NS // 1000)),  # int64's end: no raise
    (1 << 80, EPOCH + timedelta(microseconds=MAX_NS // 1000)),
])
def test_time_from_ns(ns, expected) -> None:
    assert time_from_ns(ns) == expected


@pytest.mark.parametrize("value, expected", [
    (None, None),
    (30.0, 30.0),
    (30, 30.0),
    (1, 1.0),  # boundary: the smallest whole second is a timeout, not "none declared"
    (0.5, 0.5),
    (86400.0, 86400.0),
    (86400.5, 86400.0),
    ((2**63 - 1) / 1000.0, 86400.0),  # the 2^63-1 ms
    (2**63 - 1, 86400.0),
    (1e300, 86400.0),
    (math.inf, 86400.0),
    (-math.inf, None),
    (math.nan, None),
    (0, None),
    (0.0, None),
    (-5.0, None),
    ("600", None),  # text is not a number
    (b"600", None),
    (True, None),
], ids=lambda v: repr(v))
def test_timeout_seconds(value, expected) -> None:
    got = timeout_seconds(value, 86400.0)
    assert got == expected and (got is None or isinstance(got, float))
