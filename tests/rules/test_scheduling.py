"""scheduling: --at / --every parsing, cron in a time zone, and a recurring series
under a fake clock on a real inbound.db (successors written with the completion)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.host import inbound
from orchestrator.rules import scheduling
from orchestrator.rules.messages import NewMessage
from orchestrator.rules.scheduling import (
    ScheduleError,
    check_cron,
    format_due,
    next_run,
    parse_at,
    successor,
    successor_id,
)
from tests.support.helpers import query

UTC = timezone.utc
NOW = datetime(2026, 3, 27, 10, 15, 30, 250000, tzinfo=UTC)  # a Friday


# --- --at ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, zone, expected", [
    ("+10m", "UTC", NOW + timedelta(minutes=10)),
    ("+45s", "UTC", NOW + timedelta(seconds=45)),
    ("+1h30m", "UTC", NOW + timedelta(hours=1, minutes=30)),
    ("+2d", "UTC", NOW + timedelta(days=2)),
    ("+1d2h3m4s", "UTC", NOW + timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("2026-03-27T18:00:00Z", "UTC", datetime(2026, 3, 27, 18, tzinfo=UTC)),
    ("2026-03-27 18:00:00+01:00", "UTC", datetime(2026, 3, 27, 17, tzinfo=UTC)),
    ("2026-03-27T18:00", "UTC", datetime(2026, 3, 27, 18, tzinfo=UTC)),
    # no offset: a wall-clock time in [sessions] timezone (CET, UTC+1 in March until the 29th)
    ("2026-03-27T18:00", "Europe/Berlin", datetime(2026, 3, 27, 17, tzinfo=UTC)),
    ("2026-07-01T18:00", "Europe/Berlin", datetime(2026, 7, 1, 16, tzinfo=UTC)),  # CEST
    ("2026-03-28", "UTC", datetime(2026, 3, 28, tzinfo=UTC)),
])
def test_parse_at(text, zone, expected):
    assert parse_at(text, NOW, zone) == expected


@pytest.mark.parametrize("text, message", [
    ("+10", "use +N followed by d, h, m and/or s"),
    ("+", "use +N followed by d, h, m and/or s"),
    ("+5x", "use +N followed by d, h, m and/or s"),
    ("+10m5h", "use +N followed by d, h, m and/or s"),
    ("tomorrow", "not an ISO 8601 time"),
    ("2026-13-01T00:00", "not an ISO 8601 time"),
    ("2026-03-27T10:15:00Z", "is not in the future"),
    ("+0s", "is not in the future"),
])
def test_parse_at_refuses_in_one_line(text, message):
    with pytest.raises(ScheduleError) as err:
        parse_at(text, NOW)
    assert message in str(err.value) and str(err.value).startswith(f"--at {text!r}")


@pytest.mark.parametrize("when, text", [
    (datetime(2026, 3, 27, 10, 15, 30, tzinfo=UTC), "2026-03-27 10:15:30"),
    (datetime(2026, 3, 27, 10, 15, 30, 1, tzinfo=UTC), "2026-03-27 10:15:31"),  # never early
    (datetime(2026, 12, 31, 23, 59, 59, 900000, tzinfo=UTC), "2027-01-01 00:00:00"),
    (datetime(2026, 3, 27, 12, 0, tzinfo=timezone(timedelta(hours=2))), "2026-03-27 10:00:00"),
])
def test_format_due_is_utc_whole_seconds_rounded_up(when, text):
    assert format_due(when) == text


def test_format_due_compares_as_text_like_sqlite_now(tmp_path: Path):
    """Agents (NanoClaw's too) compare process_after with datetime('now') as text."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    (now_text,) = conn.execute("SELECT datetime('now')").fetchone()
    assert len(now_text) == len(format_due(NOW)) and now_text[10] == " "


# --- cron ----------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["* * * * *", "0 9 * * MON-FRI", "*/15 * * * *",
                                  "* * * * * *", "30 0 12 1 * *", "0 0 1 1 *"])
def test_check_cron_accepts(expr):
    assert check_cron(f"  {expr} ") == expr


@pytest.mark.parametrize("expr, message", [
    ("* * * *", "a cron expression has 5 fields"),
    ("* * * * * * *", "a cron expression has 5 fields"),
    ("61 * * * *", "Bad minute field"),
    ("* 25 * * *", "Bad hour field"),
    ("* * * * FUNDAY", "Bad day-of-week field"),
    ("0 0 31 2 *", "Bad day-of-month field"),
])
def test_check_cron_refuses_in_one_line(expr, message):
    with pytest.raises(ScheduleError) as err:
        check_cron(expr)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("expr, after, zone, expected", [
    ("0 9 * * *", NOW, "UTC", datetime(2026, 3, 28, 9, tzinfo=UTC)),
    ("*/15 * * * *", NOW, "UTC", datetime(2026, 3, 27, 10, 30, tzinfo=UTC)),
    ("* * * * * *", NOW, "UTC", datetime(2026, 3, 27, 10, 15, 31, tzinfo=UTC)),
    ("0 9 * * MON-FRI", NOW, "UTC", datetime(2026, 3, 30, 9, tzinfo=UTC)),  # Fri → Mon
    # 09:00 Berlin: 08:00 UTC in winter; the 29th of March 2026 is the switch to CEST
    ("0 9 * * *", NOW, "Europe/Berlin", datetime(2026, 3, 28, 8, tzinfo=UTC)),
    ("0 9 * * *", datetime(2026, 3, 28, 9, tzinfo=UTC), "Europe/Berlin",
     datetime(2026, 3, 29, 7, tzinfo=UTC)),
    # strictly after: a time that matches is not its own next run
    ("0 9 * * *", datetime(2026, 3, 28, 9, tzinfo=UTC), "UTC",
     datetime(2026, 3, 29, 9, tzinfo=UTC)),
])
def test_next_run_in_a_time_zone(expr, after, zone, expected):
    assert next_run(expr, after, zone) == expected


# --- successors -----------------------------------------------------------------------------

ROW = {"id": "ser-1-first", "kind": "chat", "content": '{"text": "standup"}', "trigger": 1,
       "platform_id": "p", "channel_type": "c", "thread_id": None, "recurrence": "0 9 * * *",
       "series_id": "ser-1", "source_session_id": None, "on_wake": 0,
       "process_after": "2026-03-27 09:00:00", "status": "completed"}


@pytest.mark.parametrize("changes, now, due", [
    ({}, datetime(2026, 3, 27, 9, 0, 2, tzinfo=UTC), "2026-03-28 09:00:00"),
    # down for three days: the missed runs collapse into the next one
    ({}, datetime(2026, 3, 30, 12, tzinfo=UTC), "2026-03-31 09:00:00"),
    # a retry pushed the row past now: next after the row's own due time
    ({"process_after": "2026-03-28 09:00:05"}, datetime(2026, 3, 27, 9, 1, tzinfo=UTC),
     "2026-03-29 09:00:00"),
    ({"process_after": None}, datetime(2026, 3, 27, 9, 1, tzinfo=UTC), "2026-03-28 09:00:00"),
    ({"process_after": "garbage"}, datetime(2026, 3, 27, 9, 1, tzinfo=UTC),
     "2026-03-28 09:00:00"),
])
def test_successor_time(changes, now, due):
    nxt = successor({**ROW, **changes}, now)
    assert nxt is not None and nxt.process_after == due


def test_successor_copies_the_row_and_has_a_deterministic_id():
    now = datetime(2026, 3, 27, 9, 0, 2, tzinfo=UTC)
    a, b = successor(ROW, now), successor(ROW, now + timedelta(hours=3))
    assert a.id == b.id == successor_id("ser-1", "ser-1-first")
    assert a.id.startswith("ser-1-") and a.id != successor_id("ser-1", a.id)
    assert (a.kind, a.content, a.platform_id, a.channel_type, a.recurrence, a.series_id) == (
        "chat", '{"text": "standup"}', "p", "c", "0 9 * * *", "ser-1")


@pytest.mark.parametrize("changes", [{"recurrence": None}, {"series_id": None},
                                     {"recurrence": "not cron"}])
def test_no_successor_without_a_valid_recurrence(changes):
    assert successor({**ROW, **changes}, NOW) is None


# --- a series under a fake clock, on a real inbound.db ----------------------------------------

def first_occurrence(db: Path, expr: str, due: datetime, series_id: str = "ser-t") -> str:
    inbound.init(db)
    inbound.insert_message(db, inbound.NewMessage(
        id=f"{series_id}-0", kind="chat", content=json.dumps({"text": "tick"}),
        process_after=format_due(due), recurrence=expr, series_id=series_id))
    return f"{series_id}-0"


def complete_due(db: Path, now: datetime, zone: str = "UTC") -> list[str]:
    """What an agent and the host do at ``now``: every due pending row is completed,
    the host syncs the acks with the series' follow-up (exactly as the worker does)."""
    due = [r[0] for r in query(db, "SELECT id FROM messages_in WHERE status='pending' AND"
                               " process_after <= ?", (format_due(now),))]
    inbound.settle(db, (), {mid: "completed" for mid in due},
                      lambda row: scheduling.successor(row, now, zone), now)
    return due


def timeline(db: Path) -> list[tuple[str, str]]:
    return query(db, "SELECT process_after, status FROM messages_in ORDER BY seq")


def test_hourly_series_under_a_fake_clock(tmp_path: Path):
    db = tmp_path / "inbound.db"
    first_occurrence(db, "0 * * * *", datetime(2026, 3, 27, 10, tzinfo=UTC))
    clock = datetime(2026, 3, 27, 9, 59, 59, tzinfo=UTC)
    assert complete_due(db, clock) == []  # not before its time
    for minutes in (1, 60, 60):  # on time, three times
        clock += timedelta(minutes=minutes)
        assert len(complete_due(db, clock + timedelta(seconds=1))) == 1
    clock += timedelta(hours=3, minutes=20)  # down from 12:01 to 15:21: 13, 14, 15 missed
    assert clock == datetime(2026, 3, 27, 15, 20, 59, tzinfo=UTC)
    assert len(complete_due(db, clock)) == 1
    assert timeline(db) == [
        ("2026-03-27 10:00:00", "completed"), ("2026-03-27 11:00:00", "completed"),
        ("2026-03-27 12:00:00", "completed"),
        ("2026-03-27 13:00:00", "completed"),  # run late, once, at 15:20:59
        ("2026-03-27 16:00:00", "pending")]  # next after now: 14:00, 15:00 collapsed
    seqs = [r[0] for r in query(db, "SELECT seq FROM messages_in ORDER BY seq")]
    assert seqs == [2, 4, 6, 8, 10]


def test_weekday_series_in_berlin_time(tmp_path: Path):
    db = tmp_path / "inbound.db"
    first_occurrence(db, "0 9 * * MON-FRI", datetime(2026, 3, 27, 8, tzinfo=UTC))
    clock = datetime(2026, 3, 27, 8, 0, 1, tzinfo=UTC)
    for _ in range(3):
        assert len(complete_due(db, clock, "Europe/Berlin")) == 1
        (nxt,) = query(db, "SELECT process_after FROM messages_in WHERE status='pending'")
        clock = schema.parse_ts(nxt[0]) + timedelta(seconds=1)
    # Fri 09:00 CET, Mon 09:00 CEST (the clocks changed on Sunday), Tue, then Wed
    assert [t for t, _ in timeline(db)] == ["2026-03-27 08:00:00", "2026-03-30 07:00:00",
                                            "2026-03-31 07:00:00", "2026-04-01 07:00:00"]


def test_a_replayed_completion_adds_no_second_successor(tmp_path: Path):
    db = tmp_path / "inbound.db"
    mid = first_occurrence(db, "0 * * * *", datetime(2026, 3, 27, 10, tzinfo=UTC))
    for hours in (0, 5):  # e.g. the acks are read again after a restart, hours later
        now = datetime(2026, 3, 27, 10 + hours, 0, 1, tzinfo=UTC)
        inbound.settle(db, (), {mid: "completed"}, lambda row: successor(row, now), now)
    assert timeline(db) == [("2026-03-27 10:00:00", "completed"),
                            ("2026-03-27 11:00:00", "pending")]
    # and even a follow-up asked for twice is inserted once (same id, INSERT OR IGNORE)
    with schema.opened(db) as conn, schema.transaction(conn):
        inbound._follow_up(conn, mid, lambda row: successor(row, NOW), NOW)
    assert len(timeline(db)) == 2


def _acked_failed(db: Path, mid: str, now: datetime) -> None:
    inbound.settle(db, (), {mid: "failed"}, lambda row: successor(row, now), now)


def _claim_failed_by_the_host_at_max_tries(db: Path, mid: str, now: datetime) -> None:
    result = inbound.reset_claims(db, [mid], max_tries=1, backoff_base=1, now=now,
                                  follow_up=lambda row: successor(row, now))
    assert result == {mid: "failed"}


def _failed_because_no_agent_starts(db: Path, mid: str, now: datetime) -> None:
    assert inbound.fail_messages(db, inbound.due_ids(db, now), now,
                                 lambda row: successor(row, now)) == [mid]


@pytest.mark.parametrize("fail", [_acked_failed, _claim_failed_by_the_host_at_max_tries,
                                  _failed_because_no_agent_starts])
def test_a_failed_occurrence_continues_the_series(tmp_path: Path, fail):
    db = tmp_path / "inbound.db"
    mid = first_occurrence(db, "*/5 * * * *", datetime(2026, 3, 27, 10, tzinfo=UTC))
    now = datetime(2026, 3, 27, 10, 0, 1, tzinfo=UTC)
    fail(db, mid, now)
    assert timeline(db) == [("2026-03-27 10:00:00", "failed"),
                            ("2026-03-27 10:05:00", "pending")]


def test_cancel_removes_the_waiting_occurrence_and_stops_the_series(tmp_path: Path):
    db = tmp_path / "inbound.db"
    mid = first_occurrence(db, "* * * * *", datetime(2026, 3, 27, 10, tzinfo=UTC))
    other = first_occurrence(db, "* * * * *", datetime(2026, 3, 27, 10, tzinfo=UTC), "ser-o")
    # the first occurrence is claimed by an agent: it is kept, and nothing follows it
    assert inbound.cancel_series(db, "ser-t", keep=[mid]) == (1, 0)
    now = datetime(2026, 3, 27, 10, 0, 1, tzinfo=UTC)
    inbound.settle(db, (), {mid: "completed", other: "completed"},
                      lambda row: successor(row, now), now)
    rows = query(db, "SELECT series_id, status, recurrence FROM messages_in ORDER BY seq")
    assert rows == [("ser-t", "completed", None), ("ser-o", "completed", "* * * * *"),
                    ("ser-o", "pending", "* * * * *")]  # the other series goes on
    assert inbound.cancel_series(db, "ser-o") == (2, 1)
    assert inbound.series_state(db, "ser-o") == {"counts": {"completed": 1}, "next": None,
                                                 "recurring": False}


# --- exact values: defaults, messages, every copied field ----------------------------------


def test_defaults_are_utc_and_results_are_utc():
    assert parse_at("2026-03-27T18:00", NOW) == datetime(2026, 3, 27, 18, tzinfo=UTC)
    assert parse_at("2026-03-27t18:00:00z", NOW) == datetime(2026, 3, 27, 18, tzinfo=UTC)
    assert parse_at("2026-03-27T18:00:00+02:00", NOW, "Europe/Berlin").tzinfo is UTC
    assert parse_at("+1m", NOW).tzinfo is UTC
    assert next_run("0 9 * * *", NOW) == datetime(2026, 3, 28, 9, tzinfo=UTC)
    assert next_run("0 9 * * *", NOW, "Europe/Berlin").tzinfo is UTC
    assert scheduling.next_due("0 9 * * *", None, NOW) == datetime(2026, 3, 28, 9, tzinfo=UTC)


@pytest.mark.parametrize("call, message", [
    (lambda: parse_at("+10", NOW), "--at '+10': use +N followed by d, h, m and/or s "
     "(e.g. +10m, +1h30m) or an ISO 8601 time"),
    (lambda: parse_at("tomorrow", NOW), "--at 'tomorrow': not an ISO 8601 time (e.g. "
     "2026-12-24T18:00:00Z) nor a relative +10m"),
    (lambda: check_cron("* * * *"), "--every '* * * *': a cron expression has 5 fields "
     "(minute hour day month weekday) or 6 (seconds first), e.g. '0 9 * * MON-FRI'"),
    (lambda: next_run("61 * * * *", NOW),
     "recurrence '61 * * * *': no next run (Bad minute)"),
])
def test_refusals_word_for_word(call, message):
    with pytest.raises(ScheduleError) as err:
        call()
    assert str(err.value) == message


def test_first_run_is_at_if_given_else_the_next_cron_time():
    at = NOW + timedelta(hours=5)
    assert scheduling.first_run("0 9 * * *", NOW, at) == at
    assert scheduling.first_run("0 9 * * *", NOW, None) == datetime(2026, 3, 28, 9, tzinfo=UTC)
    assert scheduling.first_run("0 9 * * *", NOW, None, "Europe/Berlin") == datetime(
        2026, 3, 28, 8, tzinfo=UTC)


def test_new_series_ids_are_fresh_and_shaped():
    a, b = scheduling.new_series_id(), scheduling.new_series_id()
    assert a != b and all(re.fullmatch(r"ser-[0-9a-f]{16}", x) for x in (a, b))


def test_successor_id_is_the_series_and_16_hex_digits():
    assert re.fullmatch(r"ser-1-[0-9a-f]{16}", successor_id("ser-1", "x"))


def test_successor_copies_every_field():
    row = {**ROW, "trigger": 0, "thread_id": "t9", "source_session_id": "s-7", "on_wake": 1}
    assert successor(row, NOW) == NewMessage(
        id=successor_id("ser-1", "ser-1-first"), kind="chat", content='{"text": "standup"}',
        process_after="2026-03-28 09:00:00", trigger=0, platform_id="p", channel_type="c",
        thread_id="t9", series_id="ser-1", recurrence="0 9 * * *", source_session_id="s-7",
        on_wake=1)
    bare = {k: v for k, v in ROW.items() if k not in ("trigger", "thread_id", "on_wake",
                                                      "platform_id", "channel_type")}
    nxt = successor({**bare, "on_wake": None}, NOW)
    assert (nxt.trigger, nxt.thread_id, nxt.on_wake, nxt.platform_id, nxt.channel_type) == (
        1, None, 0, None, None)
