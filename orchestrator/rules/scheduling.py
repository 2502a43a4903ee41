"""Scheduled and recurring messages: when a message is due, and what comes next.

Pure functions (values in, verdict out), table-tested under a fake clock:

- ``parse_at``: ``send --at`` text (ISO 8601, or relative ``+10m``) → a UTC time;
- ``check_cron`` / ``next_run``: cron expressions (5 fields, or 6 with seconds
  first), evaluated in ``[sessions] timezone`` with ``cronsim``;
- ``format_due``: ``process_after`` as ``YYYY-MM-DD HH:MM:SS`` UTC — the shape of
  SQLite's ``datetime('now')``, which agents (NanoClaw's too) compare as text —
  rounded *up* to the whole second, so nothing is ever processed early;
- ``successor``: the next occurrence of a recurring row once it is completed.

Why cronsim and not croniter: cronsim has no dependencies, is typed, follows
Debian cron exactly (including its day-of-month/day-of-week OR rule and its DST
behaviour for time-zone-aware schedules) and is maintained as the scheduler of
Healthchecks.io; croniter pulls in python-dateutil and was declared unmaintained
in 2024 before a new home took it over. Both accept the optional seconds field.

Exactly once: a completed recurring row gets ONE successor, in the same
inbound.db transaction that records it completed (``store.inbound.settle``
calls ``successor`` inside its transaction, and only for rows whose status that
transaction changes). The successor's id is derived from its predecessor's id,
and inserted with ``INSERT OR IGNORE``: even a replay of the same completion
cannot add a second one. Missed runs collapse: the next time is the first cron
time after *now* (or after the row's own due time if that is later), so an
orchestrator that was down for three periods runs the series once, not three times.
"""

from __future__ import annotations

import hashlib
import re
import uuid
import zoneinfo
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from cronsim import CronSim, CronSimError

from orchestrator.contract.schema import DUE_FORMAT, ceil_second, format_due, parse_ts  # noqa: F401 (re-exported: one implementation)
from orchestrator.rules.messages import NewMessage
from orchestrator.support.errors import UserError

UTC = timezone.utc
_RELATIVE = re.compile(r"^\+(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class ScheduleError(UserError, ValueError):
    """A ``--at`` time or ``--every`` expression refused; one line naming the fix."""


def tz(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def new_series_id() -> str:
    return f"ser-{uuid.uuid4().hex[:16]}"


def parse_at(text: str, now: datetime, zone: str = "UTC") -> datetime:
    """``--at`` → an aware UTC time, strictly in the future.

    ``+10m``, ``+90s``, ``+1h30m``, ``+2d``: relative to ``now``. Otherwise ISO 8601
    (``2026-12-24T18:00``, ``2026-12-24 18:00:00+01:00``, ``…Z``); without an
    offset it is a wall-clock time in ``zone`` (``[sessions] timezone``).
    """
    raw = text.strip()
    if raw.startswith("+"):
        m = _RELATIVE.fullmatch(raw)
        if not m or not any(m.groups()):
            raise ScheduleError(f"--at {text!r}: use +N followed by d, h, m and/or s "
                                "(e.g. +10m, +1h30m) or an ISO 8601 time")
        d, h, mi, s = (int(g or 0) for g in m.groups())
        when = now + timedelta(days=d, hours=h, minutes=mi, seconds=s)
    else:
        try:
            when = datetime.fromisoformat(raw.replace("z", "Z"))
        except ValueError:
            raise ScheduleError(f"--at {text!r}: not an ISO 8601 time (e.g. "
                                "2026-12-24T18:00:00Z) nor a relative +10m") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=tz(zone))
    when = when.astimezone(UTC)
    if when <= now:
        raise ScheduleError(f"--at {text!r}: {format_due(when)} UTC is not in the future "
                            f"(now {format_due(now)} UTC)")
    return when


def check_cron(expr: str) -> str:
    """The expression if cronsim accepts it, else ScheduleError (one line)."""
    if not isinstance(expr, str) or len(expr.split()) not in (5, 6):
        raise ScheduleError(f"--every {expr!r}: a cron expression has 5 fields (minute hour "
                            "day month weekday) or 6 (seconds first), e.g. '0 9 * * MON-FRI'")
    try:
        next(CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC)))
    except CronSimError as exc:
        raise ScheduleError(f"--every {expr!r}: {exc} field") from None
    except StopIteration:
        raise ScheduleError(f"--every {expr!r}: never matches a date") from None
    return " ".join(expr.split())


def next_run(expr: str, after: datetime, zone: str = "UTC") -> datetime:
    """The first time strictly after ``after`` that ``expr`` matches, in ``zone``
    wall-clock time; returned as aware UTC."""
    local = after.astimezone(tz(zone))
    try:
        return next(CronSim(expr, local)).astimezone(UTC)
    except (CronSimError, StopIteration) as exc:
        raise ScheduleError(
            f"recurrence {expr!r}: no next run ({exc or 'never matches'})") from exc


def first_run(expr: str, now: datetime, at: datetime | None, zone: str = "UTC") -> datetime:
    """A new series' first occurrence: ``--at`` if given, else the next cron time."""
    return at if at is not None else next_run(expr, now, zone)


def successor_id(series_id: str, previous_id: str) -> str:
    """Deterministic: one predecessor has exactly one possible successor id."""
    digest = hashlib.sha256(f"{series_id}\x00{previous_id}".encode()).hexdigest()[:16]
    return f"{series_id}-{digest}"


def next_due(expr: str, row_due: str | None, now: datetime, zone: str = "UTC") -> datetime:
    """When the occurrence after a completed one is due: the first cron time after
    ``now`` — missed runs collapse into one — or after the row's own due time if
    that lies later (a retried row whose backoff pushed it past ``now``)."""
    try:
        due = parse_ts(row_due)
    except ValueError:
        due = None
    base = max(now, due) if due is not None else now
    return next_run(expr, base, zone)


def successor(row: Mapping[str, Any], now: datetime, zone: str = "UTC") -> NewMessage | None:
    """The row that continues ``row``'s series, or None (not recurring, or the
    expression no longer parses). Copies content and routing; a fresh row is
    pending with no tries."""
    expr, series = row.get("recurrence"), row.get("series_id")
    if not expr or not series:
        return None
    try:
        when = next_due(expr, row.get("process_after"), now, zone)
    except ScheduleError:
        return None
    return NewMessage(
        id=successor_id(series, row["id"]), kind=row["kind"], content=row["content"],
        process_after=format_due(when), trigger=row.get("trigger", 1),
        platform_id=row.get("platform_id"), channel_type=row.get("channel_type"),
        thread_id=row.get("thread_id"), series_id=series, recurrence=expr,
        source_session_id=row.get("source_session_id"), on_wake=row.get("on_wake") or 0)

