"""Synthetic agents: processes that do to session folders what an agent does, and nothing else.

Run as ``python -m bench.agents replies …`` or ``python -m bench.agents heartbeat …``.
They are the *agent side* of the session-folder contract (docs/contract.md),
trimmed to what the measurement needs, so that the orchestrator's cost is
measured alone (no model, no reference agent, no process start-up per message):

- ``replies``: insert rows into ``messages_out`` of the sessions listed, one row
  per transaction (``BEGIN IMMEDIATE`` … ``COMMIT`` via ``orchestrator.contract.schema``
  ``connect``/``transaction``, ``journal_mode=DELETE``), with the next ODD seq above
  the max of both tables, ``timestamp`` = the writer's UTC clock inside the
  transaction; then touch ``.heartbeat`` (as the reference agent does after each
  reply). The exact commit time (``time.time()`` right after COMMIT returns) is
  written to the results file: it is the start of every latency measurement.
- ``heartbeat``: touch ``.heartbeat`` of each listed session at ``--hz``, spread
  evenly in time (the touch is the reference agent's: open O_CREAT|O_NOFOLLOW,
  ``utime``, close).
- ``lock``: a hostile agent per listed session: ``BEGIN EXCLUSIVE`` on its own
  ``outbound.db`` (held until SIGTERM or ``--seconds``), touching the file and its
  ``.heartbeat`` at ``--hz`` so that every touch is an event the orchestrator acts
  on. Writes ``--out`` once every lock is held.

Every loop is bounded by a count and by a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from orchestrator.contract import schema

HEARTBEAT = ".heartbeat"


def touch(folder: str) -> None:
    """The reference agent's heartbeat: create if missing, bump mtime, never via a symlink."""
    path = os.path.join(folder, HEARTBEAT)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def _next_odd(*maxima: int | None) -> int:
    top = max([m for m in maxima if m is not None] + [0])
    return top + 1 if top % 2 == 0 else top + 2


def _max_inbound_seq(folder: str) -> int | None:
    with schema.opened(os.path.join(folder, "inbound.db"), readonly=True) as conn:
        return conn.execute("SELECT MAX(seq) FROM messages_in").fetchone()[0]


class _Stop:
    flag = False


def _on_term(_sig, _frame) -> None:
    _Stop.flag = True


def run_replies(folders: list[str], count: int, rate: float, prefix: str, out: Path,
                max_seconds: float, heartbeat: bool, part: int = 0, parts: int = 1) -> int:
    """Replies ``i`` = part, part + parts, … < count, reply ``i`` to ``folders[i % n]``.

    With ``parts`` writers (one process each) and ``n`` a multiple of ``parts``, each
    writer owns its own folders: one writer per file, as one agent per session."""
    conns: dict[str, sqlite3.Connection] = {}
    max_in: dict[str, int | None] = {}
    rows: list[str] = []
    t_start = time.time()
    deadline = t_start + max_seconds
    written = 0
    try:
        for i in range(part, count, parts):
            if _Stop.flag or time.time() > deadline:
                break
            if rate > 0:
                delay = t_start + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            folder = folders[i % len(folders)]
            conn = conns.get(folder)
            if conn is None:
                conn = conns[folder] = schema.connect(os.path.join(folder, "outbound.db"))
                max_in[folder] = _max_inbound_seq(folder)
            mid = f"{prefix}-{i:06d}"
            content = json.dumps({"text": f"bench reply {i}"})
            t_begin = time.time()
            with schema.transaction(conn):
                (max_out,) = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
                seq = _next_odd(max_in[folder], max_out)
                conn.execute(
                    "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, content)"
                    " VALUES (?, ?, NULL, ?, 'chat', ?)",
                    (mid, seq, schema.now_ts(), content))
            t_commit = time.time()
            if heartbeat:
                touch(folder)
            rows.append(f"{mid}\t{folder}\t{t_commit:.6f}\t{t_begin:.6f}\n")
            written += 1
    finally:
        for conn in conns.values():
            conn.close()
        t_end = time.time()
        tmp = out.with_name(out.name + ".tmp")  # one per writer (Tx.writer0 → Tx.writer0.tmp)
        with open(tmp, "w") as fh:
            fh.write(json.dumps({"written": written, "t_start": t_start, "t_end": t_end}) + "\n")
            fh.writelines(rows)
        os.replace(tmp, out)
    return 0


def run_heartbeat(folders: list[str], hz: float, seconds: float, out: Path) -> int:
    n = len(folders)
    interval = 1.0 / (hz * n)
    t_start = time.time()
    t_end = t_start + seconds
    max_touches = int(seconds * hz * n) + n
    k = 0
    late = 0.0
    while not _Stop.flag and k < max_touches:
        now = time.time()
        if now >= t_end:
            break
        due = min(int((now - t_start) / interval) + 1, max_touches)
        if due - k > 1:
            late = max(late, now - (t_start + k * interval))
        while k < due:
            touch(folders[k % n])
            k += 1
        delay = t_start + k * interval - time.time()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.time() - t_start
    tmp = out.with_name(out.name + ".tmp")  # one per writer (Tx.writer0 → Tx.writer0.tmp)
    tmp.write_text(json.dumps({"touches": k, "seconds": elapsed, "sessions": n, "hz": hz,
                               "achieved_hz_per_agent": k / n / elapsed if elapsed else 0.0,
                               "max_lateness_s": late}) + "\n")
    os.replace(tmp, out)
    return 0


def run_lock(folders: list[str], hz: float, seconds: float, out: Path) -> int:
    conns = []
    try:
        for folder in folders:
            conn = sqlite3.connect(os.path.join(folder, "outbound.db"), isolation_level=None,
                                   timeout=10)
            conn.execute("BEGIN EXCLUSIVE")
            conns.append(conn)
        tmp = out.with_name(out.name + ".tmp")  # one per writer (Tx.writer0 → Tx.writer0.tmp)
        tmp.write_text(json.dumps({"locked": len(conns), "t": time.time()}) + "\n")
        os.replace(tmp, out)
        deadline = time.time() + seconds
        while not _Stop.flag and time.time() < deadline:
            for folder in folders:
                os.utime(os.path.join(folder, "outbound.db"))
                touch(folder)
            time.sleep(1.0 / hz)
    finally:
        for conn in conns:
            conn.close()  # rolls back: the lock ends, nothing was written
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agents")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replies")
    r.add_argument("--sessions", required=True, help="file: one session folder per line")
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--rate", type=float, default=0.0, help="replies/s overall; 0 = flat out")
    r.add_argument("--prefix", required=True, help="message id prefix")
    r.add_argument("--out", required=True)
    r.add_argument("--max-seconds", type=float, default=300.0)
    r.add_argument("--no-heartbeat", action="store_true")
    r.add_argument("--part", type=int, default=0, help="this writer's index (of --parts)")
    r.add_argument("--parts", type=int, default=1, help="writers sharing the replies")
    h = sub.add_parser("heartbeat")
    h.add_argument("--sessions", required=True)
    h.add_argument("--hz", type=float, required=True)
    h.add_argument("--seconds", type=float, required=True)
    h.add_argument("--out", required=True)
    k = sub.add_parser("lock")
    k.add_argument("--sessions", required=True)
    k.add_argument("--hz", type=float, default=20.0)
    k.add_argument("--seconds", type=float, required=True)
    k.add_argument("--out", required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    lines = Path(args.sessions).read_text().splitlines()
    folders = [line.strip() for line in lines if line.strip()]
    if not folders:
        print("no sessions", file=sys.stderr)
        return 2
    if args.cmd == "replies":
        return run_replies(folders, args.count, args.rate, args.prefix, Path(args.out),
                           args.max_seconds, not args.no_heartbeat, args.part, args.parts)
    if args.cmd == "lock":
        return run_lock(folders, args.hz, args.seconds, Path(args.out))
    return run_heartbeat(folders, args.hz, args.seconds, Path(args.out))


if __name__ == "__main__":
    raise SystemExit(main())
