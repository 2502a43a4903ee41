"""Where the supervisor's notifications go: metrics and the event log.

``SessionWorker.notify`` calls ``Hub.notify`` on the event loop, in the middle of a
pass: everything here is in-memory or one local SQLite insert (WAL, no fsync), and
nothing waits on the network. (Failure records go to the channel through
``Deliverer.report``.)

A reply's notification carries its content text (``content_text``); what is stored
and streamed is ``reply_event``'s bounded form: the content as JSON up to
``[api] event_content_bytes``, beyond it ``content: null, truncated: true`` and the
URL of the message, where the whole of it is read.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import quote

from loguru import logger

from orchestrator.api.events import EventStore
from orchestrator.api.metrics import Metrics
from orchestrator.support.logonce import LogOnce

LOGGED = ("status", "reply_delivered", "reply_failed", "message_failed")
# (event id, at, kind, data) of each logged event: the webhook's ``[delivery] events``
Forward = Callable[[int, str, str, dict[str, Any]], None]
REPLY_KINDS = ("reply_delivered", "reply_failed")
DEFAULT_CONTENT_BYTES = 64 * 1024


def message_url(session_id: str, message_id: str) -> str:
    return f"/v1/sessions/{session_id}/messages/{message_id}"


def reply_event(data: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """A reply notification as stored and streamed: ``content_text`` (the agent's JSON
    text) becomes ``content`` (parsed) when at most ``max_bytes`` long, else
    ``content: null``, ``truncated: true``; ``url`` names the whole message. Pure."""
    out = {k: v for k, v in data.items() if k != "content_text"}
    text = data.get("content_text")
    out["url"] = message_url(str(data.get("session_id")), str(data.get("message_id")))
    out["truncated"] = False
    out["content"] = None
    if isinstance(text, str) and text:
        if len(text) > max_bytes or len(text.encode("utf-8", "replace")) > max_bytes:
            out["truncated"] = True
        else:
            try:
                out["content"] = json.loads(text)
            except ValueError:
                out["content"] = None  # not JSON: delivery fails it; the url says the rest
    out["files"] = file_entries(str(data.get("session_id")), str(data.get("message_id")),
                                out["content"])
    return out


def file_entries(session_id: str, message_id: str, content: Any) -> list[dict[str, str]]:
    """``[{name, url}]`` of a reply's ``content.files`` (where each is downloaded)."""
    names = content.get("files") if isinstance(content, dict) else None
    if not isinstance(names, list):
        return []
    base = message_url(session_id, message_id)
    return [{"name": n, "url": f"{base}/files/{quote(n, safe='')}"}
            for n in names[:1000] if isinstance(n, str)]


class Hub:
    def __init__(self, events: EventStore, metrics: Metrics, *,
                 forward: Forward | None = None,
                 max_content_bytes: int = DEFAULT_CONTENT_BYTES) -> None:
        self.events = events
        self.metrics = metrics
        self.forward = forward  # never waits: the channel sends in the background
        self.max_content_bytes = max_content_bytes
        self._said = LogOnce()  # an append that fails: said once per distinct error

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        if kind in REPLY_KINDS:
            data = reply_event(data, self.max_content_bytes)
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
