"""The ``webhook`` channel: one signed HTTP POST per reply (Standard Webhooks 1.0).

Nothing in a delivery pass waits on the network. ``deliver`` starts the POST as a
task of its own and answers ``InFlight``; when the receiver has answered (or not),
the outcome is kept and the session is woken, and the next pass collects it:
delivered, a failed attempt (retried with the Deliverer's backoff, over
``[delivery] retry_horizon``, the count kept in the registry so it survives a
restart), or failed for good. A slow receiver therefore delays only the replies it is
slow to take, never another session's pass. One POST per session at a time keeps a
session's replies in order.

Besides replies, the same URL gets failure records (a reply or message that ended
failed) and, with ``[delivery] events``, the status/failure events of ``GET
/v1/events`` under the same ids. Those are retried in memory with the same backoff
(a restart in between loses them; the log and the event log keep them).

What a receiver gets: at-least-once (a reply taken just before a crash, not yet
recorded, is sent again after the restart with the same ``webhook-id``), so
exactly-once for a receiver that de-duplicates on that id. Signing: ``signing``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable

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
from orchestrator.channels.signing import load_keys, rfc3339, signed_headers
from orchestrator.channels.webhook_files import (
    FILES_MARK,
    SLACK,
    Body,
    ByteBudget,
    FilesPlan,
    dumps,
    file_entries,
    plan_files,
    read_inline,
    stat_files,
)
from orchestrator.config.sections import DeliveryConfig
from orchestrator.rules.delivery_plan import retry_delay

__all__ = ["WebhookChannel", "classify", "encode_reply", "file_entries", "outcome_of",
           "parse_retry_after", "plan_files", "plan_reply", "reply_body"]

MAX_RETRY_AFTER = 3600.0
INFLIGHT_PAYLOADS = 4  # bodies of max_payload_bytes being built or sent at once, at most
MAX_PENDING_RECORDS = 1000  # failure/event records waiting for a retry, in memory
_SIGN_ON_LOOP = 1 << 16  # a bigger body is signed off the event loop


# --- pure parts -------------------------------------------------------------------------


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


def reply_body(reply: Reply, files: list[dict[str, Any]], unlisted: int = 0) -> dict[str, Any]:
    """A reply's payload (docs/contract.md §12); its time in RFC 3339."""
    return {"type": "reply", "id": reply.message_id, "session_id": reply.session_id,
            "agent_group": reply.agent_group, "seq": reply.seq, "kind": reply.kind,
            "in_reply_to": reply.in_reply_to,
            "routing": {"channel_type": reply.channel_type, "platform_id": reply.platform_id,
                        "thread_id": reply.thread_id},
            "timestamp": rfc3339(reply.timestamp), "content": reply.content, "files": files,
            "files_unlisted": unlisted}


def plan_reply(reply: Reply, cfg: DeliveryConfig) -> FilesPlan:
    """What the reply's POST will carry (files looked at, none read). A reply whose
    content alone is over the cap can never be sent: failed at once, with the reason."""
    base = len(dumps(reply_body(reply, [])).encode("utf-8"))
    if base + SLACK > cfg.max_payload_bytes:
        raise PermanentDeliveryError(
            f"reply {reply.message_id} is {base} bytes without its files, over [delivery] "
            f"max_payload_bytes ({cfg.max_payload_bytes})")
    return plan_files(stat_files(reply.files), base, cfg.max_file_bytes, cfg.max_payload_bytes)


def encode_reply(reply: Reply, plan: FilesPlan, cfg: DeliveryConfig) -> bytes:
    """The body as sent: the planned files read, then encoded (off the event loop)."""
    entries = read_inline(plan)
    text = dumps(reply_body(reply, FILES_MARK, plan.unlisted))  # type: ignore[arg-type]
    head, mark, tail = text.rpartition(f'"files":{dumps(FILES_MARK)}')  # the last: ours
    data = b"".join((head.encode("utf-8"), b'"files":[', b",".join(entries), b"]",
                     tail.encode("utf-8")))
    del entries
    if len(data) > cfg.max_payload_bytes:  # plan_files counts high; this is a bug guard
        raise PermanentDeliveryError(f"reply {reply.message_id}: body of {len(data)} bytes "
                                     "over [delivery] max_payload_bytes")
    return data


# --- the channel ----------------------------------------------------------------------


def record_body(failure: Failure, now: datetime) -> dict[str, Any]:
    """A failure record: ``type: "failure"``, the failure's fields, when (RFC 3339)."""
    return {**failure.as_record(), "timestamp": rfc3339(now)}


def event_body(event_id: int, at: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event of ``GET /v1/events`` as a webhook payload: ``type`` is its kind, ``id``
    its SSE id (also in ``webhook-id`` as ``event-<id>``), ``at`` in RFC 3339."""
    return {"type": kind, "id": event_id, "at": rfc3339(at), **data}


def response_code(status: int | None) -> str:
    """The ``code`` label of ``orchestrator_webhook_responses_total``: the HTTP status,
    or ``error`` when there was no answer (refused, reset, timed out)."""
    return "error" if status is None else str(status)


class WebhookChannel:
    name = "webhook"

    def __init__(self, cfg: DeliveryConfig, *, keys: tuple[bytes, ...] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.url = cfg.url
        self._keys = keys if keys is not None else load_keys(cfg.secret_files)
        self._rand = rand
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sending: dict[str, str] = {}  # session id → the reply id being POSTed
        self._outcomes: dict[str, DeliveryError | None] = {}
        self._wake: OnOutcome = lambda session_id: None
        self._budget = ByteBudget(INFLIGHT_PAYLOADS * cfg.max_payload_bytes)
        self._records = 0  # failure/event records being sent or waiting for a retry
        self._said_full = False
        self.responses: Counter[str] = Counter()  # code → count (see response_code)
        self.events = frozenset(cfg.events)
        self._closed = False

    def bind(self, on_outcome: OnOutcome) -> None:
        """``on_outcome(session_id)``: an outcome is known; run a pass for that session."""
        self._wake = on_outcome

    def already_delivered(self, message_id: str) -> bool:
        return False  # the receiver de-duplicates on webhook-id (at-least-once)

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
        body = record_body(failure, datetime.now(timezone.utc))
        self._record(body, f"failure-{failure.kind}-{failure.id}")

    def forward_event(self, event_id: int, at: str, kind: str, data: dict[str, Any]) -> None:
        """An event of the event log (``Hub``), sent if ``[delivery] events`` asks for
        its kind (``status``; ``failure`` = reply_failed and message_failed)."""
        wanted = "failure" if kind in ("reply_failed", "message_failed") else kind
        if wanted in self.events:
            self._record(event_body(event_id, at, kind, data), f"event-{event_id}")

    # --- sending ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, body: dict[str, Any], msg_id: str) -> None:
        if self._closed:  # shutting down: nothing new is started
            return
        if self._records >= MAX_PENDING_RECORDS:  # a receiver down for long: bounded memory
            if not self._said_full:
                self._said_full = True
                logger.error("webhook: {} records already wait for the receiver; dropping "
                             "{} (the event log and this log keep them)",
                             MAX_PENDING_RECORDS, msg_id)
            return
        self._said_full = False
        self._records += 1
        self._spawn(self._send_record(dumps(body).encode("utf-8"), msg_id))

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made off the loop: loading the CA bundle takes ~0.2 s
            client = await asyncio.to_thread(
                httpx.AsyncClient, timeout=self.cfg.timeout, follow_redirects=False,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
            if self._client is None:
                self._client = client
            else:  # another POST made one meanwhile
                await client.aclose()
        return self._client

    async def _post(self, data: bytes, msg_id: str) -> DeliveryError | None:
        stamp = int(time.time())
        signed = (signed_headers(self._keys, msg_id, stamp, data) if len(data) < _SIGN_ON_LOOP
                  else await asyncio.to_thread(signed_headers, self._keys, msg_id, stamp, data))
        # Idempotency-Key: the same id, for receivers written before webhook-id
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)),
                   "Idempotency-Key": msg_id, **signed}
        body = Body(data)
        del data
        try:
            async with asyncio.timeout(self.cfg.timeout):
                http = await self._http()
                resp = await http.post(self.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            self.responses[response_code(None)] += 1
            return DeliveryError(f"webhook did not answer within {self.cfg.timeout:g}s")
        except httpx.HTTPError as exc:
            self.responses[response_code(None)] += 1
            return DeliveryError(f"webhook unreachable: {type(exc).__name__}: {exc}")
        finally:
            body.drop()
        self.responses[response_code(resp.status_code)] += 1
        return outcome_of(resp.status_code, resp.headers.get("Retry-After"),
                          datetime.now(timezone.utc))

    async def _send_reply(self, reply: Reply) -> None:
        error: DeliveryError | None
        try:
            plan = await asyncio.to_thread(plan_reply, reply, self.cfg)
            async with self._budget.hold(plan.size):
                data = await asyncio.to_thread(encode_reply, reply, plan, self.cfg)
                error = await self._post(data, reply.message_id)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug is a failed attempt, never a lost wake-up
            error = DeliveryError(f"{type(exc).__name__}: {exc}")
        finally:
            self._sending.pop(reply.session_id, None)
        self._outcomes[reply.message_id] = error
        self._wake(reply.session_id)

    async def _send_record(self, data: bytes, msg_id: str) -> None:
        """A failure or event record, retried like a reply (jittered backoff,
        Retry-After, ``retry_horizon``, ``max_attempts``) but in memory."""
        cfg = self.cfg
        end = time.monotonic() + cfg.retry_horizon
        try:
            for attempt in range(1, cfg.max_attempts + 1):
                error = await self._post(data, msg_id)
                if error is None:
                    return
                delay = max(retry_delay(attempt, cfg.retry_base, cfg.retry_max_delay,
                                        self._rand()),
                            min(error.retry_after or 0.0, cfg.retry_max_delay))
                if (isinstance(error, PermanentDeliveryError) or attempt == cfg.max_attempts
                        or time.monotonic() + delay > end):
                    logger.error("webhook record {}: not delivered: {}", msg_id, error)
                    return
                await asyncio.sleep(delay)
        finally:
            self._records -= 1

    async def aclose(self) -> None:
        """Cancel what is in flight (sent again after a restart: at-least-once)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        pass  # see aclose: the HTTP client needs the event loop to close
