"""10 000 or 100 000 sessions: real folders, a real orchestrator (``bench.host``), events mode.

(``--only scale --scale 100000``: issue 28's goals, each printed as target / measured /
pass by ``scale_targets``, with a last phase under a pretended watch budget that
leaves ~40 % of the sessions polled: the warning line, the metric's figure, and the
latency of replies to sessions spread over the whole set.)

Start-up to "every session reconciled" (of a restart: the first start, which has no
saved start-up state and passes every session, is measured and reported beside it), idle
CPU over a window that holds reconcile sweeps (2 min full, 35 s quick: the default
``sweep_interval`` is 30 s), paced reply latency from synthetic writers, and peak RSS.
The sessions have no agent (nothing is due, so the real local runtime starts nothing); a
reply from an agent-less session costs its pass one extra read of inbound.db, so the
latency is slightly pessimistic.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

from bench import fixture, report
from bench.proc import Orchestrator
from bench.scenarios import Run
from orchestrator.watch import budget


def new_scale_run(bench, n: int, mode: str) -> Run:
    """Like ``Bench.new_run``, but the sessions are created in the run's own data dir
    (no template copied afterwards): 10 000 sessions are 30 000 folders and 20 000
    DB files, and writing them once instead of twice halves the disk work the bench
    puts on a shared host before it measures anything."""
    bench._runs += 1
    run_dir = bench.tmp / f"run{bench._runs:02d}-scale{n}-{mode}"
    run_dir.mkdir()
    data = run_dir / "data"
    bench.say(f"  creating {n} sessions in {data} …")
    bench.template_seconds[n] = round(fixture.build_template(data, n), 3)
    (data / "delivered.jsonl").touch()
    t_sync = time.monotonic()
    os.sync()
    bench.sync_seconds[run_dir.name] = round(time.monotonic() - t_sync, 3)
    config = run_dir / "config.toml"
    fixture.write_config(config, data, mode, bench.p.poll_interval, bench.overrides)
    return Run(f"scale{n}", mode, n, run_dir, data, fixture.session_folders(data, n),
               Orchestrator(run_dir, config))


def children_cpu(run: Run) -> float:
    """CPU seconds of the orchestrator's reaped children: at start-up, the child that
    adds a big group's watches (``watch.bulk_add``), which ``Orchestrator.cpu`` (the
    process's own) leaves out."""
    t = run.orch.ps.cpu_times()
    return t.children_user + t.children_system


def first_start(bench, run: Run) -> dict:
    """The data dir's first ``orchestrator run``: no start-up state is saved yet, so
    every session gets its full pass; then a clean stop, which saves it. "up" (the
    ``orchestrator up`` line: watch in place, sessions tracked, serving; the passes
    run behind event-driven work) is what the first-start goal is judged on; "ready"
    (every pass done) is reported beside it. The restart after it is ``Bench.running``."""
    run.orch.start()
    out: dict = {}
    try:
        ready = run.orch.wait_ready(bench.p.ready_timeout)
        t = ready["times"]
        out = {"spawn_to_ready_s": t["ready"] - run.orch.t_spawn,
               "spawn_to_up_s": (t["up"] - run.orch.t_spawn) if "up" in t else None,
               "serve_to_ready_s": t["ready"] - t["serve"],
               "cpu_s_at_ready": run.orch.cpu(), "children_cpu_s_at_ready": children_cpu(run),
               "rss_peak_mb": run.orch.rss_peak_mb()}
    finally:
        t_stop = time.monotonic()
        out["exit_code"] = run.orch.stop()
        out["stop_s"] = round(time.monotonic() - t_stop, 3)
        run.orch.ready_file.unlink(missing_ok=True)
    return out


def over_budget(bench, run: Run, replies: int, rate: float) -> dict:
    """The same data dir again with a pretended watch budget (``bench.host
    --watch-budget``) that covers ~60 % of the sessions: the rest are polled. Replies
    to sessions spread over all of them (so ~40 % go to polled ones, whose first reply
    waits up to one poll round) must all be delivered."""
    n = run.n
    # budget.usable(pretended) ≈ the root, the group and 60 % of the sessions
    pretended = max(int((0.6 * n + 2) / 0.95) + 1, int(0.6 * n) + 2 + budget.RESERVE_MIN)
    run.orch.ready_file.unlink(missing_ok=True)  # the last run's: not this one's "ready"
    run.orch = Orchestrator(run.dir, run.orch.config, None, pretended)
    run.info = {}
    bench.say(f"  over budget: pretending a watch limit of {pretended} for {n} sessions")
    with bench.running(run) as info:
        info["pretended_max_user_watches"] = pretended
        state = budget.read_state(run.data) or {}
        info["polled_sessions"] = state.get("polled_sessions")
        info["status_line"] = budget.status_line(state)
        step = max(1, n // replies)
        info["latency"] = bench.replies(run, run.folders[step // 2::step][:replies],
                                        count=replies, rate=rate, prefix=f"O{n}x",
                                        name=f"over-budget-{n}")
        lat = info["latency"]["latency_ms"]["commit_to_recorded"]
        p50, top = lat.get("p50", float("nan")), lat.get("max", float("nan"))
        bench.say(f"  over budget: {info['polled_sessions']} sessions polled; latency p50 "
                  f"{p50:.0f} ms, max {top:.0f} ms")
    info["warning_lines"] = [s for s in info["log"]["samples"]
                             if "inotify watch budget too small" in s]
    return info


def run_scale(bench, n: int, mode: str, idle_seconds: float, replies: int, rate: float,
              budget_phase: bool = False) -> dict:
    bench.say(f"[{mode}] {n} sessions: start-up, idle CPU over {idle_seconds:g}s (with sweeps), "
              f"{replies} paced replies")
    run = new_scale_run(bench, n, mode)
    bench.p = replace(bench.p, ready_timeout=max(bench.p.ready_timeout, 900.0))
    first = first_start(bench, run)
    bench.say(f"  first start (no saved state, a full pass each): up {first['spawn_to_up_s']:.2f}s,"
              f" ready {first['spawn_to_ready_s']:.2f}s after spawn, {first['cpu_s_at_ready']:.2f} "
              "CPU-s; restarting")
    keep, bench.keep = bench.keep, bench.keep or budget_phase  # the budget phase reuses it
    try:
        with bench.running(run) as info:
            info["startup"]["children_cpu_s"] = children_cpu(run)  # (no agent: the walk's)
            info["first_start"] = first
            # steady state: after the first sweep round (start-up work, the first slices)
            time.sleep(bench.sweep_interval)
            w = bench._cpu_window(run, idle_seconds, f"idle{n}")
            w["sweeps_in_window"] = bench._sweeps_in(run, w["t0"], w["t1"])
            info["idle"] = w
            bench.say(f"  idle: {w['core_pct']:.2f}% of a core ({w['sweeps_in_window']} sweep "
                      "slice round(s) in window)" + bench._load_note(w["machine"]))
            step = max(1, n // min(100, replies))
            active = run.folders[::step][:min(100, replies)]  # 100 active sessions among n
            info["latency"] = bench.replies(run, active, count=replies, rate=rate,
                                            prefix=f"X{n}x", name=f"latency-{n}")
            lat = info["latency"]["latency_ms"]["commit_to_recorded"]
            if lat.get("n"):
                bench.say(f"  latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")
        if budget_phase:
            info["over_budget"] = over_budget(bench, run, min(replies, 100), rate / 2)
    finally:
        bench.keep = keep
        if not keep:
            shutil.rmtree(run.dir, ignore_errors=True)
    info["targets"] = scale_targets(n, info)
    return info


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _lost(lat: dict | None) -> int | None:
    if not isinstance(lat, dict) or "replies_written" not in lat:
        return None
    return lat.get("lost_not_recorded", 0)


def scale_targets(n: int, info: dict) -> list[dict]:
    """Issue 28's goals for this size: one row each, target / measured / pass."""
    big = n >= 100_000
    rows = [
        ("first start (no saved state) → up", "s", ("<=", 10 if big else 2),
         _get(info, "first_start", "spawn_to_up_s")),
        ("first start → every session passed", "s", None,
         _get(info, "first_start", "spawn_to_ready_s")),
        ("restart → every session reconciled", "s", ("<=", 2) if big else None,
         _get(info, "startup", "spawn_to_ready_s")),
        ("restart CPU (process, at ready)", "CPU-s", None, _get(info, "startup", "cpu_s_at_ready")),
        ("restart CPU (its start-up child)", "CPU-s", None,
         _get(info, "startup", "children_cpu_s")),
        ("steady idle CPU (after a sweep round)", "% core", ("<=", 1 if big else 0.5),
         _get(info, "idle", "core_pct")),
        ("peak RSS", "MB", ("<=", 300) if big else None, _get(info, "rss_peak_mb")),
        ("reply p50, 100 active sessions", "ms", ("<=", 10),
         _get(info, "latency", "latency_ms", "commit_to_recorded", "p50")),
        ("reply p99, 100 active sessions", "ms", ("<=", 50),
         _get(info, "latency", "latency_ms", "commit_to_recorded", "p99")),
        ("replies lost", "replies", ("==", 0), _lost(_get(info, "latency"))),
        ("inotify watches", "watches", None, _get(info, "inotify_watches")),
    ]
    ob = info.get("over_budget")
    if ob is not None:
        rows += [
            ("over budget: warning lines", "lines", ("==", 1), len(ob.get("warning_lines", []))),
            ("over budget: sessions polled (metric)", "sessions", (">", 0),
             ob.get("polled_sessions")),
            ("over budget: replies lost", "replies", ("==", 0), _lost(ob.get("latency"))),
            ("over budget: reply p50 (~40 % polled)", "ms", None,
             _get(ob, "latency", "latency_ms", "commit_to_recorded", "p50")),
            ("over budget: reply max", "ms", None,
             _get(ob, "latency", "latency_ms", "commit_to_recorded", "max")),
        ]
    return [report.target_row(goal, unit, target, value) for goal, unit, target, value in rows]
