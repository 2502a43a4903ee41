"""Any shard takes any request: the ASGI middleware in front of the routes when
``[cluster]`` is on (issue 23). Without it this module is not used at all.

A request from a client (no ``X-Orchestrator-Forwarded-By``):

- ``POST /v1/messages``: the conversation (``rules.placement.conversation_key``) is
  looked up here first — held here: the local route answers, no peer is asked (the
  local path never waits on a peer). Else every live shard is asked at once; the
  one that holds it gets the request. Nobody does: ``rules.placement.place`` picks
  the owner (rendezvous hashing), or, when a down shard may hold the conversation,
  the answer is ``503`` with ``Retry-After`` naming it. A forwarded POST keeps its
  body and ``Idempotency-Key`` and is answered with the owner's status and body, so
  a retry through any shard replays on the owner: written once.
- ``/v1/sessions/{id}`` and everything under it: held here → local; else the shard
  holding the id (asked, then cached) gets it; unknown everywhere → 404, or 503
  while a shard that could hold it is down.
- ``GET /v1/sessions`` and ``GET /v1/events`` (a stream): merged from every shard
  (``api.shard_merge``).
- ``POST /v1/deliveries/retry``: one session's goes to its shard; without a session
  id every shard retries its own and the counts are summed.
- anything else (``/metrics``, health, the JSON form of ``/v1/events``) stays local.

A request from a peer (``X-Orchestrator-Forwarded-By`` set) must carry the cluster
secret (``X-Orchestrator-Peer-Auth``; else 401) and is answered here, never
forwarded again (the loop guard). The peer-only questions ``/cluster/v1/holds`` and
``/cluster/v1/has-session`` are answered here too (not in the OpenAPI document:
they are not for clients).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import httpx
from loguru import logger
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.auth import bearer_ok
from orchestrator.api.checks import error
from orchestrator.api.peers import FORWARDED_BY, HAS_SESSION_PATH, HOLDS_PATH, PEER_AUTH, Peers
from orchestrator.api.shard_merge import merged_events, merged_sessions
from orchestrator.rules.placement import conversation_key, place

HOP_HEADERS = frozenset({"host", "authorization", "content-length", "connection",
                         "transfer-encoding", "keep-alive", "upgrade", "te", "trailer",
                         FORWARDED_BY, PEER_AUTH})
PASSED_BACK = ("content-type", "retry-after", "preference-applied", "content-disposition",
               "x-content-type-options", "cache-control", "www-authenticate",
               "x-accel-buffering")
SESSION_PREFIX = "/v1/sessions/"

HoldsLocal = Callable[[dict[str, Any]], bool]
HasSessionLocal = Callable[[str], bool]


def conversation_of(body: bytes, default_mode: str) -> dict[str, Any] | None:
    """The chat a POST /v1/messages body names, or None if the body is not one (the
    local route then answers with its own 400)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    # the defaults of checks.parse_message
    parts = {"agent_group": data.get("agent_group"), "channel": data.get("channel", "api"),
             "platform_id": data.get("platform_id", "default"),
             "thread_id": data.get("thread_id"), "mode": data.get("mode", default_mode)}
    if not all(isinstance(v, str) or v is None for v in parts.values()):
        return None
    if not isinstance(parts["agent_group"], str):
        return None
    return parts


def key_of(parts: dict[str, Any]) -> str:
    return conversation_key(parts["mode"], parts["agent_group"], parts.get("channel"),
                            parts.get("platform_id"), parts.get("thread_id"))


def unavailable(shard: str, url: str | None, retry_after: int, what: str) -> Response:
    where = f" ({url})" if url else ""
    return JSONResponse({"error": f"shard {shard}{where} is unreachable and may hold {what}; "
                         f"retry in {retry_after}s with the same Idempotency-Key",
                         "shard": shard},
                        status_code=503, headers={"Retry-After": str(retry_after)})


class ShardRouter:
    """Pure ASGI middleware; ``app`` is the local Starlette app."""

    def __init__(self, app: ASGIApp, peers: Peers, token: str | None, default_mode: str,
                 max_body: int, holds_local: HoldsLocal,
                 has_session_local: HasSessionLocal) -> None:
        self.app = app
        self.peers = peers
        self.token = token
        self.default_mode = default_mode
        self.max_body = max_body
        self.holds_local = holds_local
        self.has_session_local = has_session_local

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        path, method = scope["path"], scope["method"]
        if FORWARDED_BY in request.headers:
            await self._from_peer(request, scope, receive, send)
            return
        if path.startswith("/cluster/"):
            await error("peer route: shard-to-shard calls only", 403)(scope, receive, send)
            return
        if not path.startswith("/v1/") or not bearer_ok(request.headers.get("authorization"),
                                                        self.token):
            await self.app(scope, receive, send)  # local: its own 401 or route
            return
        if path == "/v1/messages" and method == "POST":
            await self._post_message(request, scope, send)
        elif path == "/v1/sessions" and method == "GET":
            await (await merged_sessions(self.peers, request))(scope, receive, send)
        elif path == "/v1/events" and method == "GET" and self._wants_stream(request):
            await merged_events(self.peers, request)(scope, receive, send)
        elif path.startswith(SESSION_PREFIX):
            await self._session_route(request, scope, receive, send)
        elif path == "/v1/deliveries/retry" and method == "POST":
            await self._retry(request, scope, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _wants_stream(request: Request) -> bool:
        accept = request.headers.get("accept", "").lower()
        return not ("application/json" in accept and "text/event-stream" not in accept)

    # --- from a peer -------------------------------------------------------------------

    async def _from_peer(self, request: Request, scope: Scope, receive: Receive,
                         send: Send) -> None:
        if not self.peers.peer_ok(request.headers.get(PEER_AUTH)):
            logger.warning("refused a shard-to-shard call to {} claiming to come from {!r}: "
                           "wrong or missing cluster secret ([cluster] peer_token_file must be "
                           "the same on every shard)", scope["path"],
                           request.headers.get(FORWARDED_BY, "")[:64])
            await error("wrong or missing X-Orchestrator-Peer-Auth (the cluster secret)",
                        401)(scope, receive, send)
            return
        path = scope["path"]
        if path == HOLDS_PATH:
            parts = {k: request.query_params.get(k) for k in
                     ("agent_group", "channel", "platform_id", "thread_id", "mode")}
            held = (isinstance(parts["agent_group"], str) and isinstance(parts["mode"], str)
                    and await asyncio.to_thread(self.holds_local, parts))
            await JSONResponse({"holds": bool(held)})(scope, receive, send)
            return
        if path == HAS_SESSION_PATH:
            sid = request.query_params.get("id", "")
            held = bool(sid) and await asyncio.to_thread(self.has_session_local, sid)
            await JSONResponse({"holds": held})(scope, receive, send)
            return
        # the local routes check the API token: the peer proved the cluster secret
        headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        if self.token is not None:
            headers.append((b"authorization", f"Bearer {self.token}".encode()))
        await self.app({**scope, "headers": headers}, receive, send)

    # --- POST /v1/messages -------------------------------------------------------------

    async def _post_message(self, request: Request, scope: Scope, send: Send) -> None:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                await self.app(scope, _replay(b"".join(chunks) + chunk), send)  # its 413
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        receive = _replay(body)
        parts = conversation_of(body, self.default_mode)
        if parts is None:
            await self.app(scope, receive, send)
            return
        try:
            here = await asyncio.to_thread(self.holds_local, parts)
        except Exception:  # noqa: BLE001 - e.g. a bad agent group: the local route says it
            await self.app(scope, receive, send)
            return
        if here:
            await self.app(scope, receive, send)
            return
        key = key_of(parts)
        cached = self.peers.conversation_cache.get(key)
        if cached is not None and self.peers.member(cached) is not None:
            await (await self.forward(request, cached, body))(scope, receive, send)
            return
        holder, unknown = await self.peers.find_conversation(parts)
        while holder is None:
            placed = place(key, [m.id for m in self.peers.members()], unknown,
                           self.peers.drain)
            blocked = placed.blocked_by
            if blocked is None:
                holder = placed.owner
                break
            # the one member that matters here is asked again (it may be back since
            # the last probe): it holds it, or it does not and placement goes on
            answer = await self.peers.ask_conversation(blocked, parts)
            if answer is None:
                member = self.peers.member(blocked)
                await unavailable(blocked, member.url if member else None,
                                  self.peers.retry_after, "this conversation")(
                                      scope, receive, send)
                return
            unknown.discard(blocked)
            if answer:
                holder = blocked
        if holder is None or holder == self.peers.self_id:
            await self.app(scope, receive, send)
            return
        self.peers.remember(self.peers.conversation_cache, key, holder)
        await (await self.forward(request, holder, body))(scope, receive, send)

    # --- /v1/sessions/{id}/... ---------------------------------------------------------

    async def _session_route(self, request: Request, scope: Scope, receive: Receive,
                             send: Send) -> None:
        sid = scope["path"][len(SESSION_PREFIX):].split("/", 1)[0]
        if not sid or await asyncio.to_thread(self.has_session_local, sid):
            await self.app(scope, receive, send)
            return
        holder, unknown = await self.peers.find_session(sid)
        if holder is None:
            if unknown:
                shard = sorted(unknown)[0]
                member = self.peers.member(shard)
                await unavailable(shard, member.url if member else None,
                                  self.peers.retry_after, f"session {sid[:80]}")(
                                      scope, receive, send)
                return
            await self.app(scope, receive, send)  # its 404
            return
        body = await request.body() if scope["method"] not in ("GET", "HEAD") else b""
        await (await self.forward(request, holder, body))(scope, receive, send)

    # --- POST /v1/deliveries/retry ------------------------------------------------------

    async def _retry(self, request: Request, scope: Scope, send: Send) -> None:
        """One session's: to the shard holding it. Every session's (no id): every shard,
        the counts summed (a shard that does not answer is named in ``unavailable``)."""
        body = await request.body()
        receive = _replay(body)
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            await self.app(scope, receive, send)  # its 400
            return
        sid = data.get("session_id")
        if isinstance(sid, str):
            if await asyncio.to_thread(self.has_session_local, sid):
                await self.app(scope, receive, send)
                return
            holder, unknown = await self.peers.find_session(sid)
            if holder is None and unknown:
                shard = sorted(unknown)[0]
                member = self.peers.member(shard)
                await unavailable(shard, member.url if member else None,
                                  self.peers.retry_after, f"session {sid[:80]}")(
                                      scope, receive, send)
            elif holder is None:
                await self.app(scope, receive, send)  # its 404
            else:
                await (await self.forward(request, holder, body))(scope, receive, send)
            return
        if sid is not None:
            await self.app(scope, receive, send)  # its 400
            return
        members = self.peers.members()

        async def one(url: str) -> int | None:
            try:
                resp = await self.peers.client.post(url + "/v1/deliveries/retry", json={},
                                                    headers=self.peers.headers())
            except httpx.HTTPError:
                return None
            return int(resp.json().get("retried", 0)) if resp.status_code == 200 else None

        counts = await asyncio.gather(*(one(m.url) for m in members))
        missing = sorted(m.id for m, n in zip(members, counts, strict=True) if n is None)
        await JSONResponse({"retried": sum(n or 0 for n in counts),
                            **({"unavailable": missing} if missing else {})})(
                                scope, receive, send)

    # --- forwarding --------------------------------------------------------------------

    async def forward(self, request: Request, shard: str, body: bytes) -> Response:
        """The request as sent, to ``shard``; its status, headers and body streamed back.
        Unreachable: 503 + Retry-After naming it — at once while its last contact failed
        (the probe, every ``probe_interval``, says when it is back): a dead node is not
        dialled, and waited for up to ``peer_timeout``, once per request for it."""
        member = self.peers.member(shard)
        if member is None:
            return error(f"shard {shard} is no longer a member; retry", 503)
        if self.peers.failed_last(shard):
            return unavailable(shard, member.url, self.peers.retry_after,
                               "this request's conversation")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers.update(self.peers.headers())
        url = member.url + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        req = self.peers.client.build_request(request.method, url, headers=headers,
                                              content=body or None,
                                              timeout=self.peers.forward_timeout)
        try:
            resp = await self.peers.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            # (its cached sessions stay: a session never moves, and a down shard's
            # are refused above without a call)
            self.peers.note(shard, False, f"{request.method} {request.url.path}: "
                            f"{type(exc).__name__}")
            return unavailable(shard, member.url, self.peers.retry_after,
                               "this request's conversation")
        self.peers.note(shard, True)
        out = {k: resp.headers[k] for k in PASSED_BACK if k in resp.headers}
        out["x-orchestrator-shard"] = shard
        if "content-length" in resp.headers:
            out["content-length"] = resp.headers["content-length"]

        async def chunks() -> Any:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                return  # the owner went away mid-answer: the client sees a short body
            finally:
                await resp.aclose()

        return StreamingResponse(chunks(), status_code=resp.status_code, headers=out)


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the already-read body to the local app once."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # then only a disconnect would come: never
        return {"type": "http.disconnect"}

    return receive


def local_lookups(registry: Any) -> tuple[HoldsLocal, HasSessionLocal]:
    """Whether this shard's registry holds a conversation / a session id (worker
    thread: one or two indexed SQLite reads)."""
    from orchestrator.host.sessions import resolution_key

    def holds(parts: dict[str, Any]) -> bool:
        mode = parts["mode"]
        if mode == "agent-shared":
            mg = None
        else:
            if not parts.get("channel") or not parts.get("platform_id"):
                return False
            mg = registry.find_messaging_group(parts["channel"], parts["platform_id"])
            if mg is None:
                return False
        try:
            key = resolution_key(mode, parts["agent_group"], mg, parts.get("thread_id"))
        except ValueError:
            return False
        return registry.find_session(key) is not None

    def has_session(session_id: str) -> bool:
        return registry.session(session_id) is not None

    return holds, has_session
