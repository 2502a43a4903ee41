"""Scheduled and recurring messages end to end: the real supervisor, real agents,
real inotify and SQLite; the SIGKILL test kills a real orchestrator process."""

from __future__ import annotations

import itertools
import signal
from datetime import datetime, timedelta
from pathlib import Path

import tomli_w

from orchestrator.cli import commands as cli
from orchestrator.config.load import read_config
from orchestrator.contract.schema import parse_ts, utcnow
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.host import series
from orchestrator.rules import scheduling
from tests.support.e2e import (
    Client,
    OrchestratorProcess,
    config_dict,
    make_config,
    replies,
    replies_to,
    run,
    supervised,
)
from tests.support.helpers import holds, killed_run, query, until, wait_for

LATENCY = timedelta(milliseconds=50)


def whole_second_ahead(seconds: float) -> datetime:
    """A due time on a whole second, at least ``seconds`` from now (stored exactly)."""
    return scheduling.ceil_second(utcnow() + timedelta(seconds=seconds))


def claim_time(paths, mid: str) -> datetime | None:
    """When the agent claimed ``mid`` (its own clock, stamped before its commit), read
    while the claim is still 'processing' (the agent then works for a while)."""
    rows = query(paths.outbound_db, "SELECT status_changed FROM processing_ack WHERE"
                 " message_id=? AND status='processing'", (mid,))
    return parse_ts(rows[0][0]) if rows else None


async def test_at_is_not_processed_before_its_time_and_within_50ms_after(tmp_path: Path,
                                                                     reap_agents) -> None:
    """A running agent claims a message due at T within [T, T + 50 ms]: it sleeps until
    the due time, not a poll interval (1 s here); the sweep is 120 s."""
    cfg = make_config(tmp_path, agent_args=["--poll-interval", "1.0", "--work-seconds", "1.0"],
                      lifecycle={"idle_after": 30.0, "stop_idle_after": 60.0},
                      watch={"sweep_interval": 120.0})

    client = Client(cfg)
    async with supervised(cfg):
        row, warm = client.send("timed", "wake up")
        await until(lambda: replies_to(cfg, warm), timeout=30, message="the agent up")
        paths = client.paths(row)
        results = []
        for _ in range(3):
            due = whole_second_ahead(1.5)
            mid, _ = client.sessions.write_message(row, {"text": "on time"},
                                                   process_after=due)
            await holds(lambda: claim_time(paths, mid) is None and not replies_to(cfg, mid),
                        (due - utcnow()).total_seconds() - 0.02,
                        message="nothing before its time")
            claimed = await until(lambda: claim_time(paths, mid), timeout=10,
                                  interval=0.005, message="the claim")
            await until(lambda: replies_to(cfg, mid), timeout=10, message="the reply")
            results.append((due, claimed))
    for due, claimed in results:
        assert due <= claimed <= due + LATENCY, (due, claimed - due)
    client.close()


async def test_at_wakes_a_stopped_agent_by_a_timer_within_50ms(tmp_path: Path, reap_agents,
                                                         monkeypatch) -> None:
    """No agent runs: the host's timer begins the agent's start at the due time (not
    the 120 s sweep), and the agent it starts claims the message after that time."""
    cfg = make_config(tmp_path, agent_args=["--work-seconds", "1.0"],
                      watch={"sweep_interval": 120.0})
    wakes: list[datetime] = []
    original = SessionWorker._start

    async def recording_start(self, t):
        wakes.append(utcnow())
        await original(self, t)

    monkeypatch.setattr(SessionWorker, "_start", recording_start)

    client = Client(cfg)
    async with supervised(cfg):
        row = client.session("sleepy")
        paths = client.paths(row)
        due = whole_second_ahead(1.5)
        mid, _ = client.sessions.write_message(row, {"text": "later"}, process_after=due)
        claimed = await until(lambda: claim_time(paths, mid), timeout=30, interval=0.005,
                              message="the claim")
        await until(lambda: replies_to(cfg, mid), timeout=20, message="the reply")
    assert len(wakes) == 1
    assert due <= wakes[0] <= due + LATENCY, (due, wakes[0] - due)
    assert claimed >= due
    client.close()


def test_a_recurring_series_for_real_at_a_one_second_cadence_then_cancelled(
        tmp_path: Path, reap_agents, capsys) -> None:
    data = config_dict(tmp_path, lifecycle={"idle_after": 30.0, "stop_idle_after": 60.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = read_config(config_file)

    async def body() -> list[tuple]:
        client = Client(cfg)
        async with supervised(cfg):
            row, warm = client.send("ticker", "wake up")  # the cadence, not the cold start
            await until(lambda: replies_to(cfg, warm), timeout=30, message="the agent up")
            assert cli.main(["send", "--config", str(config_file), "--group", "ticker",
                             "--every", "* * * * * *", "tick"]) == 0
            session_id, series_id = capsys.readouterr().out.split()
            assert session_id == row.id
            db = client.paths(row).inbound_db
            done = lambda: query(db, "SELECT COUNT(*) FROM messages_in WHERE"  # noqa: E731
                                 " status='completed' AND series_id=?", (series_id,))[0][0]
            await until(lambda: done() >= 5, timeout=20, message="five runs")
            assert series.cancel(cfg.data_dir, client.registry, series_id)[1] in (0, 1)
            count = query(db, "SELECT COUNT(*) FROM messages_in")[0][0]
            after_cancel = done()
            await holds(lambda: query(db, "SELECT COUNT(*) FROM messages_in")[0][0] <= count,
                        2.5, message="no occurrence after the cancel")
            timeline = query(db, "SELECT id, process_after, status, recurrence FROM messages_in"
                             " WHERE series_id=? ORDER BY seq", (series_id,))
            out_times = dict(query(client.paths(row).outbound_db,
                                   "SELECT in_reply_to, timestamp FROM messages_out"))
            (listed,) = series.collect(cfg.data_dir, client.registry)
        assert listed.state == "cancelled" and listed.next_run is None
        assert done() <= after_cancel + 1  # at most the one an agent had already claimed
        assert not [t for t in timeline if t[2] == "pending"]
        assert not [t for t in timeline if t[3] is not None]  # nothing recurs any more
        client.close()
        return [(pa, status, out_times.get(mid)) for mid, pa, status, _ in timeline]

    runs = run(body())
    print("\nseries timeline (due UTC, status, agent's reply):")
    for r in runs:
        print("  ", *r)
    completed = [r for r in runs if r[1] == "completed"]
    assert len(completed) >= 5
    dues = [parse_ts(r[0]) for r in completed]
    # one run per second: each next occurrence is the next whole second after its
    # predecessor completed (a run is a few ms), none replayed or doubled
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(dues)] == [1.0] * (len(dues) - 1)
    for due, (_, _, replied) in zip(dues, completed, strict=False):
        assert due <= parse_ts(replied), (due, replied)  # never before its time


# --- SIGKILL between completion and the next occurrence ---------------------------------------

KILLER = """
import os, signal, sys
from orchestrator.host import inbound
original, mode = inbound.settle, sys.argv[2]
def settle(path, records, acks, *args, **kwargs):
    if mode == "before" and acks:   # the agent completed; the host has written nothing
        os.kill(os.getpid(), signal.SIGKILL)
    changed = original(path, records, acks, *args, **kwargs)
    if mode == "after" and changed:  # written, but the process forgets it saw the ack
        os.kill(os.getpid(), signal.SIGKILL)
    return changed
inbound.settle = settle
from orchestrator.cli.commands import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def killed_once(tmp_path: Path, mode: str) -> None:
    data = config_dict(tmp_path, lifecycle={"idle_after": 30.0, "stop_idle_after": 60.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(data))
    cfg = read_config(config_file)
    client = Client(cfg)
    row = client.session("yearly")
    series_id = scheduling.new_series_id()
    first_due = whole_second_ahead(1.0)
    client.registry.add_series(series_id, row.id, "yearly", "0 0 1 1 *", "UTC")
    mid, _ = client.sessions.write_message(row, {"text": "happy new year"},
                                           process_after=first_due, recurrence="0 0 1 1 *",
                                           series_id=series_id)
    db = client.paths(row).inbound_db

    killed_run(KILLER, [str(config_file), mode], tmp_path / "killed.log", tmp_path)
    rows = query(db, "SELECT id, status FROM messages_in ORDER BY seq")
    if mode == "before":  # the agent's ack is there, the host never synced it
        assert rows == [(mid, "pending")]
        assert query(client.paths(row).outbound_db, "SELECT status FROM processing_ack") == [
            ("completed",)]
    else:  # completed and the successor written in one transaction, then the kill
        assert [r[1] for r in rows] == ["completed", "pending"]

    again = OrchestratorProcess(config_file, tmp_path / "again.log")
    try:
        again.wait_up()
        wait_for(lambda: replies_to(cfg, mid), timeout=20, message="the reply delivered")
        wait_for(lambda: query(db, "SELECT COUNT(*) FROM messages_in WHERE status='completed'"
                               )[0][0] == 1, message="the occurrence completed")
        # a full start-up pass re-read every ack; give it a sweep's worth of passes
        wait_for(lambda: "orchestrator up" in again.text(), timeout=10)
    finally:
        assert again.end(signal.SIGTERM) == 0, again.text()
    rows = query(db, "SELECT id, status, process_after, series_id FROM messages_in ORDER BY seq")
    next_year = f"{first_due.year + 1}-01-01 00:00:00"
    assert rows == [(mid, "completed", scheduling.format_due(first_due), series_id),
                    (scheduling.successor_id(series_id, mid), "pending", next_year, series_id)]
    assert len(replies(cfg)) == 1
    client.close()


def test_sigkill_before_the_host_saw_the_completion_gives_exactly_one_next(
        tmp_path: Path, reap_agents) -> None:
    killed_once(tmp_path, "before")


def test_sigkill_right_after_the_completion_was_written_gives_exactly_one_next(
        tmp_path: Path, reap_agents) -> None:
    killed_once(tmp_path, "after")
