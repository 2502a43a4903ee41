"""Agent-written numbers and times, made safe before any rule sees them.

Everything in a session folder is the agent's: the ``.heartbeat`` mtime, the claim and
ack stamps (``processing_ack.status_changed``), reply ``timestamp``s and the declared
tool timeout (``container_state.tool_declared_timeout_ms``). A hostile or broken agent
can write anything there — a timeout of 2^63-1 ms or 1e300, NaN, a claim stamped
9999-12-31, a heartbeat in the 25th century — and the rules do arithmetic on them. So
each kind passes one pure function here on its way in (the session worker applies
them where it records the evidence), and afterwards:

- no value can raise in a pass (``timedelta`` of 1e300 s, a datetime past year 9999:
  OverflowError; NaN seconds: ValueError);
- no value switches a rule off: a time is never later than when the host read it, so
  a future heartbeat or claim ages like any other and the stuck rules still fire; a
  declared tool timeout widens the stuck windows by at most ``max_tool_timeout``.

The rules (table-tested in tests/rules/test_agent_values.py):

- a time (``agent_time``): absent stays absent; before 1970 reads as 1970 (the far
  past is just "old"); later than now reads as the time it was first seen in the
  future (``previous``), else as now — so it counts from when the host saw it and
  then ages, rather than being "fresh" on every read;
- a claim's stamp (``claim_time``): as a time, but never absent: a claim stamped
  NULL or with text that is no time dates from when the host first read it (so the
  claim rule still applies to it);
- a file time in nanoseconds (``time_from_ns``): the same, from any int;
- a declared timeout (``timeout_seconds``, in seconds as read): not a number, NaN,
  zero or negative → absent (no tool timeout declared); above the ceiling (inf and
  2^63-1 ms included) → the ceiling, ``[lifecycle] max_tool_timeout``.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# a file time past this is taken as "far future" (year ~2116); int64 ns ends in 2262
MAX_NS = 1 << 62


def agent_time(value: datetime | None, now: datetime,
               previous: datetime | None = None) -> datetime | None:
    """A time the agent wrote, within [1970, now].

    ``previous``: what the same record (the same heartbeat file signature, the same
    claim) read as last time. A stamp still in the future keeps that value, so it
    ages from the first read instead of being "now" on every read.
    """
    if value is None:
        return None
    if value.tzinfo is None:  # the contract's stamps are UTC (schema.parse_ts)
        value = value.replace(tzinfo=timezone.utc)
    if value > now:
        return previous if previous is not None and previous <= now else now
    return value if value >= EPOCH else EPOCH


def claim_time(value: datetime | None, now: datetime,
               previous: datetime | None = None) -> datetime:
    """A claim's stamp as ``agent_time``; none or an unparsable one (``value`` None)
    reads as when the claim was first read (``previous``, else now)."""
    return agent_time(value, now, previous) or agent_time(previous, now) or now


def time_from_ns(ns: int) -> datetime:
    """A file's mtime (``st_mtime_ns``) as an aware UTC datetime, for any int: never
    raises (``datetime.fromtimestamp`` does for years past 9999 or before 1)."""
    ns = min(max(ns, 0), MAX_NS)
    return EPOCH + timedelta(microseconds=ns // 1000)


def timeout_seconds(seconds: object, ceiling: float) -> float | None:
    """A declared tool timeout in (0, ceiling] seconds; None when it is no usable
    number (text, NaN, zero, negative): no timeout declared."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    if isinstance(seconds, float) and math.isnan(seconds):
        return None
    if seconds <= 0:
        return None
    return float(min(seconds, ceiling))  # an int is compared exactly, never converted first
