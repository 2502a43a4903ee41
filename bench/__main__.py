"""``python -m bench [--quick] [--out bench/results/latest.json]`` — see bench/README.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from bench import fixture, machine, proc, report, roundtrip, rt_report
from bench.scale import run_scale
from bench.scenarios import FULL, QUICK, Bench

RUNS = ("idle", "latency1", "latency1000", "agents", "lockers", "budget", "roundtrip", "scale",
        "prune")


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _clean(obj):
    """JSON-safe: NaN/inf become null, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _noisy(results: dict, limit: float = 0.15) -> list[tuple[str, float]]:
    """Windows in which programs other than the bench's used > ``limit`` cores."""
    found: list[tuple[str, float]] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key in ("machine", "machine_load"):
                sub = node.get(key)
                f = sub.get("foreign_cores") if isinstance(sub, dict) else None
                if f is not None and f > limit:
                    found.append((path, f))
            for k, v in node.items():
                if k not in ("machine", "machine_load", "series", "profile"):
                    walk(v, f"{path}/{k}" if path else k)

    walk(results, "")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench",
                                 description="Benchmark the orchestrator (events vs poll).")
    ap.add_argument("--quick", action="store_true", help="smaller counts and windows (< 3 min)")
    ap.add_argument("--out", default="bench/results/latest.json", help="JSON results path")
    ap.add_argument("--tmp", default=None, help="parent folder for the temporary data dirs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dirs and logs")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of runs: {','.join(RUNS)}")
    ap.add_argument("--modes", default="events,poll", help="watch modes to run")
    ap.add_argument("--no-docker", action="store_true",
                    help="skip the Docker round trips (they need an engine and the agent image)")
    ap.add_argument("--scale", type=int, default=10000, metavar="N",
                    help="sessions of the scale run (default 10000)")
    ap.add_argument("--scale-budget", action="store_true",
                    help="the scale run's last phase under a pretended watch budget that "
                         "leaves ~40%% of the sessions polled (always at --scale >= 100000)")
    ap.add_argument("--profile", nargs="?", const="cprofile", choices=("cprofile", "py-spy"),
                    default=None,
                    help="profile the orchestrator during each window (cProfile on its event "
                         "loop thread, or py-spy); slows it: figures are marked 'profiled'")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds until other programs "
                         "on the host use < 0.1 core (default 0: measure at once)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override an orchestrator config key (what-if experiments only; "
                         "the targets are judged on the defaults)")
    args = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    for item in args.set:
        try:
            section, key, value = fixture.parse_override(item)
        except ValueError as exc:
            ap.error(str(exc))
        overrides.setdefault(section, {})[key] = value

    only = set(args.only.split(",")) if args.only else None
    if only and only - set(RUNS):
        ap.error(f"--only: unknown run(s) {sorted(only - set(RUNS))}; choose from {RUNS}")
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"events", "poll"}:
        ap.error("--modes: events and/or poll")
    params = replace(QUICK if args.quick else FULL, modes=modes)
    try:
        fixture.effective_config("events", params.poll_interval, overrides)
    except ValueError as exc:  # ConfigError: a bad --set
        ap.error(str(exc))

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-", dir=args.tmp))
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    profiler = None
    if args.profile:
        from bench.profile import make_profiler
        profiler = make_profiler(args.profile, out.parent / "profiles")
    bench = Bench(params, tmp, keep=args.keep, profiler=profiler, overrides=overrides,
                  wait_quiet=args.wait_quiet)
    bench.say(f"orchestrator bench ({'quick' if args.quick else 'full'}), modes {', '.join(modes)},"
              f" temp {tmp}")
    if overrides:
        bench.say(f"NOTE: config overrides {overrides}: a what-if run, not the defaults")
    if args.profile:
        bench.say(f"NOTE: profiling with {args.profile}: figures are inflated by the profiler")
    complete = False
    rc = 0
    info = machine.describe(tmp)
    try:
        bench.say(f"machine: {info['cores_logical']} cores, {info['cpu_model']}, Python "
                  f"{info['python']}, watchfiles {info['watchfiles']}, fs {info['bench_tmp_fs']}")
        bench.run_all(only)
        if only is None or "roundtrip" in only:
            why = None if args.no_docker else roundtrip.docker_available()
            if why:
                bench.say(f"Docker round trips skipped: {why}")
            rts = roundtrip.RoundTrips(bench, roundtrip.RT_QUICK if args.quick
                                       else roundtrip.RT_FULL)
            bench.extra["roundtrip"] = rts.run_all(docker=not args.no_docker and why is None)
        if (only is None and not args.quick) or (only is not None and "scale" in only):
            # 10 000 session folders take minutes to create on a busy disk: the full
            # run (or --only scale) measures them, --quick does not
            idle_s = 35.0 if args.quick else 120.0
            for mode in modes:
                if mode == "poll" and args.quick:
                    continue  # 10 000 sessions polled: the full run measures it
                bench._guard(mode, f"scale_{args.scale}", lambda mode=mode: run_scale(
                    bench, args.scale, mode, idle_s, 40 if args.quick else 200,
                    20.0 if args.quick else 25.0,
                    budget_phase=args.scale >= 100_000 or args.scale_budget))
        if (only is None and not args.quick) or (only is not None and "prune" in only):
            # 10 000 sessions archived beside live ones: minutes, so never in --quick
            from bench.prune import run_prune

            try:
                bench.extra["prune"] = run_prune(tmp, 10_000, say=bench.say)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the rest
                bench.say(f"  !! prune failed: {exc}")
                bench.extra["prune"] = {"error": f"{type(exc).__name__}: {exc}"}
        complete = True
    except KeyboardInterrupt:
        bench.say("interrupted: stopping child processes and removing temp files")
        rc = 130
    finally:
        proc.kill_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            bench.say(f"kept {tmp}")

    summary = report.summarize(bench.results, params.sizes, params.agents)
    noisy = _noisy(bench.results)
    doc = {
        "bench": "orchestrator",
        "complete": complete,
        "quick": args.quick,
        "profiled": args.profile,
        "config_overrides": overrides or None,
        "started_at": started.isoformat(),
        "duration_s": time.monotonic() - t0,
        "machine": info | {"loadavg_at_end": os.getloadavg()},
        "code": machine.code_state(),
        "settings": {
            "orchestrator_config": {
                "watch": asdict(bench.config.watch) | {"mode": "events | poll"},
                "lifecycle": asdict(bench.config.lifecycle),
                "delivery": asdict(bench.config.delivery) | {"path": "<data_dir>/delivered.jsonl"},
                "runtime": "local (real LocalRuntime) when no synthetic agents; "
                           "synthetic (bench/host.py) when the writers play the agents",
                "everything_else": "defaults (orchestrator/config/model.py)",
                "overrides": overrides or None,
            },
            "bench": asdict(params),
            "only": sorted(only) if only else None,
            "template_build_s": bench.template_seconds,
            "os_sync_before_run_s": bench.sync_seconds,
            "wait_quiet_s": args.wait_quiet, "quiet_waits_s": bench.quiet_waits,
            "latency_definition": "writer time.time() after COMMIT of the messages_out row → "
                                  "commit of its delivered row in inbound.db (unlink of "
                                  "inbound.db-journal seen by inotify); same host clock",
        },
        "summary": summary,
        "roundtrip": bench.extra.get("roundtrip"),
        "shared_host_windows": [{"window": k, "foreign_cores": v} for k, v in noisy],
        "results": bench.results,
        "extra": {k: v for k, v in bench.extra.items() if k != "roundtrip"},
    }
    doc["summary_issue13"] = rt_report.summarize(doc)
    if not complete:  # never replace a complete result with an interrupted one
        out = out.with_name(out.stem + ".partial.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(doc), indent=2, default=str) + "\n")
    print()
    print(report.table(summary))
    print("\nround trips, paused agents, idle agents, 10 000 sessions (issue 13; the inotify "
          "column in events mode is judged):")
    print(rt_report.table(doc["summary_issue13"]))
    sweeps = {m: (bench.results.get(m, {}).get("idle_1000", {}).get("idle") or {})
              .get("sweeps_in_window") for m in modes}
    if any(v == 0 for v in sweeps.values()):
        print(f"\nnote: the idle window held no reconcile sweep (one every "
              f"{bench.sweep_interval:g}s); the full run's {FULL.idle_seconds:g}s window holds "
              "one, which is the idle figure to quote")
    fb = bench.extra.get("budget_fallback")
    if fb and "error" not in fb:
        lat = fb.get("latency", {}).get("latency_ms", {}).get("commit_to_recorded", {})
        written = fb.get("latency", {}).get("replies_written", 0)
        lost = fb.get("latency", {}).get("lost_not_recorded", 0)
        print(f"\nwatch budget too small (pretended max_user_watches="
              f"{fb.get('pretended_max_user_watches')}): mode {fb.get('watch_mode')}, "
              f"{fb.get('inotify_watches')} inotify watches, warning logged: "
              f"{'yes' if fb.get('warning_logged') else 'NO'}, "
              f"replies still delivered: {written - lost}/{written}, p50 "
              f"{lat.get('p50', float('nan')):.0f} ms")
    if noisy:
        worst = max(noisy, key=lambda kv: kv[1])
        shown = ", ".join(f"{k} ({v:.2f})" for k, v in noisy) if len(noisy) <= 4 else (
            f"{len(noisy)} windows, worst {worst[0]} ({worst[1]:.2f} cores); see "
            "shared_host_windows in the JSON")
        print(f"\nSHARED HOST: other programs used > 0.15 core during {shown}. "
              "Those figures are pessimistic (CPU and fsync contention).")
    scale_rows: list[dict] = []
    for m, res in bench.results.items():
        for key, v in res.items():
            if key.startswith("scale_") and isinstance(v, dict) and v.get("targets"):
                print(f"\n{key.replace('_', ' ')} sessions ({m} mode, issue 28's goals):")
                print(report.target_table(v["targets"]))
                scale_rows += v["targets"]
    errors = [f"{m}/{k}" for m, res in bench.results.items() for k, v in res.items()
              if isinstance(v, dict) and "error" in v]
    line, verdict_rc = report.verdict(summary, doc["summary_issue13"], errors)
    prune = bench.extra.get("prune")
    if isinstance(prune, dict) and prune.get("targets"):
        print("\nprune of 10 000 stopped sessions beside live ones (issue 26's goals):")
        print(report.target_table(prune["targets"]))
        scale_rows += prune["targets"]
    missed = [r["goal"] for r in scale_rows if r["pass"] is False]
    if missed:
        line += f"; scale/prune goals missed: {', '.join(missed)}"
        verdict_rc = 1
    print("\n" + line)
    if not complete:
        print("INCOMPLETE: interrupted; the figures above cover only the runs that finished")
    print(f"results: {out}  (total {time.monotonic() - t0:.1f}s)")
    return rc or verdict_rc


if __name__ == "__main__":
    sys.exit(main())
