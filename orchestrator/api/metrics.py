"""Prometheus metrics for ``GET /metrics``.

Counters and histograms are fed by the same notifications as the event log
(``Hub.notify``); gauges (sessions by status, inotify watches, queue length) are
read when scraped, so they cost nothing between scrapes. Each Supervisor has its
own CollectorRegistry (tests run several in one process). No session ids as labels:
a label per session would grow without bound.
"""

from __future__ import annotations

import os
import platform
import re
from collections import Counter as Tally
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.contract.session_status import Status

STOP_REASONS = ("idle", "ceiling", "claim_stuck", "crash", "shutdown", "requested")
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)


def stop_reason(reason: str) -> str:
    """A status change's reason (``set_status``) → the stop reason label."""
    if reason.startswith("stopped: idle"):
        return "idle"
    if reason.startswith("killed: heartbeat"):
        return "ceiling"
    if reason.startswith("killed: claim"):
        return "claim_stuck"
    if "orchestrator shutdown" in reason:
        return "shutdown"
    if reason.startswith("stopped: requested"):
        return "requested"
    return "crash"  # the agent exited or vanished on its own


def inotify_watches(fdinfo_dir: str = "/proc/self/fdinfo") -> int:
    """Watches held by this process: one ``inotify wd:`` line per watch, per inotify fd."""
    total = 0
    try:
        names = os.listdir(fdinfo_dir)
    except OSError:
        return 0
    for name in names:
        try:
            with open(os.path.join(fdinfo_dir, name), "rb") as fh:
                total += fh.read().count(b"inotify wd:")
        except OSError:
            continue
    return total


class _Gauges(Collector):
    def __init__(self, statuses: Callable[[], Iterable[str]],
                 queue_length: Callable[[], int | None],
                 rescans: Callable[[], dict[str, int]]) -> None:
        self.statuses = statuses
        self.queue_length = queue_length
        self.rescans = rescans

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        rescans = CounterMetricFamily("orchestrator_watch_rescans", "Full rescans of the "
                                      "sessions tree, by cause (this process)", labels=["cause"])
        counts = self.rescans()
        for cause in sorted(set(counts) | {"events_lost", "watch_restarted"}):
            rescans.add_metric([_label(cause)], counts.get(cause, 0))
        yield rescans
        by_status = GaugeMetricFamily("orchestrator_sessions", "Sessions by container status",
                                      labels=["status"])
        counts = Tally(self.statuses())
        for status in sorted(set(counts) | set(Status)):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily("orchestrator_inotify_watches",
                                "inotify watches this process holds", value=inotify_watches())
        queued = self.queue_length()
        if queued is not None:
            yield GaugeMetricFamily("orchestrator_admission_queue_length",
                                    "Sessions waiting for an agent slot", value=queued)


class Metrics:
    def __init__(self, *, runtime: str, channel: str, version: str,
                 statuses: Callable[[], Iterable[str]],
                 queue_length: Callable[[], int | None] = lambda: None,
                 rescans: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runtime = runtime
        self.channel = channel
        Gauge("orchestrator_build_info", "Build information", ["version", "python"],
              registry=r).labels(version, platform.python_version()).set(1)
        self.starts = Counter("orchestrator_agent_starts", "Agent starts by runtime and result",
                              ["runtime", "result"], registry=r)
        self.start_seconds = Histogram("orchestrator_agent_start_duration_seconds",
                                       "Time to start an agent", ["runtime"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stops = Counter("orchestrator_agent_stops", "Agents stopped, by reason", ["reason"],
                             registry=r)
        self.delivered = Counter("orchestrator_replies_delivered", "Replies delivered",
                                 ["channel"], registry=r)
        self.failed = Counter("orchestrator_replies_failed", "Replies given up on", ["channel"],
                              registry=r)
        self.delay = Histogram("orchestrator_reply_delivery_delay_seconds",
                               "Reply commit (its timestamp) to delivered", ["channel"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.messages_failed = Counter("orchestrator_messages_failed",
                                       "Inbound messages failed after max_tries", registry=r)
        for reason in STOP_REASONS:  # present from the start, so rate() sees the first one
            self.stops.labels(reason)
        self.delivered.labels(channel)
        self.failed.labels(channel)
        r.register(_Gauges(statuses, queue_length, rescans))

    def observe(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "status":
            stopped = data.get("status") == Status.STOPPED
            if stopped and data.get("old") not in (None, Status.STOPPED):
                self.stops.labels(stop_reason(data.get("reason") or "")).inc()
        elif kind == "reply_delivered":
            self.delivered.labels(self.channel).inc()
            if data.get("delay_seconds") is not None:
                self.delay.labels(self.channel).observe(max(0.0, data["delay_seconds"]))
        elif kind == "reply_failed":
            self.failed.labels(self.channel).inc()
        elif kind == "message_failed":
            self.messages_failed.inc()
        elif kind == "agent_start":
            self.starts.labels(self.runtime, data["result"]).inc()
            if data["result"] == "ok":
                self.start_seconds.labels(self.runtime).observe(data["seconds"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:40] or "unknown"
