"""The round trip's breakdown (bench/roundtrip.py): milestones read from the session
folder's real inotify events, and their rows in the issue-13 table."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from bench import rt_report
from bench.rt_trace import ReplyWatch, steps_line, summarize_steps


def _commit(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_breakdown_of_a_real_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "sess"
    folder.mkdir()
    _commit(folder / "outbound.db")  # an earlier reply: before the message, not counted
    watch = ReplyWatch(tmp_path / "delivered.jsonl", folder)
    try:
        watch.drain()
        t0 = time.time()
        (folder / ".agent.pid.tmp").write_text("1 2\n")
        (folder / ".agent.pid.tmp").rename(folder / ".agent.pid")
        (folder / ".heartbeat").touch()
        _commit(folder / "outbound.db")
        with open(tmp_path / "delivered.jsonl", "a") as out:
            out.write(json.dumps({"in_reply_to": "m1", "text": "hi"}) + "\n")
        t1 = watch.wait("m1", 10)
        assert t1 is not None
        steps = watch.breakdown(t0, t1)
    finally:
        watch.close()
    assert set(steps) == {"spawned", "woke", "reply_begin", "reply_commit", "delivered",
                          "host_delivery"}
    assert (0 <= steps["spawned"] <= steps["woke"] <= steps["reply_begin"]
            <= steps["reply_commit"] <= steps["delivered"])
    assert abs(steps["host_delivery"] - (steps["delivered"] - steps["reply_commit"])) < 1e-6
    summary = summarize_steps([steps, steps])
    assert summary["woke"]["n"] == 2
    assert "host: reply commit → line" in steps_line(summary)


def test_the_table_shows_the_breakdown() -> None:
    doc = {"roundtrip": {"local": {"warm_inotify_events": {
        "latency_ms": {"n": 10, "p50": 9.0, "p99": 12.0},
        "steps_ms": {"woke": {"n": 10, "p50": 1.5, "max": 2.0},
                     "reply_commit": {"n": 10, "p50": 4.0, "max": 5.0},
                     "host_delivery": {"n": 10, "p50": 5.0, "max": 6.0}}}}}}
    rows = {r["metric"].strip(): r for r in rt_report.summarize(doc)}
    assert rows["warm local: reply committed"]["values"]["inotify"] == 4.0
    assert rows["warm local: host, reply commit → line"]["values"]["inotify"] == 5.0
    assert rows["warm local: host, reply commit → line"]["pass"] is None  # no target
