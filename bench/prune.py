"""The retention prune under load (issue 26.1): ``python -m bench --only prune`` or
``python -m bench.prune [--sessions 10000] [--active 20] [--rate 20] [--action archive]``.

A data dir with ``--sessions`` stopped, settled sessions last active in 2020 (registry
rows written in one transaction, folders copied from one ``create_folder``'s DBs as
``bench/fixture.py`` does) and ``--active`` sessions whose agents are the bench's
synthetic writers (``bench/agents.py replies``: real SQLite commits to outbound.db at
``--rate`` replies/s overall; ``bench/host.py --agents-file`` reports them running, so
retention never takes them). ``[retention] archive_after`` (or ``delete_after``) = 1 day,
``sweep_interval`` = 40 s: the first sweep starts that long after the
start-up reconcile, so the same run measures the replies' latency without a prune (the
baseline window) and during it.

Reported: prune throughput (sessions/s, from the sweep's own log line: removed /
seconds), and reply latency p50/p99 (writer's commit → the orchestrator's
``delivered_at`` in inbound.db, same host clock) in both windows. Target: p99 during
the prune ≤ 1.2 × p99 without it. The machine's ``uptime`` load is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import tomli_w

from bench import fixture, proc
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.contract.schema import parse_ts
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import create_folder

OLD = "2020-01-01 00:00:00.000"
SWEEP_LINE = re.compile(r"retention: (\d+) archived, (\d+) deleted, (\d+) kept, (\d+) busy, "
                        r"\d+ delivered files removed in ([0-9.]+)s")


def build(data: Path, n: int, active: int) -> tuple[list[str], list[Path], float]:
    """(old session ids, active session folders, seconds)."""
    t0 = time.monotonic()
    group = fixture.GROUP
    old = [f"old{i:05d}" for i in range(n)]
    live = [f"act{i:03d}" for i in range(active)]
    with Registry(registry_path(data)) as reg:
        reg.ensure_agent_group(group)
        with reg.transaction() as c:
            c.executemany("INSERT INTO sessions (id, agent_group_id, resolution_key,"
                          " created_at) VALUES (?,?,?,?)",
                          [(sid, group, f"bench:{group}:{sid}", OLD) for sid in old])
        for sid in live:
            reg.get_or_create_session(resolution_key=f"bench:{group}:{sid}",
                                      agent_group_id=group, messaging_group_id=None,
                                      thread_id=None, new_id=sid)
    first = create_folder(data, group, live[0])
    dbs = [(p.name, p.read_bytes()) for p in (first.inbound_db, first.outbound_db)]
    root = sessions_root(data) / group
    for sid in old + live[1:]:
        fixture._write_folder(str(root / sid), dbs)
    return old, [root / sid for sid in live], time.monotonic() - t0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": _ms(pct(values, 0.5)), "p99_ms": _ms(pct(values, 0.99)),
            "max_ms": _ms(max(values) if values else None),
            "mean_ms": _ms(statistics.fmean(values) if values else None)}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def latencies(writer_out: Path, folders: list[Path]) -> list[tuple[float, float]]:
    """(commit time, latency s) of every reply the orchestrator delivered."""
    committed = {}
    for line in writer_out.read_text().splitlines()[1:]:
        mid, _, t_commit, _ = line.split("\t")
        committed[mid] = float(t_commit)
    out = []
    for folder in folders:
        conn = sqlite3.connect(f"file:{folder / 'inbound.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT message_out_id, delivered_at FROM delivered").fetchall()
        finally:
            conn.close()
        for mid, at in rows:
            if mid in committed and (when := parse_ts(at)) is not None:
                out.append((committed[mid], when.timestamp() - committed[mid]))
    return out


def run_prune(tmp: Path, n: int = 10_000, active: int = 20, rate: float = 20.0,
              baseline_s: float = 40.0, action: str = "archive", say=print,
              extra: dict | None = None) -> dict:
    data = tmp / "prune-data"
    old, folders, built = build(data, n, active)
    say(f"prune: {n} old stopped sessions + {active} active built in {built:.1f}s")
    key = "archive_after" if action == "archive" else "delete_after"
    cfg = fixture.config_dict(data, "events", 1.0)
    cfg["retention"] = {key: 86400.0, "sweep_interval": baseline_s, **(extra or {})}
    config = tmp / "prune.toml"
    config.write_text(tomli_w.dumps(cfg))
    agents = tmp / "prune-agents.txt"
    agents.write_text("".join(f"{fixture.GROUP}/{f.name}\n" for f in folders))
    sessions_file = tmp / "prune-sessions.txt"
    sessions_file.write_text("".join(f"{f}\n" for f in folders))
    ready_file, log = tmp / "prune-ready.json", tmp / "prune-orch.log"
    load_before = os.getloadavg()
    orch = proc.spawn(proc.py("-m", "bench.host", "--config", str(config), "--ready-file",
                              str(ready_file), "--agents-file", str(agents)), log)
    writer = None
    try:
        deadline = time.monotonic() + 900
        while not ready_file.exists():
            if orch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"orchestrator not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        t_ready = time.time()
        say(f"prune: orchestrator ready; baseline {baseline_s:g}s, then the sweep")
        out = tmp / "prune-replies.txt"
        writer = proc.spawn(proc.py("-m", "bench.agents", "replies", "--sessions",
                                    str(sessions_file), "--count", "1000000", "--rate",
                                    str(rate), "--prefix", "r", "--out", str(out),
                                    "--max-seconds", "1800"), tmp / "prune-writer.log")
        found = None
        deadline = time.monotonic() + baseline_s + 1200
        while found is None:
            if orch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no sweep line: {log.read_text()[-2000:]}")
            time.sleep(0.2)
            found = SWEEP_LINE.search(log.read_text(errors="replace"))
        t_end = time.time()
        load_during = os.getloadavg()
        time.sleep(min(baseline_s, 20.0))  # the window after it: the same live sessions
        proc.stop(writer)
        writer = None
    finally:
        if writer is not None:
            proc.stop(writer)
        proc.stop(orch)
    archived, deleted, kept, busy = (int(found.group(i)) for i in range(1, 5))
    seconds = float(found.group(5))
    removed = archived + deleted
    t_start = t_end - seconds - 0.2  # the line is seen up to one poll after it is written
    lat = latencies(out, folders)
    # the first seconds after start-up are the start-up's (state saved, first sweep
    # slices): the window without the prune starts 10 s in
    base = [s for t, s in lat if t_ready + 10 <= t < t_start]
    during = [s for t, s in lat if t_start <= t <= t_end]
    after = [s for t, s in lat if t_end + 1 <= t]
    b, d, a = summary(base), summary(during), summary(after)
    ratio = (d["p99_ms"] / b["p99_ms"]) if b["p99_ms"] and d["p99_ms"] else None
    left = sum(1 for sid in old if (sessions_root(data) / fixture.GROUP / sid).exists())
    result = {
        "sessions": n, "active": active, "retention": cfg["retention"], "rate_per_s": rate,
        "action": action,
        "removed": removed, "kept": kept, "busy": busy, "left_on_disk": left,
        "prune_seconds": seconds,
        "throughput_sessions_per_s": round(removed / seconds, 1) if seconds else None,
        "reply_latency_without_prune": b, "reply_latency_during_prune": d,
        "reply_latency_after_prune": a,
        "p99_ratio": round(ratio, 3) if ratio else None,
        "target_p99_ratio": 1.2, "meets_target": ratio is not None and ratio <= 1.2,
        "loadavg_before": load_before, "loadavg_during": load_during,
    }
    say(f"prune: {removed} sessions {action}d in {seconds:.1f}s = "
        f"{result['throughput_sessions_per_s']} sessions/s; reply p50/p99 ms without "
        f"{b['p50_ms']}/{b['p99_ms']} (n={b['n']}), during {d['p50_ms']}/{d['p99_ms']} "
        f"(n={d['n']}), after {a['p50_ms']}/{a['p99_ms']} (n={a['n']}): p99 "
        f"x{result['p99_ratio']} (target <= 1.2); load "
        f"{load_before[0]:.2f} -> {load_during[0]:.2f}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prune")
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--active", type=int, default=20)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--baseline", type=float, default=40.0)
    ap.add_argument("--action", choices=("archive", "delete"), default="archive")
    ap.add_argument("--duty", type=float, default=None, help="[retention] duty (default: the "
                    "orchestrator's)")
    ap.add_argument("--batch", type=int, default=None, help="[retention] batch (default: the "
                    "orchestrator's)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-prune-"))
    extra = {k: v for k, v in (("duty", args.duty), ("batch", args.batch)) if v is not None}
    try:
        result = run_prune(tmp, args.sessions, args.active, args.rate, args.baseline,
                           args.action, extra=extra or None)
    finally:
        proc.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
