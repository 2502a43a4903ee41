"""Time from an inotify queue overflow to the last reply delivered.

    .venv/bin/python -m bench.overflow [--sessions 10] [--per-session 200]
                                       [--sweep 30] [--src DIR] [--out PATH]

The real orchestrator (``python -m orchestrator run``) serves ``--sessions``
sessions with the reference agent (local runtime, real processes, real SQLite).
Once every agent runs and has answered once, the orchestrator is SIGSTOPped; a
flood of events (alternate touches of two scratch files: more events than
``fs.inotify.max_queued_events``) overflows its inotify queue for real, then
``--per-session`` messages go to every session and the agents write their
replies, whose events the kernel now drops. Then SIGCONT. Measured: the time from
the SIGCONT to the last reply delivered, and the warnings logged. Without a sign
of the loss the replies wait for the reconcile sweep (``--sweep`` seconds).

``--src DIR`` runs the orchestrator from another checkout (e.g. the main branch
for a before/after figure); the sending side always uses this one (the folder
format is the same). The overflow needs no change to any kernel setting, so other
programs on the host are not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import tomli_w

from orchestrator.channels.jsonl import read_lines
from orchestrator.config.load import read_config
from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB, registry_path
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import MessagingGroup, Sessions
from orchestrator.watch.health import queue_limit

LOST = "inotify events may have been lost"


def _wait(condition, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:g}s")
        time.sleep(0.02)
    return time.monotonic()


def _count(data_dir: Path, rows: list, db: str, sql: str) -> int | None:
    """Sum of ``sql`` over each session's ``db``, read the way every reader that is not
    the supervisor reads agent-writable files (``SessionDir.reader``: no link followed,
    no wait on a lock or a FIFO, a query deadline); None if one cannot be read now."""
    total = 0
    for row in rows:
        try:
            with SessionDir(data_dir, row.agent_group_id, row.id) as folder:
                conn = folder.reader(db).connect(readonly=True)
                try:
                    total += conn.execute(sql).fetchone()[0]
                finally:
                    conn.close()
        except (OSError, sqlite3.Error):
            return None
    return total


def _outbound_rows(data_dir: Path, rows: list) -> int:
    return _count(data_dir, rows, OUTBOUND_DB, "SELECT COUNT(*) FROM messages_out") or 0


def _settled(data_dir: Path, rows: list) -> bool:
    """Every message answered and its ack synced (the orchestrator's last write)."""
    return _count(data_dir, rows, INBOUND_DB,
                  "SELECT COUNT(*) FROM messages_in WHERE status != 'completed'") == 0


def overflow_run(work: Path, *, sessions: int = 10, per_session: int = 200,
                 sweep: float = 30.0, src: Path | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """One run in ``work`` (a fresh folder); returns the figures."""
    config = {
        "data_dir": str(work / "data"),
        "runtime": {"command": ["{python}", "-m", "orchestrator.agent", "--poll-interval",
                                "0.02", "--heartbeat-interval", "1"],
                    "on_shutdown": "stop", "stop_grace": 2.0},
        "lifecycle": {"idle_after": 600.0, "stop_idle_after": 600.0},
        "watch": {"sweep_interval": sweep},
    }
    config_file = work / "config.toml"
    config_file.write_text(tomli_w.dumps(config))
    cfg = read_config(config_file)
    log = work / "orchestrator.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config",
                                 str(config_file)], stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=work)
    registry = Registry(registry_path(cfg.data_dir))
    client = Sessions(cfg.data_dir, registry, cfg.sessions.max_attachment_bytes)
    delivered = lambda: len(read_lines(cfg.delivery.path))  # noqa: E731
    try:
        _wait(lambda: "orchestrator up" in log.read_text(errors="replace")
              or proc.poll() is not None, 30, "orchestrator start-up")
        rows = [client.resolve(f"flood-{i}", MessagingGroup("bench", f"room-{i}"), None,
                               "shared") for i in range(sessions)]
        folders = [client.paths(row) for row in rows]
        for row in rows:
            client.write_message(row, {"text": "wake up"}, routing=client.routing_of(row))
        _wait(lambda: delivered() == sessions, 60, "the first reply of every session")
        _wait(lambda: _settled(cfg.data_dir, rows), 60, "every ack synced")
        routing = [client.routing_of(row) for row in rows]
        time.sleep(1.0)  # let its last writes end: a SIGSTOP inside one would hold the lock

        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        scratch = [folders[0].root / "scratch-a", folders[0].root / "scratch-b"]
        # writes (IN_MODIFY), not touches: a running agent's folder is watched without
        # IN_ATTRIB while it is muted (folder_watch.QUIET_MASK), so touches queue nothing
        fds = [os.open(path, os.O_WRONLY | os.O_CREAT, 0o644) for path in scratch]
        try:
            flood = queue_limit() + 1000  # alternate files: the kernel merges only repeats
            for i in range(flood):
                os.pwrite(fds[i % 2], b"x", 0)
        finally:
            for fd in fds:
                os.close(fd)
        for n in range(per_session):
            for row, route in zip(rows, routing, strict=True):
                client.write_message(row, {"text": f"message {n}"}, routing=route)
        expected = sessions * (per_session + 1)
        _wait(lambda: _outbound_rows(cfg.data_dir, rows) == expected, 300,
              "every reply written")
        held = time.monotonic() - stopped

        os.kill(proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        done = _wait(lambda: delivered() >= expected, timeout or sweep + 120,
                     "every reply delivered")
        counts = Counter(r["message_id"] for r in read_lines(cfg.delivery.path))
        text = log.read_text(errors="replace")
        return {
            "sessions": sessions, "replies": expected, "flood_events": flood,
            "max_queued_events": queue_limit(), "stopped_for_s": round(held, 2),
            "sweep_interval_s": sweep,
            "resume_to_last_reply_s": round(done - resumed, 3),
            "delivered": sum(counts.values()), "distinct": len(counts),
            "duplicated": sum(c - 1 for c in counts.values()),
            "warnings": sum(LOST in line and "WARNING" in line for line in text.splitlines()),
            "log": str(log),
        }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        registry.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--per-session", type=int, default=200)
    parser.add_argument("--sweep", type=float, default=30.0)
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overflow.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overflow-") as tmp:
        result = overflow_run(Path(tmp), sessions=args.sessions, per_session=args.per_session,
                              sweep=args.sweep, src=args.src)
        result["src"] = str(args.src or "this checkout")
        result["log"] = None
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
