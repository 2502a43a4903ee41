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
import stat
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

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
INFLIGHT_PAYLOADS = 4  # bodies of max_payload_bytes being built or sent at once, at most
_SIGN_ON_LOOP = 1 << 16  # a bigger body is signed off the event loop
_SEND_SLICE = 1 << 18


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


# A file entry's fields; ``data`` and ``sha256`` are null unless the file is inline, and
# ``omitted`` then says why: over ``max_file_bytes`` or no room left under ``max_payload_bytes``.
OMITTED_FILE = "max_file_bytes"
OMITTED_PAYLOAD = "max_payload_bytes"
_INLINE_EXTRA = 64  # an inline entry's sha256 (66) and "data" quotes, less its reason
_SLACK = 32  # room for ``files_unlisted`` digits
_FILES_MARK = "\u0000files\u0000"  # where the entries go in the encoded body


def b64_len(size: int) -> int:
    return 4 * ((size + 2) // 3)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _entry(name: str, size: int, omitted: str | None = OMITTED_PAYLOAD) -> dict[str, Any]:
    return {"name": name, "size": size, "sha256": None, "data": None, "omitted": omitted}


@dataclass(frozen=True, slots=True)
class FilesPlan:
    """Which files a reply's POST names and which it carries inline (pure, see plan_files)."""

    entries: list[dict[str, Any]]  # in the reply's order; data filled in by read_inline
    paths: list[str]  # the path of each entry
    inline: list[int]  # indexes of entries sent with their bytes
    unlisted: int  # files whose names did not fit under the cap either
    size: int  # an upper bound of the body's encoded size


def plan_files(files: list[tuple[str, str, int]], base: int, max_file_bytes: int,
               max_payload: int) -> FilesPlan:
    """``files``: (path, name, size) in the reply's order; ``base``: the body's size
    without files. Every file is named (name, size) while the names fit; then, in order,
    a file goes inline (base64 and sha256) if it is at most ``max_file_bytes`` and its
    encoded bytes still fit under ``max_payload``; the rest are named without content
    (``omitted`` says why). The body never exceeds ``max_payload``."""
    used = base + _SLACK
    entries: list[dict[str, Any]] = []
    paths: list[str] = []
    for path, name, size in files:
        entry = _entry(name, size)
        cost = len(_dumps(entry).encode("utf-8")) + 1
        if used + cost > max_payload:
            break
        used += cost
        entries.append(entry)
        paths.append(path)
    inline = []
    for i, entry in enumerate(entries):
        size = entry["size"]
        if size > max_file_bytes:
            entry["omitted"] = OMITTED_FILE
            continue
        extra = b64_len(size) + _INLINE_EXTRA
        if used + extra <= max_payload:
            used += extra
            inline.append(i)
    return FilesPlan(entries, paths, inline, len(files) - len(entries), used)


def stat_files(paths: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(path, name, size) of each reply file, opened without following a link; nothing
    is read."""
    out = []
    for p in paths:
        fd = _open_regular(Path(p))
        try:
            out.append((p, Path(p).name, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    return out


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeliveryError(f"{path}: not a regular file")
    return fd


def read_inline(plan: FilesPlan) -> list[bytes]:
    """The planned entries as encoded JSON, the inline files' bytes read: exactly the
    planned size (a file that changed size since is a failed attempt, retried), so
    memory never exceeds what the plan allowed. Built from parts (base64 needs no JSON
    escaping) rather than one ``json.dumps`` of megabytes, which would hold the GIL
    — and so the event loop — for tens of milliseconds."""
    inline = set(plan.inline)
    out = []
    for i, entry in enumerate(plan.entries):
        if i not in inline:
            out.append(_dumps(entry).encode("utf-8"))
            continue
        path = Path(plan.paths[i])
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(entry["size"])
            if len(data) != entry["size"] or fh.read(1):
                raise DeliveryError(f"{path}: changed size while being sent")
        head = _dumps({"name": entry["name"], "size": entry["size"],
                       "sha256": hashlib.sha256(data).hexdigest()})
        out.append(b"".join((head[:-1].encode("utf-8"), b',"data":"', base64.b64encode(data),
                             b'","omitted":null}')))
    return out


def file_entries(paths: tuple[str, ...], max_bytes: int,
                 max_payload: int = 2**62) -> list[dict[str, Any]]:
    """Reply files as they appear in a body (decoded again): see ``plan_files``."""
    return [json.loads(e) for e in read_inline(plan_files(stat_files(paths), 0, max_bytes,
                                                           max_payload))]


def reply_body(reply: Reply, files: list[dict[str, Any]], unlisted: int = 0) -> dict[str, Any]:
    return {"type": "reply", "id": reply.message_id, "session_id": reply.session_id,
            "agent_group": reply.agent_group, "seq": reply.seq, "kind": reply.kind,
            "in_reply_to": reply.in_reply_to,
            "routing": {"channel_type": reply.channel_type, "platform_id": reply.platform_id,
                        "thread_id": reply.thread_id},
            "timestamp": reply.timestamp, "content": reply.content, "files": files,
            "files_unlisted": unlisted}


def plan_reply(reply: Reply, cfg: DeliveryConfig) -> FilesPlan:
    """What the reply's POST will carry (files looked at, none read). A reply whose
    content alone is over the cap can never be sent: failed at once, with the reason."""
    base = len(_dumps(reply_body(reply, [])).encode("utf-8"))
    if base + _SLACK > cfg.max_payload_bytes:
        raise PermanentDeliveryError(
            f"reply {reply.message_id} is {base} bytes without its files, over [delivery] "
            f"max_payload_bytes ({cfg.max_payload_bytes})")
    return plan_files(stat_files(reply.files), base, cfg.max_file_bytes, cfg.max_payload_bytes)


def encode_reply(reply: Reply, plan: FilesPlan, cfg: DeliveryConfig) -> bytes:
    """The body as sent: the planned files read, then encoded (off the event loop)."""
    entries = read_inline(plan)
    text = _dumps(reply_body(reply, _FILES_MARK, plan.unlisted))  # type: ignore[arg-type]
    head, mark, tail = text.rpartition(f'"files":{_dumps(_FILES_MARK)}')  # the last: ours
    data = b"".join((head.encode("utf-8"), b'"files":[', b",".join(entries), b"]",
                     tail.encode("utf-8")))
    del entries
    if len(data) > cfg.max_payload_bytes:  # plan_files counts high; this is a bug guard
        raise PermanentDeliveryError(f"reply {reply.message_id}: body of {len(data)} bytes "
                                     "over [delivery] max_payload_bytes")
    return data


class ByteBudget:
    """Bytes of reply bodies being built or sent at once, across all sessions: a body
    waits until it fits (one alone always may), so many sessions with big replies at
    once hold at most ``limit`` bytes of bodies, not one cap each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond: asyncio.Condition | None = None

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            await cond.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with cond:
                self.used -= size
                cond.notify_all()


class _Body:
    """One POST's bytes, sent in slices and dropped as soon as the POST is over: httpx
    keeps the request (and bytes given as ``content``) in reference cycles that only
    the cyclic GC frees, so a stream of big replies would pile up bodies meanwhile."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        offset = 0
        while offset < len(self.data):
            yield self.data[offset:offset + _SEND_SLICE]
            offset += _SEND_SLICE

    def drop(self) -> None:
        self.data = b""


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
        self._budget = ByteBudget(INFLIGHT_PAYLOADS * cfg.max_payload_bytes)

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

    async def _post(self, data: bytes, key: str, event: str) -> DeliveryError | None:
        stamp = str(int(time.time()))
        signature = (sign(self._secret, stamp, data) if len(data) < _SIGN_ON_LOOP
                     else await asyncio.to_thread(sign, self._secret, stamp, data))
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)),
                   "Idempotency-Key": key, TIMESTAMP_HEADER: stamp,
                   SIGNATURE_HEADER: signature, EVENT_HEADER: event}
        body = _Body(data)
        del data
        try:
            async with asyncio.timeout(self.cfg.timeout):
                http = await self._http()
                resp = await http.post(self.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return DeliveryError(f"webhook did not answer within {self.cfg.timeout:g}s")
        except httpx.HTTPError as exc:
            return DeliveryError(f"webhook unreachable: {type(exc).__name__}: {exc}")
        finally:
            body.drop()
        return outcome_of(resp.status_code, resp.headers.get("Retry-After"),
                          datetime.now(timezone.utc))

    async def _send_reply(self, reply: Reply) -> None:
        error: DeliveryError | None
        try:
            plan = await asyncio.to_thread(plan_reply, reply, self.cfg)
            async with self._budget.hold(plan.size):
                data = await asyncio.to_thread(encode_reply, reply, plan, self.cfg)
                error = await self._post(data, reply.message_id, "reply")
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
            error = await self._post(_dumps(body).encode("utf-8"), key, "failure")
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
