"""The Starlette app: routes over a running Supervisor.

Handlers run on the supervisor's event loop, so anything that touches a session
folder (an agent may have planted a FIFO or a huge file there) or does several
SQLite writes runs in a worker thread (``asyncio.to_thread``); the loop only
routes, checks and serialises. Errors are ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import asdict
from datetime import datetime
from importlib import resources
from typing import Any, Awaitable, Callable

from loguru import logger
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api import console
from orchestrator.api.auth import HostRule, bearer_ok, request_refusal
from orchestrator.api.checks import (
    BadRequest,
    body_refusal,
    error,
    loads,
    parse_message,
    prefer_wait,
)
from orchestrator.api.event_routes import EventRoutes
from orchestrator.api.events import EventStore, Subscription
from orchestrator.api.history import History
from orchestrator.api.idempotency import IdempotencyKeys, check_key, fingerprint
from orchestrator.api.message_routes import MessageRoutes
from orchestrator.api.metrics import Metrics, RequestTimer
from orchestrator.api.session_admin import SessionAdminRoutes
from orchestrator.contract.layout import InvalidId
from orchestrator.engine.ports import Control
from orchestrator.engine.requeue import UnknownSession
from orchestrator.host import status as status_mod
from orchestrator.host.attachments import AttachmentError
from orchestrator.host.sessions import MessageError, MessagingGroup

Handler = Callable[[Request], Awaitable[Response]]


class Guard:
    """Pure ASGI middleware in front of every route: Host and Origin (403, see
    ``auth.request_refusal``), JSON-only bodies (415), and a trailing-slash redirect
    whose Location is a path, never a host taken from the request."""

    def __init__(self, app: ASGIApp, rule: HostRule | None, unix: bool) -> None:
        self.app = app
        self.rule = rule
        self.unix = unix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        if self.rule is not None:
            problem = request_refusal(self.rule, method, headers.get("host"),
                                      headers.get("origin"), self.unix)
            if problem:
                await error(problem, 403)(scope, receive, send)
                return
        problem = body_refusal(method, headers.get("content-type"),
                               headers.get("content-length"), headers.get("transfer-encoding"))
        if problem:
            await error(problem, 415)(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        if raw != b"/" and raw.endswith(b"/"):
            location = "/" + raw.decode("latin-1").strip("/")  # "//host/" must not become a URL
            if scope.get("query_string"):
                location += "?" + scope["query_string"].decode("latin-1")
            await Response(status_code=308, headers={"Location": location})(scope, receive,
                                                                             send)
            return
        await self.app(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in the API's error shape (not plain text)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    text = {404: f"no route {request.url.path[:200]!r}: see /openapi.json",
            405: f"method {request.method} is not allowed on {request.url.path[:200]}"}.get(
                status, exc.detail if isinstance(exc, HTTPException) else "error")
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return JSONResponse({"error": text}, status_code=status, headers=headers)


# --- the app ------------------------------------------------------------------------------


class Api(MessageRoutes, EventRoutes, console.ConsoleRoutes, SessionAdminRoutes):
    def __init__(self, control: Control, token: str | None, events: EventStore,
                 metrics: Metrics, keys: IdempotencyKeys, rule: HostRule | None = None,
                 unix: bool = False) -> None:
        self.control = control
        self.token = token
        self.rule = rule
        self.unix = unix
        self.events = events
        self.metrics = metrics
        self.keys = keys
        self.max_body = control.cfg.sessions.max_attachment_bytes * 4 // 3 + 1024 * 1024
        self._key_locks: dict[str, asyncio.Lock] = {}
        self.closing = asyncio.Event()
        self.started = time.monotonic()
        self.history = History(metrics)  # the console's last hour (started by the server)

    def authed(self, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            if not bearer_ok(request.headers.get("authorization"), self.token):
                return JSONResponse({"error": "missing or wrong bearer token (Authorization: "
                                     "Bearer <the contents of [api] token_file>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except BadRequest as exc:
                return error(str(exc), exc.status)
            except ClientDisconnect:  # gone (or cut at [api] body_timeout): nobody reads this
                return error("client disconnected", 400)
            except Exception as exc:  # noqa: BLE001 - a bug or a broken disk: a 500, the trace logged
                logger.opt(exception=exc).error("API {} {}: {}", request.method,
                                                request.url.path, exc)
                return error(f"internal error: {type(exc).__name__}: {exc}", 500)
        return wrapped

    def app(self, extra: tuple[Middleware, ...] = ()) -> Starlette:
        """``extra``: middleware after the Guard (``[cluster]``: the shard router)."""
        metrics = (self.authed(self.metrics_page) if self.control.cfg.api.metrics_auth
                   else self.metrics_page)
        return Starlette(middleware=[Middleware(RequestTimer, self.metrics),
                                     Middleware(Guard, self.rule, self.unix), *extra],
                         exception_handlers={HTTPException: http_error}, routes=[
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", metrics),
            Route("/v1/messages", self.authed(self.post_message), methods=["POST"]),
            Route("/v1/sessions", self.authed(self.list_sessions)),
            Route("/v1/sessions/{session_id}", self.authed(self.one_session),
                  methods=["GET", "DELETE"]),  # one route: its 405 lists both methods
            Route("/v1/sessions/{session_id}/stop", self.authed(self.stop_session),
                  methods=["POST"]),
            Route("/v1/events", self.authed(self.stream_events)),
            Route("/v1/deliveries/retry", self.authed(self.retry_deliveries),
                  methods=["POST"]),
            # --- the document and a session's messages (issue 24) ---
            Route("/openapi.json", self.openapi_doc),
            Route("/v1/sessions/{session_id}/messages", self.authed(self.list_messages)),
            Route("/v1/sessions/{session_id}/messages/{message_id}",
                  self.authed(self.get_message)),
            Route("/v1/sessions/{session_id}/messages/{message_id}/files/{name}",
                  self.authed(self.get_file)),
            Route("/v1/sessions/{session_id}/logs", self.authed(self.get_logs)),
            # --- the operator's console (issue 27): api/console.py ---
            Route("/console/{name}", self.console_asset),
            Route("/v1/fleet", self.authed(self.fleet)),
            Route("/v1/groups", self.authed(self.list_groups)),
            Route("/v1/series", self.authed(self.list_series)),
            Route("/v1/series/{series_id}/cancel", self.authed(self.cancel_series),
                  methods=["POST"]),
            Route("/v1/sessions/{session_id}/timeline", self.authed(self.timeline)),
            Route("/v1/sessions/{session_id}/answer", self.authed(self.answer),
                  methods=["POST"]),
        ])

    # --- unauthenticated ------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        page = resources.files("orchestrator.api").joinpath("static/status.html").read_text(
            encoding="utf-8")  # the console: its script and style are /console/* files
        return HTMLResponse(page, headers={"Cache-Control": "no-store",
                                           "Content-Security-Policy": console.CSP,
                                           "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    async def healthz(self, request: Request) -> Response:
        limit = 2 * self.control.cfg.watch.sweep_interval
        age = time.monotonic() - (self.control.last_sweep or self.started)
        if age > limit:
            return error(f"last reconcile sweep finished {age:.0f}s ago (limit {limit:g}s)", 503)
        return JSONResponse({"ok": True, "last_sweep_seconds_ago": round(age, 3)})

    async def readyz(self, request: Request) -> Response:
        if not self.control.ready.is_set():
            return error("start-up reconcile not done yet", 503)
        try:
            await asyncio.wait_for(self.control.check_runtime(), 5)
        except Exception as exc:  # noqa: BLE001 - any failure of the ping is "unreachable"
            return error(f"runtime {self.control.runtime_name} unreachable: {exc}", 503)
        return JSONResponse({"ok": True, "runtime": self.control.runtime_name})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- /v1 ------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise BadRequest(f"body of {length} bytes is over the {self.max_body}-byte limit "
                             "(attachments count against [sessions] max_attachment_bytes)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise BadRequest(f"body is over the {self.max_body}-byte limit (attachments "
                                 "count against [sessions] max_attachment_bytes)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def post_message(self, request: Request) -> Response:
        body = await self._body(request)
        msg = parse_message(body, self.control.cfg.sessions.default_mode)
        wait, headers = msg["wait"], {}
        if wait is None:
            wait = prefer_wait(request.headers.get("prefer"))
            if wait is not None:
                wait = min(wait, self.control.cfg.api.max_wait)
                headers["Preference-Applied"] = f"wait={wait:g}"
        if wait is not None:
            wait = min(wait, self.control.cfg.api.max_wait)
        # subscribed before the write: a reply cannot come before it, so none is missed
        sub = self.events.subscribe() if wait is not None else None
        try:
            result = await self._submit(request, body, msg)
            if sub is None or wait is None:
                return JSONResponse(result, status_code=201)
            reply = await self._first_reply(sub, result["message_id"], wait)
        finally:
            if sub is not None:
                self.events.unsubscribe(sub)
        if reply is None:
            return JSONResponse(result, status_code=202, headers=headers)
        return JSONResponse({**result, "reply": reply}, status_code=200, headers=headers)

    async def _submit(self, request: Request, body: bytes, msg: dict[str, Any]
                      ) -> dict[str, Any]:
        key = request.headers.get("idempotency-key")
        if key is None:
            return await asyncio.to_thread(self._write, msg, None, None)
        problem = check_key(key)
        if problem:
            raise BadRequest(problem)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # the same key twice at once: the second waits, then replays
                return await asyncio.to_thread(self._write, msg, key, fingerprint(body))
        finally:
            if not lock.locked():
                self._key_locks.pop(key, None)

    async def _first_reply(self, sub: Subscription, message_id: str | None, wait: float
                           ) -> dict[str, Any] | None:
        """The first ``reply_delivered`` event answering ``message_id`` within ``wait``
        seconds (from the event hub the supervisor's watcher feeds; no file is read)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self.closing.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                event = await asyncio.wait_for(sub.queue.get(), left)
            except asyncio.TimeoutError:
                return None
            if event is None:
                return None
            if event.kind == "reply_delivered" and event.data.get("in_reply_to") == message_id:
                return {"event_id": event.id, "at": event.at, "kind": event.kind,
                        **event.data}
        return None

    def _write(self, msg: dict[str, Any], key: str | None, fp: str | None
               ) -> dict[str, str | None]:
        """Runs in a worker thread: resolve the session and write the message."""
        from orchestrator.host.sessions import new_id

        sessions = self.control.sessions
        message_id = None
        if key is not None:
            entry = self.keys.get(key)
            if entry is not None and entry.fingerprint != fp:
                raise BadRequest("Idempotency-Key was used before with a different body; "
                                 "use a new key", 422)
            if entry is not None and entry.done:
                return {"session_id": entry.session_id, "message_id": entry.message_id}
            message_id = entry.message_id if entry else new_id("msg")
        try:
            prepared = sessions.prepare(msg["content"])  # refused here: nothing is created
            if key is not None and fp is not None and message_id is not None:
                self.keys.begin(key, fp, message_id)
                entry = self.keys.get(key)  # a concurrent request may have begun first
                if entry is not None and entry.done:
                    return {"session_id": entry.session_id, "message_id": entry.message_id}
                message_id = entry.message_id if entry else message_id
            session = sessions.resolve(msg["agent_group"],
                                       MessagingGroup(msg["channel"], msg["platform_id"]),
                                       msg["thread_id"], msg["mode"])
            try:
                # the message keeps its own chat, whatever the session's mode
                mid, _ = sessions.write_message(session, prepared,
                                                process_after=msg["process_after"],
                                                routing=(msg["channel"], msg["platform_id"],
                                                         msg["thread_id"]),
                                                message_id=message_id)
            except MessageError:
                if key is None or message_id is None or not _exists(sessions, session,
                                                                     message_id):
                    raise
                mid = message_id  # written by an attempt that crashed before finishing
        except (MessageError, InvalidId, AttachmentError, ValueError) as exc:
            if isinstance(exc, BadRequest):
                raise
            raise BadRequest(str(exc)) from None
        if key is not None:
            self.keys.finish(key, session.id)
        return {"session_id": session.id, "message_id": mid}

    def _rows(self, only: set[str] | None = None, every: list | None = None
              ) -> list[dict[str, Any]]:
        """``status --json`` rows plus routing and activity times (worker thread);
        ``only``: just these sessions' files are read (a page of the list); ``every``:
        ``registry.sessions()`` if just read."""
        control = self.control
        every = control.registry.sessions() if every is None else every
        by_id = {s.id: s for s in every}
        out = []
        for row in status_mod.collect(control.cfg.data_dir, control.registry, only=only,
                                      sessions=every):
            item = asdict(row)
            s = by_id.get(row.session_id)
            ct, pid, thread = control.sessions.routing_of(s) if s else (None, None, None)
            item["routing"] = {"channel_type": ct, "platform_id": pid, "thread_id": thread}
            item["created_at"] = _iso(s.created_at) if s else None
            out.append(item)
        return out

    async def list_sessions(self, request: Request) -> Response:
        """Every row as before; with ``q``, ``status``, ``sort``, ``limit``, ``cursor``
        or ``offset`` (console.page_params) filtered and paged on the registry first, so
        only the page's session folders are read. ``X-Total-Count``: rows matched in
        all; ``X-Next-Cursor``: the next page's cursor."""
        rows, headers = await asyncio.to_thread(console.paged_rows, self.control.registry,
                                                console.page_params(request.query_params),
                                                self._rows)
        return JSONResponse(rows, headers=headers)

    async def one_session(self, request: Request) -> Response:
        """GET: its row; DELETE: archived or deleted (``api/session_admin.py``)."""
        if request.method == "DELETE":
            return await self.delete_session(request)
        return await self.get_session(request)

    async def get_session(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        rows = await asyncio.to_thread(self._rows)
        for r in rows:
            if r["session_id"] == sid:
                return JSONResponse(r)
        return error(f"no session {sid!r}", 404)

    async def stop_session(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        stopping = self.control.stop_agent(sid, "requested through the API")
        if stopping is None:
            return error(f"no session {sid!r}", 404)
        if not stopping:
            return error(f"session {sid}: no agent is running, or a start/stop is under way",
                         409)
        return JSONResponse({"session_id": sid, "stopping": True}, status_code=202)

    async def retry_deliveries(self, request: Request) -> Response:
        """``{"session_id": optional}`` → ``{"retried": N}``: failed replies re-queued
        with fresh attempts (``engine.requeue``); an empty body means every session."""
        body = await self._body(request)
        data = loads(body) if body.strip() else {}
        if not isinstance(data, dict) or set(data) - {"session_id"}:
            raise BadRequest('body must be a JSON object with at most "session_id"')
        sid = data.get("session_id")
        if sid is not None and not isinstance(sid, str):
            raise BadRequest(f"session_id must be a string, got {sid!r}")
        try:
            retried = await self.control.retry_deliveries(sid)
        except UnknownSession as exc:
            return error(str(exc), 404)
        return JSONResponse({"retried": retried})


def _exists(sessions: Any, session: Any, message_id: str | None) -> bool:
    """Whether a crashed attempt already wrote ``message_id``: inbound.db read the
    supervisor's way (``safefs``: no link, no FIFO, no wait); unreadable = no."""
    from orchestrator.contract import schema
    from orchestrator.contract.layout import INBOUND_DB
    from orchestrator.host.safefs import SessionDir

    if message_id is None:
        return False
    try:
        with SessionDir(sessions.data_dir, session.agent_group_id, session.id) as folder, \
                schema.opened(folder.reader(INBOUND_DB), readonly=True) as conn:
            return conn.execute("SELECT 1 FROM messages_in WHERE id=?",
                                (message_id,)).fetchone() is not None
    except (OSError, sqlite3.Error):
        return False


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") if dt else None
