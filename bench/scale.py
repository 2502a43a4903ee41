"""10 000 sessions: real folders, a real orchestrator (``bench.host``), events mode.

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
import time
from dataclasses import replace

from bench import fixture
from bench.proc import Orchestrator
from bench.scenarios import Run


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


def first_start(bench, run: Run) -> dict:
    """The data dir's first ``orchestrator run``: no start-up state is saved yet, so
    every session gets its full pass; then a clean stop, which saves it. The start-up
    the target is judged on is the restart after it (``Bench.running``), as when a
    host with 10 000 sessions restarts."""
    run.orch.start()
    out: dict = {}
    try:
        ready = run.orch.wait_ready(bench.p.ready_timeout)
        t = ready["times"]
        out = {"spawn_to_ready_s": t["ready"] - run.orch.t_spawn,
               "serve_to_ready_s": t["ready"] - t["serve"],
               "cpu_s_at_ready": run.orch.cpu(), "rss_peak_mb": run.orch.rss_peak_mb()}
    finally:
        t_stop = time.monotonic()
        out["exit_code"] = run.orch.stop()
        out["stop_s"] = round(time.monotonic() - t_stop, 3)
        run.orch.ready_file.unlink(missing_ok=True)
    return out


def run_scale(bench, n: int, mode: str, idle_seconds: float, replies: int, rate: float) -> dict:
    bench.say(f"[{mode}] {n} sessions: start-up, idle CPU over {idle_seconds:g}s (with sweeps), "
              f"{replies} paced replies")
    run = new_scale_run(bench, n, mode)
    bench.p = replace(bench.p, ready_timeout=max(bench.p.ready_timeout, 300.0))
    first = first_start(bench, run)
    bench.say(f"  first start (no saved state, a full pass each): ready "
              f"{first['spawn_to_ready_s']:.2f}s after spawn, {first['cpu_s_at_ready']:.2f} CPU-s; "
              "restarting")
    with bench.running(run) as info:
        info["first_start"] = first
        w = bench._cpu_window(run, idle_seconds, f"idle{n}")
        w["sweeps_in_window"] = bench._sweeps_in(run, w["t0"], w["t1"])
        info["idle"] = w
        bench.say(f"  idle: {w['core_pct']:.2f}% of a core ({w['sweeps_in_window']} sweep(s) in "
                  "window)" + bench._load_note(w["machine"]))
        step = max(1, n // replies)
        info["latency"] = bench.replies(run, run.folders[::step][:replies], count=replies,
                                        rate=rate, prefix=f"X{n}x", name=f"latency-{n}")
        lat = info["latency"]["latency_ms"]["commit_to_recorded"]
        if lat.get("n"):
            bench.say(f"  latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")
    return info
