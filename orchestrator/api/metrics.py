"""Prometheus metrics for ``GET /metrics``.

Counters and histograms are fed by the same notifications as the event log
(``Hub.notify``); gauges (sessions by status, inotify watches, queue length) and the
webhook's response tally are read when scraped, so they cost nothing between
scrapes. Each Supervisor has its own CollectorRegistry (tests run several in one
process), with the standard ``process_*`` and ``python_*`` collectors on it.

Labels stay bounded: no session ids; ``agent_group`` only takes the groups the config
names (``[groups.*]``) plus ``default``, anything else is ``other`` (agents and API
clients choose group names freely); HTTP requests are labelled by the route's
template (``/v1/sessions/{session_id}``), never the raw path, ``unmatched`` when no
route matched.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections import Counter as Tally
from typing import Any, Callable, Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.contract.session_status import Status

STOP_REASONS = ("idle", "ceiling", "claim_stuck", "crash", "shutdown", "requested", "max_run")
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)
WAIT_BUCKETS = (.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MEMORY_BUCKETS = tuple(float(2 ** n) for n in range(20, 36, 2))  # 1 MiB … 32 GiB
HTTP_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
DEFAULT_GROUP = "default"
OTHER_GROUP = "other"
UNMATCHED = "unmatched"


def stop_reason(reason: str) -> str:
    """A status change's reason (``set_status``) → the stop reason label."""
    if reason.startswith(("stopped: max_run", "killed: max_run")):
        return "max_run"
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
                 rescans: Callable[[], dict[str, int]],
                 webhook_responses: Callable[[], dict[str, int]] | None,
                 egress: Callable[[], dict[tuple[str, str], int]] | None = None,
                 watch_state: Callable[[], dict[str, int]] = dict) -> None:
        self.egress = egress
        self.watch_state = watch_state
        self.statuses = statuses
        self.queue_length = queue_length
        self.rescans = rescans
        self.webhook_responses = webhook_responses

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        rescans = CounterMetricFamily("orchestrator_watch_rescans", "Full rescans of the "
                                      "sessions tree, by cause (this process)", labels=["cause"])
        counts = self.rescans()
        for cause in sorted(set(counts) | {"events_lost", "watch_restarted"}):
            rescans.add_metric([_label(cause)], counts.get(cause, 0))
        yield rescans
        state = self.watch_state()
        yield GaugeMetricFamily("orchestrator_watch_polled_sessions", "Session folders past "
                                "the inotify watch budget, polled instead of watched (0: "
                                "every one is watched; see README, 'inotify limits')",
                                value=state.get("polled_sessions", 0))
        yield GaugeMetricFamily("orchestrator_watch_inotify_watches", "inotify watches this "
                                "process holds", value=state.get("watches", 0))
        if self.webhook_responses is not None:
            responses = CounterMetricFamily(
                "orchestrator_webhook_responses", "Webhook POSTs by the receiver's HTTP "
                "status code (code=\"error\": no answer: refused, reset, timed out)",
                labels=["code"])
            for code, n in sorted(self.webhook_responses().items()):
                responses.add_metric([code], n)
            yield responses
        if self.egress is not None:
            egress = CounterMetricFamily(
                "orchestrator_egress_requests", "Egress gateway requests and refusals, by "
                "agent group and result (ok, tunnel, host_refused, no_token, bad_token, "
                "revoked_token, other_group, limited, too_large, bad_request, no_key, "
                "upstream_error, upstream_4xx, upstream_5xx, overloaded)",
                labels=["agent_group", "result"])
            for (group, result), n in sorted(self.egress().items()):
                egress.add_metric([group, result], n)
            yield egress
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


def group_label(group: str | None, known: frozenset[str]) -> str:
    """The ``agent_group`` label: a configured group or ``default`` as itself, any other
    name ``other`` (the label set stays as small as the config)."""
    return group if group is not None and (group in known or group == DEFAULT_GROUP) \
        else OTHER_GROUP


class Metrics:
    def __init__(self, *, runtime: str, channel: str, version: str,
                 statuses: Callable[[], Iterable[str]],
                 queue_length: Callable[[], int | None] = lambda: None,
                 rescans: Callable[[], dict[str, int]] = dict,
                 groups: Iterable[str] = (),
                 webhook_responses: Callable[[], dict[str, int]] | None = None,
                 egress: Callable[[], dict[tuple[str, str], int]] | None = None,
                 watch_state: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)  # process_*, python_info, python_gc_*: this process's
        self.runtime = runtime
        self.channel = channel
        self.groups = frozenset(groups)
        labels = sorted(self.groups | {DEFAULT_GROUP, OTHER_GROUP})
        Gauge("orchestrator_build_info", "Build information", ["version", "python"],
              registry=r).labels(version, platform.python_version()).set(1)
        self.starts = Counter("orchestrator_agent_starts", "Agent starts by runtime and result",
                              ["runtime", "result", "agent_group"], registry=r)
        self.start_seconds = Histogram("orchestrator_agent_start_duration_seconds",
                                       "Time to start an agent", ["runtime", "agent_group"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.admission_wait = Histogram(
            "orchestrator_admission_wait_seconds", "From when a session's oldest work became "
            "due to the start of its agent (queueing behind [runtime] max_agents included)",
            ["agent_group"], buckets=WAIT_BUCKETS, registry=r)
        self.stops = Counter("orchestrator_agent_stops", "Agents stopped, by reason",
                             ["reason", "agent_group"], registry=r)
        self.delivered = Counter("orchestrator_replies_delivered", "Replies delivered",
                                 ["channel", "agent_group"], registry=r)
        self.failed = Counter("orchestrator_replies_failed", "Replies given up on",
                              ["channel", "agent_group"], registry=r)
        self.delay = Histogram("orchestrator_reply_delivery_delay_seconds",
                               "Reply commit (its timestamp) to delivered",
                               ["channel", "agent_group"], buckets=LATENCY_BUCKETS, registry=r)
        self.messages_failed = Counter("orchestrator_messages_failed",
                                       "Inbound messages failed after max_tries",
                                       ["agent_group"], registry=r)
        self.run_cpu = Counter("orchestrator_agent_cpu_seconds", "CPU seconds (user + system) "
                               "of ended agent runs", ["agent_group"], registry=r)
        self.run_peak = Histogram("orchestrator_agent_peak_memory_bytes", "Peak resident "
                                  "memory of each ended agent run", ["agent_group"],
                                  buckets=MEMORY_BUCKETS, registry=r)
        self.run_wall = Histogram("orchestrator_agent_run_seconds", "Wall time of each ended "
                                  "agent run (from its start or adoption)", ["agent_group"],
                                  buckets=WAIT_BUCKETS, registry=r)
        self.removed = Counter("orchestrator_sessions_removed", "Sessions archived or "
                               "deleted by retention or by hand", ["action", "agent_group"],
                               registry=r)
        self.http_seconds = Histogram(
            "orchestrator_http_request_duration_seconds", "HTTP API requests, by route "
            "template, method and status code (an event stream counts until it ends)",
            ["route", "method", "code"], buckets=HTTP_BUCKETS, registry=r)
        for group in labels:  # present from the start, so rate() sees the first one
            for reason in STOP_REASONS:
                self.stops.labels(reason, group)
            self.delivered.labels(channel, group)
            self.failed.labels(channel, group)
            self.messages_failed.labels(group)
        r.register(_Gauges(statuses, queue_length, rescans, webhook_responses, egress,
                           watch_state))

    def _group(self, data: dict[str, Any]) -> str:
        return group_label(data.get("agent_group"), self.groups)

    def observe(self, kind: str, data: dict[str, Any]) -> None:
        group = self._group(data)
        if kind == "status":
            stopped = data.get("status") == Status.STOPPED
            if stopped and data.get("old") not in (None, Status.STOPPED):
                self.stops.labels(stop_reason(data.get("reason") or ""), group).inc()
        elif kind == "reply_delivered":
            self.delivered.labels(self.channel, group).inc()
            if data.get("delay_seconds") is not None:
                self.delay.labels(self.channel, group).observe(max(0.0, data["delay_seconds"]))
        elif kind == "reply_failed":
            self.failed.labels(self.channel, group).inc()
        elif kind == "message_failed":
            self.messages_failed.labels(group).inc()
        elif kind == "agent_run":
            self._run_usage(group, data)
        elif kind == "session_removed":
            self.removed.labels(data["action"], group).inc()
        elif kind == "agent_start":
            self.starts.labels(self.runtime, data["result"], group).inc()
            if data["result"] == "ok":
                self.start_seconds.labels(self.runtime, group).observe(data["seconds"])
                if data.get("waited") is not None:
                    self.admission_wait.labels(group).observe(max(0.0, data["waited"]))

    def _run_usage(self, group: str, data: dict[str, Any]) -> None:
        """One agent run ended: what it used (a value its runtime does not know is None)."""
        if data.get("cpu_seconds") is not None:
            self.run_cpu.labels(group).inc(max(0.0, data["cpu_seconds"]))
        if data.get("peak_memory_bytes") is not None:
            self.run_peak.labels(group).observe(max(0, data["peak_memory_bytes"]))
        if data.get("wall_seconds") is not None:
            self.run_wall.labels(group).observe(max(0.0, data["wall_seconds"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The template of the route a request matches (a 405 still names its route);
    ``unmatched`` for none. Never the raw path: ids in it would grow the label set."""
    app = scope.get("app")
    partial = None
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", UNMATCHED)
        if match is Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)
    return partial or UNMATCHED


class RequestTimer:
    """ASGI middleware: each HTTP request's duration into
    ``orchestrator_http_request_duration_seconds`` (route template, method, status)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": "500"}  # a handler that raises before answering

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope.get("method", "GET")
            self.metrics.http_seconds.labels(
                route_template(scope), method if method in _METHODS else "other",
                status["code"]).observe(time.perf_counter() - started)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:40] or "unknown"
