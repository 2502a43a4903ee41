"""Recurring series: create (``send --every``), list and cancel them.

A series is a chain of ``messages_in`` rows sharing a ``series_id`` and a
``recurrence`` (cron expression); the supervisor writes each next occurrence
when one is settled (``scheduling.successor``). The registry's ``series``
table indexes them (which session, which expression, cancelled or not), so
``series list`` need not open every inbound.db; each session's inbound.db
stays the source of truth for what is pending.

These functions are the edge the CLI (and an HTTP API) calls; each runs in any
process, whether or not ``run`` is running (inbound.db writes are short
``BEGIN IMMEDIATE`` transactions, so they serialise with the supervisor's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.contract import schema
from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB
from orchestrator.host import inbound, outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import Refused, SessionDir
from orchestrator.host.status import one_line, table_lines
from orchestrator.support.errors import UserError


class SeriesError(UserError, ValueError):
    """Unknown series and the like: one line, CLI exit code 2."""


@dataclass(frozen=True, slots=True)
class SeriesRow:
    series_id: str
    agent_group: str
    session_id: str
    recurrence: str
    timezone: str
    state: str  # active | cancelled | ended
    next_run: str | None  # process_after of the pending occurrence (UTC)
    completed: int
    failed: int
    error: str | None = None


def collect(data_dir: Path, registry: Registry, group: str | None = None) -> list[SeriesRow]:
    rows = []
    for s in registry.series():
        if group is not None and s["agent_group_id"] != group:
            continue
        state: dict[str, Any] = {"counts": {}, "next": None, "recurring": False}
        error = None
        try:  # the agent's folder: reached as the supervisor does (see status.read_session)
            with SessionDir(data_dir, s["agent_group_id"], s["session_id"]) as folder:
                if folder.lstat(INBOUND_DB) is None:
                    raise FileNotFoundError(f"{folder.where}/{INBOUND_DB} is missing")
                state = inbound.series_state(folder.reader(INBOUND_DB), s["id"])
        except Exception as exc:  # noqa: BLE001 - one bad session must not hide the others
            error = one_line(exc)
        if s["cancelled_at"]:
            label = "cancelled"
        else:
            label = "active" if state["recurring"] or error else "ended"
        counts = state["counts"]
        rows.append(SeriesRow(s["id"], s["agent_group_id"], s["session_id"], s["recurrence"],
                              s["timezone"], label, state["next"], counts.get("completed", 0),
                              counts.get("failed", 0), error))
    return rows


def cancel(data_dir: Path, registry: Registry, series_id: str,
           now: datetime | None = None) -> tuple[int, int]:
    """Stop a series: nothing recurs any more and its waiting occurrence is removed.

    An occurrence an agent has already claimed finishes, and nothing follows it.
    Returns (rows that recurred, pending occurrences removed).
    """
    found = registry.series(series_id)
    if not found:
        raise SeriesError(f"no series {series_id!r}; see: orchestrator series list")
    s = found[0]
    try:
        with SessionDir(data_dir, s["agent_group_id"], s["session_id"]) as folder:
            try:
                claimed = outbound.processing_ids(folder.reader(OUTBOUND_DB))
            except Refused:  # not a file an agent can claim anything in
                claimed = []
            # inbound.db first: once no row recurs, no completion can add an occurrence
            result = inbound.cancel_series(
                folder.db(INBOUND_DB, busy_ms=schema.BUSY_TIMEOUT_MS), series_id, keep=claimed)
    except Refused as exc:
        raise SeriesError(f"series {series_id}: {one_line(exc)}") from None
    registry.cancel_series(series_id, now)
    return result


COLUMNS = [("SERIES", "series_id"), ("GROUP", "agent_group"), ("SESSION", "session_id"),
           ("EVERY", "recurrence"), ("TZ", "timezone"), ("STATE", "state"),
           ("NEXT RUN (UTC)", "next_run"), ("DONE", "completed"), ("FAILED", "failed")]


def render_table(rows: list[SeriesRow]) -> str:
    if not rows:
        return "no series yet (start one with: orchestrator send --group G --every CRON TEXT)"
    lines = table_lines(rows, COLUMNS)
    lines += [f"! {r.series_id}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def as_dicts(rows: list[SeriesRow]) -> list[dict]:
    return [asdict(r) for r in rows]
