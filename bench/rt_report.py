"""The issue-13 table: round trips, paused resumes, idle agents, throughput, 10 000 sessions
(the round-trip rows with issue 28's targets).

Columns: the reference agent woken by inotify (events mode: the figure judged
against the target), the same agent polling every second (NanoClaw's design),
polling every 0.1 s (the reference agent before), and the inotify agent with the
orchestrator in ``mode = "poll"``.
"""

from __future__ import annotations

from typing import Any

from bench.report import _dig, _fmt, _num, _passes

COLS = ("inotify", "poll1s", "poll100ms", "mode=poll")


def _rt(section: str, kind: str, stat: str):
    def get(doc: dict, col: str) -> Any:
        agent, mode = ("inotify", "poll") if col == "mode=poll" else (col, "events")
        return _dig(doc, "roundtrip", section, f"{kind}_{agent}_{mode}", "latency_ms", stat)
    return get


def _step(section: str, kind: str, step: str):
    """p50 ms after the message's commit of one milestone (``roundtrip.STEPS``)."""
    def get(doc: dict, col: str) -> Any:
        agent, mode = ("inotify", "poll") if col == "mode=poll" else (col, "events")
        return _dig(doc, "roundtrip", section, f"{kind}_{agent}_{mode}", "steps_ms", step,
                    "p50")
    return get


def _idle_agent(doc: dict, col: str) -> Any:
    return None if col == "mode=poll" else _dig(doc, "roundtrip", "agent_idle_cpu", col,
                                                "core_pct")


def _main(*path: str):
    def get(doc: dict, col: str) -> Any:
        if col == "inotify":
            return _dig(doc, "results", "events", *path)
        if col == "mode=poll":
            return _dig(doc, "results", "poll", *path)
        return None
    return get


def _scale(*path: str):
    """A figure of the scale run, whatever its size (``--scale N`` → ``scale_N``)."""
    def get(doc: dict, col: str) -> Any:
        mode = {"inotify": "events", "mode=poll": "poll"}.get(col)
        runs = _dig(doc, "results", mode) if mode else None
        key = next((k for k in sorted(runs or {}) if k.startswith("scale_")), None)
        return _dig(runs, key, *path) if key else None
    return get


ROWS = [  # the round-trip targets are issue 28's
    ("warm round trip, local p50", "ms", ("<=", 10), _rt("local", "warm", "p50"), 1),
    ("warm round trip, local p99", "ms", ("<=", 20), _rt("local", "warm", "p99"), 1),
    ("warm round trip, Docker p50", "ms", ("<=", 10), _rt("docker", "warm", "p50"), 1),
    ("warm round trip, Docker p99", "ms", ("<=", 20), _rt("docker", "warm", "p99"), 1),
    ("cold round trip, local p50", "ms", ("<=", 40), _rt("local", "cold", "p50"), 1),
    ("cold round trip, local p50, no byte code before", "ms", ("<=", 40),
     _rt("local", "cold-nopyc", "p50"), 1),
    ("cold round trip, Docker p50", "ms", ("<=", 150), _rt("docker", "cold", "p50"), 0),
    ("paused → reply, Docker p50", "ms", ("<=", 15), _rt("docker", "paused", "p50"), 1),
    ("paused → reply, local p50", "ms", None, _rt("local", "paused", "p50"), 1),
    ("new session (POST) → first reply, Docker p50", "ms", ("<=", 250),
     _rt("docker", "new", "p50"), 0),
    ("new session (POST) → first reply, local p50", "ms", None, _rt("local", "new", "p50"), 0),
    # where a round trip's time goes (ms after the message's commit, p50; no targets)
    ("  warm local: agent read the message (.heartbeat)", "ms", None,
     _step("local", "warm", "woke"), 1),
    ("  warm local: reply committed", "ms", None, _step("local", "warm", "reply_commit"), 1),
    ("  warm local: host, reply commit → line", "ms", None,
     _step("local", "warm", "host_delivery"), 1),
    ("  warm Docker: reply committed", "ms", None, _step("docker", "warm", "reply_commit"), 1),
    ("  warm Docker: host, reply commit → line", "ms", None,
     _step("docker", "warm", "host_delivery"), 1),
    ("  cold local: agent spawned (.agent.pid)", "ms", None,
     _step("local", "cold", "spawned"), 1),
    ("  cold local: interpreter up (first .heartbeat)", "ms", None,
     _step("local", "cold", "woke"), 1),
    ("  cold local: reply committed", "ms", None, _step("local", "cold", "reply_commit"), 1),
    ("  cold local: host, reply commit → line", "ms", None,
     _step("local", "cold", "host_delivery"), 1),
    ("idle reference agent CPU", "% core", ("<=", 0.05), _idle_agent, 3),
    ("throughput, flat out", "replies/min", (">=", 60000),
     _main("agents_100", "throughput", "delivered_per_min"), 0),
    ("10k sessions: start-up → reconciled", "s", ("<=", 2),
     _scale("startup", "spawn_to_ready_s"), 2),
    ("10k sessions: first start (no saved state)", "s", None,
     _scale("first_start", "spawn_to_ready_s"), 2),
    ("10k sessions: idle CPU (with sweeps)", "% core", ("<=", 1),
     _scale("idle", "core_pct"), 2),
    ("10k sessions: reply latency p50", "ms", ("<=", 10),
     _scale("latency", "latency_ms", "commit_to_recorded", "p50"), 1),
    ("10k sessions: peak RSS", "MB", ("<=", 100), _scale("rss_peak_mb"), 1),
]


def _scale_label(doc: dict) -> str:
    runs = {**(_dig(doc, "results", "events") or {}), **(_dig(doc, "results", "poll") or {})}
    key = next((k for k in sorted(runs) if k.startswith("scale_")), "scale_10000")
    n = int(key.split("_")[1])
    return "10k" if n == 10000 else f"{n:,}"


def summarize(doc: dict) -> list[dict]:
    out = []
    size = _scale_label(doc)
    for label, unit, target, get, digits in ROWS:
        if label.startswith("10k sessions") and size != "10k":
            target = None  # issue 13's targets are for 10 000; the scale table judges the rest
        label = label.replace("10k sessions", f"{size} sessions")
        values = {c: _num(get(doc, c)) for c in COLS}
        out.append({"metric": label, "unit": unit,
                    "target": f"{target[0]} {target[1]:g}" if target else None,
                    "values": values, "pass": _passes(target, values["inotify"]),
                    "digits": digits})
    return out


def table(summary: list[dict]) -> str:
    head = ("metric", "unit", "target", "inotify agent", "1 s poll agent", "0.1 s poll agent",
            "mode=poll", "")
    body = [(r["metric"], r["unit"], r["target"] or "—",
             *(_fmt(r["values"][c], r["digits"]) for c in COLS),
             "—" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")) for r in summary]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    align = ["<", "<", "<", ">", ">", ">", ">", "^"]

    def line(cells) -> str:
        return "  ".join(f"{str(c):{a}{w}}"
                         for c, a, w in zip(cells, align, widths, strict=True)).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])
