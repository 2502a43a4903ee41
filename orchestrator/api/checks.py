"""Pure checks of a request, table-tested: the POST /v1/messages body (strict JSON,
bounded depth, ``process_after``, ``wait``), ``Prefer: wait=N``, ``Last-Event-ID``,
and the one error shape of every refusal (``{"error": "<one line>"}``)."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from orchestrator.api.auth import SAFE_METHODS
from orchestrator.contract.schema import format_due, parse_ts
from orchestrator.host.sessions import MODES

MESSAGE_FIELDS = {"agent_group", "channel", "platform_id", "thread_id", "mode", "content",
                  "process_after", "wait"}
MAX_WAIT = 60.0  # s a POST /v1/messages may hold its answer for the reply
MAX_DEPTH = 32  # nesting of a request body (content is read by agents: keep it plain)
PAST_TOLERANCE = timedelta(seconds=60)  # a client's clock may lag ours a little
MAX_AHEAD = timedelta(days=100 * 366)
_EVENT_ID = re.compile(r"[0-9]{1,18}")  # SQLite integers are 64-bit


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# --- pure request checks ----------------------------------------------------------------


def body_refusal(method: str, content_type: str | None, content_length: str | None,
                 transfer_encoding: str | None) -> str | None:
    """Why a request body is refused (415), or None: a body must be JSON. This also
    shuts out the "simple" cross-site requests a browser sends without asking
    (text/plain, form-urlencoded, multipart)."""
    if method.upper() in SAFE_METHODS:
        return None
    has_body = transfer_encoding is not None or content_length not in (None, "0")
    if content_type is None:
        return ("a request body needs Content-Type: application/json" if has_body else None)
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        return (f"Content-Type {media[:60]!r} is not accepted: send the body as "
                "application/json")
    return None


def _not_json(name: str) -> Any:
    raise BadRequest(f"body is not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"body is not valid JSON: {text[:30]} is out of range for a number")
    return value


def depth_of(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply ``value`` nests (a scalar 0, ``[]`` 1), counted up to ``limit + 1``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > limit:
                return level
            stack.extend((child, level + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads(body: bytes) -> Any:
    """A request body as JSON, strictly: no NaN or Infinity (nor 1e999), at most
    MAX_DEPTH levels deep; BadRequest otherwise."""
    try:
        data = json.loads(body, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise BadRequest(f"body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON ({str(exc)[:200]}); send a JSON object"
                         ) from None
    if depth_of(data) > MAX_DEPTH:
        raise BadRequest(f"body nests deeper than {MAX_DEPTH} levels")
    return data


def due_time(value: Any, now: datetime) -> datetime:
    """``process_after``: an ISO 8601 time (no offset = UTC) in the future, as
    ``send --at`` requires (``scheduling.parse_at``), allowing PAST_TOLERANCE for a
    client's clock; at most MAX_AHEAD ahead (the calendar ends in 9999)."""
    hint = "process_after must be an ISO 8601 time, e.g. 2030-01-01T09:00:00Z"
    if not isinstance(value, str) or len(value) > 64:
        raise BadRequest(hint)
    try:
        when = parse_ts(value)
        due = format_due(when) if when is not None else None  # rounds up: may overflow
    except (ValueError, OverflowError):
        raise BadRequest(hint) from None
    if when is None or due is None:
        raise BadRequest(hint)
    if when < now - PAST_TOLERANCE:
        raise BadRequest(f"process_after {due} UTC is in the past (now {format_due(now)} UTC): "
                         "give a future time, as for send --at, or leave it out to process "
                         "the message now")
    if when > now + MAX_AHEAD:
        raise BadRequest(f"process_after {due} UTC is more than 100 years ahead")
    return when


def parse_message(body: bytes, default_mode: str, now: datetime | None = None
                  ) -> dict[str, Any]:
    """The POST /v1/messages body, checked; BadRequest names the field and the fix."""
    data = loads(body)
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object with agent_group and content")
    unknown = sorted(set(data) - MESSAGE_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}: allowed fields are "
                         f"{', '.join(sorted(MESSAGE_FIELDS))}")
    out: dict[str, Any] = {}
    for name, default, required in (("agent_group", None, True), ("channel", "api", False),
                                    ("platform_id", "default", False),
                                    ("thread_id", None, False), ("mode", default_mode, False)):
        value = data.get(name, default)
        nullable = name == "thread_id"  # null = no thread; the others have no null meaning
        if (value is None and (required or not nullable)) or (
                value is not None and not isinstance(value, str)):
            raise BadRequest(f"{name} must be a string" + (" (required)" if required else
                                                          " (or left out)"))
        out[name] = value
    if out["mode"] not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}, got {out['mode']!r}")
    content = data.get("content")
    if not isinstance(content, dict):
        raise BadRequest('content must be a JSON object, e.g. {"text": "hi"}')
    out["content"] = content
    process_after = data.get("process_after")
    out["process_after"] = None if process_after is None else due_time(
        process_after, now or datetime.now(timezone.utc))
    out["wait"] = wait_seconds(data.get("wait"))
    return out


def wait_seconds(value: Any) -> float | None:
    """The body's ``wait``: seconds (0-60) to hold the answer for the first reply."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value <= MAX_WAIT):
        raise BadRequest(f"wait must be a number of seconds from 0 to {MAX_WAIT:g}, got "
                         f"{str(value)[:40]}")
    return float(value)


def prefer_wait(header: str | None) -> float | None:
    """``Prefer: wait=N`` (RFC 7240) in seconds, capped at MAX_WAIT; None when absent
    or not a number (a preference a server cannot honour is ignored, as the RFC says)."""
    if not header:
        return None
    for pref in header.split(","):
        name, _, value = pref.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if value.isdigit() and len(value) <= 6:
                return min(float(value), MAX_WAIT)
    return None


def last_event_id(request: Request) -> int:
    header = request.headers.get("last-event-id")
    query = request.query_params.get("last_event_id")
    for given in (header, query):  # both checked, though the header wins
        if given and not _EVENT_ID.fullmatch(given):
            raise BadRequest("Last-Event-ID must be an event id (a non-negative integer of "
                             "at most 18 digits)")
    raw = header or query
    if raw is None or raw == "":
        return -1  # a new client: live events only
    return int(raw)
