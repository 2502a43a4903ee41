"""The summary: one row per figure, events vs poll, against the targets."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
       "==": operator.eq}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    get: Callable[[dict], Any]
    target: tuple[str, float] | None = None
    digits: int = 1


def _dig(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _latency_run(res: dict, n: int, agents: int) -> dict | None:
    return _dig(res, f"agents_{n}" if n == agents else f"latency_{n}", "latency")


def _lat(n: int, stat: str, agents: int) -> Callable[[dict], Any]:
    return lambda res: _dig(_latency_run(res, n, agents), "latency_ms", "commit_to_recorded", stat)


def _lost(res: dict) -> Any:
    tp = _dig(res, "agents_100", "throughput")
    if not tp or "error" in tp:
        return None
    return max(tp["lost_on_channel"], tp["lost_not_recorded"]) + tp["recorded_failed"]


def _rss(res: dict) -> Any:
    vals = [_dig(res, "idle_1000", "rss_peak_mb"), _dig(res, "latency_1000", "rss_peak_mb")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def rows(sizes: tuple[int, ...], agents: int) -> list[Row]:
    out: list[Row] = []
    for n in sizes:
        out += [
            Row(f"latency_p50_{n}", f"reply latency p50 @{n} sess", "ms", _lat(n, "p50", agents),
                ("<=", 10)),
            Row(f"latency_p95_{n}", f"reply latency p95 @{n} sess", "ms", _lat(n, "p95", agents)),
            Row(f"latency_p99_{n}", f"reply latency p99 @{n} sess", "ms", _lat(n, "p99", agents),
                ("<=", 50)),
            Row(f"latency_max_{n}", f"reply latency max @{n} sess", "ms", _lat(n, "max", agents)),
        ]
    for phase, label in (("without_locks", "no locks"), ("with_locks", "10 lockers")):
        for stat in ("p50", "p99"):
            out.append(Row(f"lockers_{phase}_{stat}", f"healthy reply {stat}, {label}", "ms",
                           lambda r, phase=phase, stat=stat: _dig(
                               r, "lockers_10", phase, "latency_ms", "commit_to_recorded",
                               stat), ("<=", 10 if stat == "p50" else 50)))
    out += [
        Row("after_quiet_p50", "reply after a quiet spell p50", "ms",
            lambda r: _dig(r, "idle_1000", "after_quiet", "latency_ms", "commit_to_recorded",
                           "p50"), None),
        Row("after_quiet_max", "reply after a quiet spell max", "ms",
            lambda r: _dig(r, "idle_1000", "after_quiet", "latency_ms", "commit_to_recorded",
                           "max"), None),
        Row("idle_cpu_pct", "idle CPU @1000 sess", "% core",
            lambda r: _dig(r, "idle_1000", "idle", "core_pct"), ("<", 1), 2),
        Row("idle_cpu_s_per_min", "idle CPU @1000 sess", "CPU-s/min",
            lambda r: _dig(r, "idle_1000", "idle", "cpu_s_per_min"), ("<", 0.6), 3),
        Row("heartbeat_1hz_pct", f"heartbeats {agents} agents @1 Hz", "% core",
            lambda r: _dig(r, f"agents_{agents}", "heartbeat_1hz", "core_pct"), ("<", 5), 2),
        Row("heartbeat_10hz_pct", f"heartbeats {agents} agents @10 Hz", "% core",
            lambda r: _dig(r, f"agents_{agents}", "heartbeat_10hz", "core_pct"), None, 2),
        Row("throughput_per_min", "throughput (flat out)", "replies/min",
            lambda r: _dig(r, f"agents_{agents}", "throughput", "delivered_per_min"),
            (">=", 10000), 0),
        Row("throughput_all_s", "throughput: time to deliver all", "s",
            lambda r: _dig(r, f"agents_{agents}", "throughput", "first_commit_to_last_recorded_s"),
            None, 2),
        # what sets the figure: the writers' own speed on a shared machine, and the
        # orchestrator's CPU per reply (issue 28: events must cost no more than poll)
        Row("throughput_writer_per_s", "throughput: writers' commits", "replies/s",
            lambda r: _dig(r, f"agents_{agents}", "throughput", "writer_rate_per_s"), None, 0),
        Row("throughput_cpu_ms", "throughput: orchestrator CPU per reply", "ms",
            lambda r: _dig(r, f"agents_{agents}", "throughput", "orchestrator_cpu",
                           "cpu_ms_per_reply"), None, 3),
        Row("throughput_lost", "throughput: lost (incl. failed)", "replies", _lost, ("==", 0), 0),
        Row("throughput_dup", "throughput: duplicated", "replies",
            lambda r: _dig(r, f"agents_{agents}", "throughput", "duplicates_on_channel"),
            ("==", 0), 0),
        Row("rss_peak_mb", "peak RSS @1000 sess", "MB", _rss, ("<", 150), 1),
        Row("startup_s", "start-up → all reconciled @1000", "s",
            lambda r: _dig(r, "idle_1000", "startup", "spawn_to_ready_s"), ("<", 2), 2),
        Row("inotify_watches", "inotify watches @1000 sess", "watches",
            lambda r: _dig(r, "idle_1000", "inotify_watches"), None, 0),
    ]
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def _passes(target: tuple[str, float] | None, v: Any) -> bool | None:
    x = _num(v)
    if target is None or x is None:
        return None
    op, bound = target
    return OPS[op](x, bound)


def summarize(results: dict[str, dict], sizes: tuple[int, ...], agents: int) -> list[dict]:
    out = []
    for row in rows(sizes, agents):
        ev = row.get(results.get("events", {}))
        po = row.get(results.get("poll", {}))
        e, p = _num(ev), _num(po)
        ratio = e / p if e is not None and p not in (None, 0.0) else None
        out.append({
            "key": row.key, "metric": row.label, "unit": row.unit,
            "target": f"{row.target[0]} {row.target[1]:g}" if row.target else None,
            "events": e, "poll": p, "ratio_events_over_poll": ratio,
            "pass_events": _passes(row.target, ev), "pass_poll": _passes(row.target, po),
            "digits": row.digits,
        })
    return out


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 10000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _ok(b: bool | None) -> str:
    return "—" if b is None else ("PASS" if b else "FAIL")


def table(summary: list[dict]) -> str:
    head = ("metric", "unit", "target", "events", "poll", "ev/poll", "events", "poll")
    body = []
    for r in summary:
        ratio = r["ratio_events_over_poll"]
        body.append((r["metric"], r["unit"], r["target"] or "—",
                     _fmt(r["events"], r["digits"]), _fmt(r["poll"], r["digits"]),
                     "n/a" if ratio is None else (f"{ratio:.3f}" if ratio < 10 else f"{ratio:.1f}"),
                     _ok(r["pass_events"]), _ok(r["pass_poll"])))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    align = ["<", "<", "<", ">", ">", ">", "^", "^"]

    def line(cells) -> str:
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))

    sep = "  ".join("-" * w for w in widths)
    title = " " * (sum(widths[:6]) + 12) + "vs target"
    return "\n".join([title, line(head), sep, *(line(b) for b in body)])


def verdict(summary: list[dict], issue13: list[dict], errors: list[str]) -> tuple[str, int]:
    """The closing line and the exit status over *every* table: the events-mode column
    of the first (``summarize`` here) and the judged column of the round-trip table
    (``rt_report.summarize``). A missed target or a failed run exits 1: a run that
    misses one cannot read as a clean pass."""
    failed = [r["metric"] for r in summary if r["pass_events"] is False]
    failed += [r["metric"] for r in issue13 if r["pass"] is False]
    line = (f"{len(failed)} target(s) missed in events mode"
            + (": " + ", ".join(failed) if failed else "")
            + (f"; errors in {', '.join(errors)}" if errors else ""))
    return line, 1 if failed or errors else 0



def target_row(goal: str, unit: str, target: tuple[str, float] | None, value: Any) -> dict:
    """One goal of a run: what it must be, what it was, whether that passes."""
    return {"goal": goal, "unit": unit,
            "target": f"{target[0]} {target[1]:g}" if target else None,
            "measured": _num(value), "pass": _passes(target, value)}


def target_table(rows: list[dict], digits: int = 2) -> str:
    """``target_row`` rows as an aligned table."""
    head = ("goal", "unit", "target", "measured", "pass")
    body = [(r["goal"], r["unit"], r["target"] or "—", _fmt(r["measured"], digits),
             _ok(r["pass"])) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    align = ["<", "<", "<", ">", "^"]
    lines = ["  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))
             for cells in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
