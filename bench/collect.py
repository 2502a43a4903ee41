"""Observing deliveries from outside the orchestrator, and turning them into latencies.

What "delivered" means here, and how its time is taken (all clocks: ``time.time()``
of the same host):

- **commit**: the writer process's ``time.time()`` right after ``COMMIT`` of the
  reply row returned (bench/agents.py). The orchestrator cannot see the row earlier.
- **recorded** (the headline latency): the commit of the ``delivered`` row in the
  session's inbound.db. inbound.db is in ``journal_mode=DELETE``, so a commit *is*
  the unlink of ``inbound.db-journal``; the bench holds a raw inotify watch
  (IN_DELETE) on each session folder and stamps the event when it reads it. In
  these scenarios nothing else writes inbound.db (no inbound messages, no acks,
  no wakes), so the k-th such commit in a session is the k-th delivery pass that
  recorded something there. Passes are told apart by ``delivered_at``, which the
  orchestrator sets to the start time of the pass (ms precision) — identical for
  all replies recorded by one pass. If the counts do not agree the bench falls
  back to "first commit at or after the pass start" and counts it as ``fallback``.
- **channel**: when the bench read the reply's line in the jsonl channel file
  (raw inotify IN_MODIFY on the file). The line is written before the record.
- **pass start**: ``delivered_at`` itself (truncated to ms), i.e. when the
  orchestrator began the pass that delivered the reply: commit→pass start is
  the detection delay (inotify + watchfiles batching, or the poll interval).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.inotify import IN_DELETE, IN_MODIFY, Inotify
from orchestrator.contract import schema

JOURNAL = "inbound.db-journal"


class Collector(threading.Thread):
    """Timestamps jsonl lines and inbound.db commits as they happen."""

    def __init__(self, jsonl: Path, folders: list[Path], *, prefix: str,
                 max_seconds: float) -> None:
        super().__init__(name="collector", daemon=True)
        self.jsonl = jsonl
        self.max_seconds = max_seconds
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.prefix = prefix
        self._seen = 0  # distinct ids with ``prefix`` on the channel
        self._ino = Inotify()
        self._jsonl_wd = self._ino.add(jsonl, IN_MODIFY)
        self._dirs: dict[int, str] = {}
        for folder in folders:
            self._dirs[self._ino.add(folder, IN_DELETE)] = str(folder)
        self._fh = open(jsonl, "rb")
        self._fh.seek(0, 2)  # only lines appended from now on
        self._buf = b""
        self.line_time: dict[str, float] = {}
        self.line_count: Counter[str] = Counter()
        self.line_folder: dict[str, str] = {}
        self.commits: dict[str, list[float]] = defaultdict(list)
        self.last_commit_at = 0.0
        self.bad_lines = 0

    @property
    def overflowed(self) -> bool:
        return self._ino.overflowed

    def _read_lines(self, now: float) -> None:
        data = self._fh.read()
        if not data:
            return
        data = self._buf + data
        *lines, self._buf = data.split(b"\n")
        root = self.jsonl.parent / "sessions"
        for raw in lines:
            try:
                rec = json.loads(raw)
                mid = rec["message_id"]
                folder = str(root / rec["agent_group"] / rec["session_id"])
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1
                continue
            with self._lock:
                self.line_count[mid] += 1
                if mid not in self.line_time:
                    self.line_time[mid] = now
                    self.line_folder[mid] = folder
                    if mid.startswith(self.prefix):
                        self._seen += 1

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._halt.is_set() and time.monotonic() < deadline:
                events = self._ino.read(0.05)
                now = time.time()
                for ev in events:
                    if ev.wd == self._jsonl_wd:
                        self._read_lines(now)
                    elif ev.name == JOURNAL and ev.wd in self._dirs:
                        self.commits[self._dirs[ev.wd]].append(now)
                        self.last_commit_at = now
            self._read_lines(time.time())
        finally:
            self._ino.close()
            self._fh.close()

    def seen(self) -> int:
        with self._lock:
            return self._seen

    def finish(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self.join(timeout)


def read_writer(path: Path) -> tuple[dict, dict[str, tuple[str, float, float]]]:
    """The writer's results: header and {message id: (folder, t_commit, t_begin)}."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    out = {}
    for line in lines[1:]:
        mid, folder, t_commit, t_begin = line.split("\t")
        out[mid] = (folder, float(t_commit), float(t_begin))
    return header, out


def read_writers(paths: list[Path]) -> tuple[dict, dict[str, tuple[str, float, float]]]:
    """Several writers' results as one: the first start, the last end, every commit."""
    header: dict = {}
    commits: dict[str, tuple[str, float, float]] = {}
    for path in paths:
        h, c = read_writer(path)
        commits.update(c)
        header = {"written": header.get("written", 0) + h["written"],
                  "t_start": min(header.get("t_start", h["t_start"]), h["t_start"]),
                  "t_end": max(header.get("t_end", h["t_end"]), h["t_end"])}
    return header, commits


def read_delivered(folders: list[str], prefix: str) -> dict[str, tuple[str, str, str]]:
    """{message id: (folder, status, delivered_at)} for this phase's replies."""
    out = {}
    for folder in folders:
        with schema.opened(Path(folder) / "inbound.db", readonly=True) as conn:
            for mid, status, at in conn.execute(
                    "SELECT message_out_id, status, delivered_at FROM delivered"
                    " WHERE message_out_id LIKE ?", (prefix + "%",)):
                out[mid] = (folder, status, at)
    return out


def count_outbound(folders: list[str], prefix: str) -> int:
    n = 0
    for folder in folders:
        with schema.opened(Path(folder) / "outbound.db", readonly=True) as conn:
            (c,) = conn.execute("SELECT COUNT(*) FROM messages_out WHERE id LIKE ?",
                                (prefix + "%",)).fetchone()
            n += c
    return n


def recorded_times(delivered: dict[str, tuple[str, str, str]],
                   commits: dict[str, list[float]]) -> tuple[dict[str, float], dict]:
    """Match each reply to the inbound.db commit that recorded it (see module doc)."""
    by_folder: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for mid, (folder, _status, at) in delivered.items():
        by_folder[folder][at].append(mid)
    out: dict[str, float] = {}
    exact = fallback = unmatched = 0
    for folder, passes in by_folder.items():
        seen = sorted(commits.get(folder, []))
        ordered = sorted(passes.items(), key=lambda kv: schema.parse_ts(kv[0]))
        if len(ordered) == len(seen):
            for (_, mids), t in zip(ordered, seen, strict=True):
                for mid in mids:
                    out[mid] = t
            exact += len(ordered)
            continue
        for at, mids in ordered:
            start = schema.parse_ts(at).timestamp()
            t = next((c for c in seen if c >= start), None)
            if t is None:
                unmatched += len(mids)
                continue
            fallback += 1
            for mid in mids:
                out[mid] = t
    return out, {"passes_matched_exactly": exact, "passes_matched_by_fallback": fallback,
                 "replies_unmatched": unmatched}


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize_ms(seconds: list[float]) -> dict:
    v = sorted(x * 1000.0 for x in seconds)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95),
            "p99": percentile(v, 99), "max": v[-1], "min": v[0], "mean": sum(v) / len(v)}
