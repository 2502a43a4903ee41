"""Where the supervisor's notifications go: metrics and the event log.

``SessionWorker.notify`` calls ``Hub.notify`` on the event loop, in the middle of a
pass: everything here is in-memory or one local SQLite insert (WAL, no fsync), and
nothing waits on the network. (Failure records go to the channel through
``Deliverer.report``.)
"""

from __future__ import annotations

from typing import Any, Callable

from loguru import logger

from orchestrator.api.events import EventStore
from orchestrator.api.metrics import Metrics
from orchestrator.support.logonce import LogOnce

LOGGED = ("status", "reply_delivered", "reply_failed", "message_failed")
# (event id, at, kind, data) of each logged event: the webhook's ``[delivery] events``
Forward = Callable[[int, str, str, dict[str, Any]], None]


class Hub:
    def __init__(self, events: EventStore, metrics: Metrics, *,
                 forward: Forward | None = None) -> None:
        self.events = events
        self.metrics = metrics
        self.forward = forward  # never waits: the channel sends in the background
        self._said = LogOnce()  # an append that fails: said once per distinct error

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        self.metrics.observe(kind, data)
        if kind in LOGGED:
            try:
                event = self.events.append(kind, data)
                self._said.clear("append")
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop delivery
                if self._said.say("append", str(exc)):
                    logger.error("event log: cannot append ({}); /v1/events misses events", exc)
                return
            if self.forward is not None:
                self.forward(event.id, event.at, event.kind, event.data)
