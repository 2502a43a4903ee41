"""The ``webhook`` channel: one signed HTTP POST per reply.

Nothing in a delivery pass waits on the network. ``deliver`` starts the POST as a
task of its own and answers ``InFlight``; when the receiver has answered (or not),
the outcome is kept and the session is woken, and the next pass collects it:
delivered, a failed attempt (retried with the Deliverer's backoff and attempt
count), or failed for good. A slow receiver therefore delays only the replies it is
slow to take, never another session's pass. One POST per session at a time keeps a
session's replies in order.

What a receiver gets: at-least-once (a reply taken just before a crash, not yet
recorded, is sent again after the restart with the same ``Idempotency-Key``), so
exactly-once for a receiver that de-duplicates on that key.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from loguru import logger

from orchestrator.channels.base import (
    DeliveryError,
    Failure,
    InFlight,
    OnOutcome,
    PermanentDeliveryError,
    Reply,
)
from orchestrator.config.model import DeliveryConfig
from orchestrator.host.secretfile import ensure_secret
from orchestrator.rules.lifecycle import delivery_backoff

SIGNATURE_HEADER = "X-Orchestrator-Signature"
TIMESTAMP_HEADER = "X-Orchestrator-Timestamp"
EVENT_HEADER = "X-Orchestrator-Event"
MAX_RETRY_AFTER = 3600.0


# --- pure parts -------------------------------------------------------------------------


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``"<timestamp>." + body`` (Stripe's scheme)."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *,
           now: float | None = None, tolerance: float = 300.0) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale stamps
    (a replayed request is older than ``tolerance`` seconds)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; capped at an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER)


def classify(status: int) -> str:
    """An HTTP status → ``delivered``, ``retry`` or ``fail`` (failed at once)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "fail"


def outcome_of(status: int, retry_after: str | None, now: datetime) -> DeliveryError | None:
    """None = delivered; otherwise the error the next pass raises."""
    verdict = classify(status)
    if verdict == "delivered":
        return None
    if verdict == "retry":
        err = DeliveryError(f"webhook answered HTTP {status}")
        err.retry_after = parse_retry_after(retry_after, now)
        return err
    hint = ("redirects are not followed: set [delivery] url to the final URL"
            if 300 <= status < 400 else "the receiver refused it; not retried")
    return PermanentDeliveryError(f"webhook answered HTTP {status} ({hint})")


def file_entries(paths: tuple[str, ...], max_bytes: int) -> list[dict[str, Any]]:
    """Reply files for the body: inline base64 up to ``max_bytes``, else name and size
    with ``data: null`` (the file stays in ``<data_dir>/delivered/<id>/``)."""
    out = []
    for p in paths:
        path = Path(p)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise DeliveryError(f"{path}: cannot read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = base64.b64encode(fh.read()).decode("ascii") if size <= max_bytes else None
        out.append({"name": path.name, "size": size, "data": data})
    return out


def reply_body(reply: Reply, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "reply", "id": reply.message_id, "session_id": reply.session_id,
            "agent_group": reply.agent_group, "seq": reply.seq, "kind": reply.kind,
            "in_reply_to": reply.in_reply_to,
            "routing": {"channel_type": reply.channel_type, "platform_id": reply.platform_id,
                        "thread_id": reply.thread_id},
            "timestamp": reply.timestamp, "content": reply.content, "files": files}


# --- the channel ----------------------------------------------------------------------


class WebhookChannel:
    name = "webhook"

    def __init__(self, cfg: DeliveryConfig, *, secret: str | None = None) -> None:
        self.cfg = cfg
        self.url = cfg.url
        self._secret = (secret if secret is not None else ensure_secret(cfg.secret_file)).encode()
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sending: dict[str, str] = {}  # session id → the reply id being POSTed
        self._outcomes: dict[str, DeliveryError | None] = {}
        self._wake: OnOutcome = lambda session_id: None

    def bind(self, on_outcome: OnOutcome) -> None:
        """``on_outcome(session_id)``: an outcome is known; run a pass for that session."""
        self._wake = on_outcome

    def already_delivered(self, message_id: str) -> bool:
        return False  # the receiver de-duplicates on Idempotency-Key (at-least-once)

    async def deliver(self, reply: Reply) -> str | None:
        rid = reply.message_id
        if rid in self._outcomes:
            error = self._outcomes.pop(rid)
            if error is None:
                return None
            raise error
        if reply.session_id in self._sending:
            raise InFlight(f"reply {self._sending[reply.session_id]} of this session is "
                           "being sent")
        self._sending[reply.session_id] = rid
        self._spawn(self._send_reply(reply))
        raise InFlight(f"reply {rid} is being sent")

    async def report_failure(self, failure: Failure) -> None:
        """A failure record, POSTed to the same URL in the background with its own
        retries (kept in memory: a restart in between loses it; the log has it).
        Returns at once: the pass that found the failure never waits on the network."""
        self._spawn(self._send_failure(failure))

    # --- sending ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.cfg.timeout, follow_redirects=False,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        return self._client

    async def _post(self, body: dict[str, Any], key: str, event: str) -> DeliveryError | None:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "Idempotency-Key": key,
                   TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(self._secret, stamp, data),
                   EVENT_HEADER: event}
        try:
            async with asyncio.timeout(self.cfg.timeout):
                resp = await self._http().post(self.url, content=data, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return DeliveryError(f"webhook did not answer within {self.cfg.timeout:g}s")
        except httpx.HTTPError as exc:
            return DeliveryError(f"webhook unreachable: {type(exc).__name__}: {exc}")
        return outcome_of(resp.status_code, resp.headers.get("Retry-After"),
                          datetime.now(timezone.utc))

    async def _send_reply(self, reply: Reply) -> None:
        error: DeliveryError | None
        try:
            files = await asyncio.to_thread(file_entries, reply.files, self.cfg.max_file_bytes)
            error = await self._post(reply_body(reply, files), reply.message_id, "reply")
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug is a failed attempt, never a lost wake-up
            error = DeliveryError(f"{type(exc).__name__}: {exc}")
        finally:
            self._sending.pop(reply.session_id, None)
        self._outcomes[reply.message_id] = error
        self._wake(reply.session_id)

    async def _send_failure(self, failure: Failure) -> None:
        body = failure.as_record()  # {"type": "failure", "kind", "id", ...}
        key = f"failure-{failure.kind}-{failure.id}"
        for attempt in range(1, self.cfg.max_attempts + 1):
            error = await self._post(body, key, "failure")
            if error is None:
                return
            if isinstance(error, PermanentDeliveryError) or attempt == self.cfg.max_attempts:
                logger.error("failure record of {} {}: not delivered: {}", failure.kind,
                             failure.id, error)
                return
            await asyncio.sleep(max(delivery_backoff(attempt, self.cfg.retry_base),
                                    error.retry_after or 0.0))

    async def aclose(self) -> None:
        """Cancel what is in flight (sent again after a restart: at-least-once)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        pass  # see aclose: the HTTP client needs the event loop to close
