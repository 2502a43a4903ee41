"""The console's pure decisions, table-tested: the delay quantile from histogram
buckets, a history step between two reads, the last hour's totals, the sessions
list's filter, sort and paging, its query parameters, and agent runs from status
changes."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from orchestrator.api.checks import BadRequest
from orchestrator.api.console import (
    matches,
    page_cursor,
    page_params,
    row_key,
    runs,
    select,
    state_of,
)
from orchestrator.api.history import Raw, Sample, quantile, step, totals
from orchestrator.host.registry import SessionRow

INF = math.inf


@pytest.mark.parametrize("q, buckets, want", [
    (0.5, [], None),
    (0.5, [(1.0, 0), (INF, 0)], None),
    (0.5, [(1.0, 4), (INF, 4)], 0.5),  # all in the first bucket: linear from 0
    (0.5, [(0.1, 0), (1.0, 10), (INF, 10)], 0.55),
    (0.99, [(0.1, 50), (1.0, 100), (INF, 100)], 0.982),
    (0.99, [(0.1, 1), (1.0, 1), (INF, 10)], 1.0),  # in +Inf: the last finite bound
    (0.5, [(0.1, 2), (0.5, 2), (1.0, 4), (INF, 4)], 0.1),
])
def test_quantile_from_buckets(q, buckets, want) -> None:
    got = quantile(q, buckets)
    assert got == want if want is None else got == pytest.approx(want)


def raw(delivered=0.0, starts=0.0, start_sum=0.0, buckets=((0.1, 0.0), (INF, 0.0)),
        running=0, queued=None) -> Raw:
    return Raw(running, 0, queued, {"delivered": delivered, "failed": 0.0,
                                    "messages_failed": 0.0, "starts": starts,
                                    "start_sum": start_sum}, tuple(buckets))


@pytest.mark.parametrize("prev, now, want", [
    # the first read counts nothing (the totals before it are not "this step")
    (None, raw(delivered=5, starts=2, start_sum=1.0), dict(delivered=0, starts=0,
                                                          start_seconds=None)),
    (raw(delivered=5), raw(delivered=8), dict(delivered=3)),
    (raw(starts=2, start_sum=1.0), raw(starts=4, start_sum=2.0),
     dict(starts=2, start_seconds=0.5)),
    # a counter that went down (a new registry): never a negative count
    (raw(delivered=8), raw(delivered=2), dict(delivered=0)),
    (raw(buckets=((0.1, 1.0), (1.0, 1.0), (INF, 1.0))),
     raw(buckets=((0.1, 1.0), (1.0, 3.0), (INF, 3.0))), dict(delay_p50=0.55)),
    (raw(), raw(running=3, queued=2), dict(running=3, queued=2, delay_p50=None)),
])
def test_a_step_between_two_reads(prev, now, want) -> None:
    got = step(prev, now, 100.0)
    for key, value in want.items():
        assert getattr(got, key) == (pytest.approx(value) if isinstance(value, float)
                                     else value), key


def sample(t: float, delivered: int) -> Sample:
    return Sample(t, 0, 0, None, delivered, 1, 0, None, None, 0, None)


@pytest.mark.parametrize("since, want", [(0, 6), (150, 5), (1000, 0)])
def test_totals_since(since, want) -> None:
    got = totals([sample(100, 1), sample(200, 2), sample(300, 3)], since)
    assert got["delivered"] == want


T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(sid: str, group: str = "g", status: str = "running", reason: str | None = None,
        queued: bool = False, active: int | None = None) -> SessionRow:
    return SessionRow(sid, group, None, None, "active", status, reason,
                      T0.replace(minute=active) if active is not None else None, None, T0,
                      T0 if queued else None)


@pytest.mark.parametrize("s, want", [
    (row("a"), "running"),
    (row("a", status="idle"), "idle"),
    (row("a", status="idle", reason="paused after 10s"), "paused"),
    (row("a", status="stopped"), "stopped"),
    (row("a", status="stopped", queued=True), "queued"),
])
def test_state_of(s, want) -> None:
    assert state_of(s) == want


ROUTE = ("chat", "Room-7", "t1")


@pytest.mark.parametrize("s, q, status, group, want", [
    (row("sess-1"), None, None, None, True),
    (row("sess-1"), "SESS", None, None, True),  # case-insensitive
    (row("sess-1", group="writers"), "writ", None, None, True),
    (row("sess-1"), "room-7", None, None, True),  # the chat
    (row("sess-1"), "room-8", None, None, False),
    (row("sess-1", status="stopped", queued=True), None, "queued", None, True),
    (row("sess-1", status="stopped", queued=True), None, "stopped", None, True),
    (row("sess-1", status="idle", reason="paused"), None, "paused", None, True),
    (row("sess-1"), None, "idle", None, False),
    (row("sess-1", group="a"), None, None, "b", False),
])
def test_matches(s, q, status, group, want) -> None:
    assert matches(s, ROUTE, q, status, group) is want


def params(**kw: str) -> dict:
    return page_params(kw)


SESSIONS = [row("s3", active=5), row("s1", active=None), row("s2", active=9)]


@pytest.mark.parametrize("p, want_ids, want_total", [
    (params(), ["s3", "s1", "s2"], 3),  # registry order kept
    (params(sort="session_id"), ["s1", "s2", "s3"], 3),
    (params(sort="session_id", order="desc"), ["s3", "s2", "s1"], 3),
    (params(sort="last_active"), ["s3", "s2", "s1"], 3),  # never active: last
    (params(sort="session_id", limit="2"), ["s1", "s2"], 3),
    (params(sort="session_id", limit="2", offset="2"), ["s3"], 3),
    (params(q="s2"), ["s2"], 1),
    (params(offset="9"), [], 3),
])
def test_select_filters_sorts_and_pages(p, want_ids, want_total) -> None:
    chosen, total, _ = select(SESSIONS, {}, p)
    assert [s.id for s in chosen] == want_ids and total == want_total


@pytest.mark.parametrize("sort, order", [
    (None, "asc"), (None, "desc"), ("session_id", "asc"), ("session_id", "desc"),
    ("last_active", "asc"), ("last_active", "desc"), ("chat", "asc"),
])
def test_cursor_pages_walk_the_whole_list_once(sort, order) -> None:
    """Page after page by X-Next-Cursor: every row once, in the order of one big page."""
    rows = [row(f"s{i}", group=f"g{i % 2}", active=(i * 7) % 5 or None) for i in range(7)]
    rows.sort(key=lambda s: row_key(None, s, (None, None, None)))  # the registry's order
    every, _, _ = select(rows, {}, params(**({"sort": sort} if sort else {}), order=order))
    seen: list[str] = []
    cursor = ""
    while True:
        p = params(**({"sort": sort} if sort else {}), order=order, limit="3", cursor=cursor)
        chosen, total, more = select(rows, {}, p)
        seen += [s.id for s in chosen]
        assert total == 7
        if not more:
            break
        cursor = page_cursor(row_key(sort, chosen[-1], (None, None, None)))
    assert seen == [s.id for s in every]


@pytest.mark.parametrize("cursor", ["x", "bm90IGpzb24", page_cursor([1, 2])])
def test_a_cursor_not_given_by_the_server_is_refused(cursor) -> None:
    with pytest.raises(BadRequest, match="cursor"):
        params(cursor=cursor)


def test_a_cursor_of_another_sort_is_refused() -> None:
    by_group = page_cursor(row_key(None, SESSIONS[0], (None, None, None)))
    with pytest.raises(BadRequest, match="another sort"):
        select(SESSIONS, {}, params(sort="last_active", cursor=by_group))


@pytest.mark.parametrize("bad, names", [
    ({"status": "dead"}, "status"), ({"sort": "pending"}, "sort"),
    ({"order": "up"}, "order"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"limit": "x"}, "limit"), ({"offset": "-1"}, "offset"),
])
def test_bad_list_parameters_name_themselves(bad, names) -> None:
    with pytest.raises(BadRequest) as err:
        page_params(bad)
    assert str(err.value).startswith(names)


def change(at: int, old: str | None, new: str, reason: str = "") -> dict:
    return {"at": f"2026-01-01T00:{at:02d}:00+00:00", "old": old, "new": new, "reason": reason}


@pytest.mark.parametrize("changes, want", [
    ([], []),
    ([change(0, None, "running")], [("00:00", None, None)]),
    ([change(0, "stopped", "running"), change(1, "running", "idle"),
      change(2, "idle", "running"), change(3, "running", "stopped", "stopped: idle")],
     [("00:00", "stopped: idle", 180.0)]),
    ([change(0, "stopped", "running"), change(1, "running", "stopped", "exited (code 3)"),
      change(5, "stopped", "running")],
     [("00:00", "exited (code 3)", 60.0), ("05:00", None, None)]),
    ([change(0, "running", "stopped", "shutdown")], []),  # no start seen: no run
])
def test_runs_from_status_changes(changes, want) -> None:
    got = [(r["started_at"][14:19], r["exit_reason"], r["seconds"]) for r in runs(changes)]
    assert got == want
