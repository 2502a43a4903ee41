"""10 000 sessions: real folders, a real orchestrator (``bench.host``), events mode.

Start-up to "every session reconciled", idle CPU over a window that holds reconcile
sweeps (2 min full, 35 s quick: the default ``sweep_interval`` is 30 s), paced reply
latency from synthetic writers, and peak RSS. The sessions have no agent (nothing is
due, so the real local runtime starts nothing); a reply from an agent-less session
costs its pass one extra read of inbound.db, so the latency is slightly pessimistic.
"""

from __future__ import annotations


def run_scale(bench, n: int, mode: str, idle_seconds: float, replies: int, rate: float) -> dict:
    bench.say(f"[{mode}] {n} sessions: start-up, idle CPU over {idle_seconds:g}s (with sweeps), "
              f"{replies} paced replies")
    run = bench.new_run(f"scale{n}", n, mode, agents=False)
    with bench.running(run) as info:
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
