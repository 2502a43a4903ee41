"""The last hour of the fleet, kept in memory for the console's plots (``GET /v1/fleet``).

Why here and not in an external time-series store: the operator's console must draw
"running agents, queue length, reply delay, agent starts over the last hour" from the
orchestrator alone. The numbers already exist as Prometheus metrics (``Metrics``, fed
by the hub's notifications), so a sample is a read of that registry every
``interval`` seconds: gauges as they are, counters and histograms as the difference
since the previous sample. The ring holds one hour (360 samples at 10 s): bounded
memory whatever the fleet does, and lost on a restart (the event log and the
registry, not this, are the record).

Delay quantiles are estimated from the histogram's buckets the way Prometheus's
``histogram_quantile`` does (linear inside a bucket): exact enough for a plot, and
no per-reply list is kept.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from loguru import logger

from orchestrator.api.metrics import Metrics

INTERVAL = 10.0
WINDOW = 3600.0

# counter families read (summed over their labels), by the name of the sample they feed
COUNTERS = {"delivered": "orchestrator_replies_delivered_total",
            "failed": "orchestrator_replies_failed_total",
            "messages_failed": "orchestrator_messages_failed_total",
            "start_sum": "orchestrator_agent_start_duration_seconds_sum",
            "starts": "orchestrator_agent_start_duration_seconds_count"}
DELAY_BUCKETS = "orchestrator_reply_delivery_delay_seconds_bucket"


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the plots: gauges at ``t``, counts since the previous point."""

    t: float  # Unix time, seconds
    running: int
    idle: int
    queued: int | None  # None: no admission gate reports one
    delivered: int
    failed: int
    messages_failed: int
    delay_p50: float | None  # seconds; None when no reply was delivered in the step
    delay_p99: float | None
    starts: int
    start_seconds: float | None  # mean time to start an agent in the step


@dataclass(frozen=True, slots=True)
class Raw:
    """What one read of the metrics registry gives: the running totals."""

    running: int
    idle: int
    queued: int | None
    counters: dict[str, float]
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), le ascending


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: the q-quantile of cumulative ``(le, count)`` buckets
    (the last one +Inf), linear inside the bucket it falls in. Pure."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower  # beyond the last finite bound: that bound is all we know
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = (le if not math.isinf(le) else lower), count
    return lower


def read(metrics: Metrics) -> Raw:
    """The totals now, from one collect of the registry (in-memory, no I/O but the
    inotify count's /proc read)."""
    counters = {k: 0.0 for k in COUNTERS}
    names = {v: k for k, v in COUNTERS.items()}
    by_le: dict[float, float] = {}
    running = idle = 0
    queued: int | None = None
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name in names:
                counters[names[s.name]] += s.value
            elif s.name == DELAY_BUCKETS:
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
            elif s.name == "orchestrator_sessions":
                if s.labels.get("status") == "running":
                    running = int(s.value)
                elif s.labels.get("status") == "idle":
                    idle = int(s.value)
            elif s.name == "orchestrator_admission_queue_length":
                queued = int(s.value)
    return Raw(running, idle, queued, counters, tuple(sorted(by_le.items())))


def step(prev: Raw | None, now: Raw, t: float) -> Sample:
    """The sample between two reads (the first read: counts of zero). Pure."""
    def delta(key: str) -> float:
        return max(0.0, now.counters[key] - (prev.counters[key] if prev else now.counters[key]))

    before = dict(prev.buckets) if prev else dict(now.buckets)
    diff = tuple((le, max(0.0, c - before.get(le, 0.0))) for le, c in now.buckets)
    starts = int(delta("starts"))
    return Sample(t=round(t, 3), running=now.running, idle=now.idle, queued=now.queued,
                  delivered=int(delta("delivered")), failed=int(delta("failed")),
                  messages_failed=int(delta("messages_failed")),
                  delay_p50=_round(quantile(0.5, diff)), delay_p99=_round(quantile(0.99, diff)),
                  starts=starts,
                  start_seconds=_round(delta("start_sum") / starts) if starts else None)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def totals(samples: Iterable[Sample], since: float) -> dict[str, int]:
    """Delivered, failed replies and failed messages in the samples at or after
    ``since`` (the tiles' "last hour"). Pure."""
    out = {"delivered": 0, "failed": 0, "messages_failed": 0}
    for s in samples:
        if s.t >= since:
            out["delivered"] += s.delivered
            out["failed"] += s.failed
            out["messages_failed"] += s.messages_failed
    return out


class History:
    """The ring of samples and the task that fills it."""

    def __init__(self, metrics: Metrics, interval: float = INTERVAL,
                 window: float = WINDOW) -> None:
        self.metrics = metrics
        self.interval = interval
        self.ring: deque[Sample] = deque(maxlen=int(window // interval) + 1)
        self._last: Raw | None = None
        self._task: asyncio.Task | None = None

    def take(self) -> Sample:
        """Read the metrics now and append the step since the previous read."""
        raw = read(self.metrics)
        sample = step(self._last, raw, time.time())
        self._last = raw
        self.ring.append(sample)
        return sample

    def peek(self) -> Sample:
        """The step from the last sample to now, not kept: the plots' live end."""
        return step(self._last, read(self.metrics), time.time())

    def samples(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.ring] + [asdict(self.peek())]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet-history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.take()
            except Exception as exc:  # noqa: BLE001 - a plot gap, never a dead sampler
                logger.warning("fleet history: a sample failed ({}); the plots show a gap",
                               exc)
            await asyncio.sleep(self.interval)
