"""What a client reads across every shard (issue 23): ``GET /v1/sessions`` merged and
paged, and ``GET /v1/events`` as one stream of every shard's events.

**Sessions**: every member (this one included, through the same peer call) is asked
at once, each bounded by a timeout, with the client's filter, sort and ``cursor``;
each shard answers its first ``limit`` rows after the cursor, each row carrying its
own cursor (``api.console.page_cursor``: its sort key, ending in the session id, so
unique across shards and one position in every shard's list at once). The rows
(each with a ``shard`` field) are merged by that key and the first ``limit`` are the
page — the same page one orchestrator holding every session would give. The body
stays the single-orchestrator shape (a JSON list); ``X-Total-Count`` is the sum,
``X-Next-Cursor`` names the next page and ``X-Unavailable-Shards`` the shards that did
not answer (their rows are missing). ``offset`` works for the first ``MAX_PAGE`` rows
(every shard is asked for ``offset + limit``); beyond, page with the cursor.

**Events**: one reader task per member streams its ``/v1/events`` (peer-authenticated)
into one bounded queue; each event goes out with ``shard`` added to its data and an
SSE ``id`` that is the composite cursor (``rules.placement.encode_cursor``: the last
event id of every shard). A client that reconnects with it as ``Last-Event-ID``
resumes every shard where it left off — a shard that was down is read again from
where it stopped (or from its start if this stream never reached it), so a stream
read across a shard's crash misses nothing. A member that cannot be reached is
retried every second; ``event: shard_unavailable`` says so once per outage. A
member that joins while a stream is open (a Pod seen, a SIGHUP reload) is read from
its start within ``MEMBERS_CHECK``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Callable

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orchestrator.api.checks import BadRequest, error
from orchestrator.api.console import MAX_PAGE, cursor_key
from orchestrator.api.event_routes import KEEPALIVE
from orchestrator.api.peers import Peers
from orchestrator.config.cluster import Member
from orchestrator.rules.placement import decode_cursor, encode_cursor, start_position

MEMBERS_CHECK = 1.0  # s: how soon an open stream starts reading a member that joined
RECONNECT = 1.0
LIST_READ_TIMEOUT = 60.0
QUEUE_MAX = 10_000


# --- GET /v1/sessions -----------------------------------------------------------------


async def _rows_of(peers: Peers, member: Member, params: dict[str, str]
                   ) -> tuple[int, Any, httpx.Headers] | None:
    try:
        resp = await peers.client.get(f"{member.url}/v1/sessions", params=params,
                                      headers=peers.headers(),
                                      timeout=httpx.Timeout(peers.timeout,
                                                            read=LIST_READ_TIMEOUT))
    except httpx.HTTPError as exc:
        peers.note(member.id, False, f"GET /v1/sessions: {type(exc).__name__}")
        return None
    peers.note(member.id, True)
    return resp.status_code, resp.json(), resp.headers


def _number(params: dict[str, str], name: str, low: int, high: int) -> int | None:
    raw = params.pop(name, None)
    if raw is None:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def shard_params(query: dict[str, str]) -> tuple[dict[str, str], int | None, int]:
    """(what every shard is asked, the page's limit, its offset); BadRequest naming the
    wrong parameter. Every shard is asked for its first ``offset + limit`` rows after
    the cursor (the page is among them), each row with its cursor."""
    params = dict(query)
    limit = _number(params, "limit", 1, MAX_PAGE)
    offset = _number(params, "offset", 0, MAX_PAGE) or 0
    if params.get("cursor"):
        cursor_key(params["cursor"])  # checked here; every shard applies it
    if limit is not None:
        if offset + limit > MAX_PAGE:
            raise BadRequest(f"offset + limit over {MAX_PAGE}: page the merged list with "
                             "cursor (X-Next-Cursor), not offset")
        params["limit"] = str(offset + limit)
    elif offset:
        raise BadRequest("offset needs limit")
    params["cursor"] = params.get("cursor", "")
    return params, limit, offset


def row_order(row: dict[str, Any]) -> list[Any]:
    """A merged row's key: its cursor's (a shard of an older version gives none: by id)."""
    try:
        return cursor_key(str(row.get("cursor", "")))
    except BadRequest:
        return [False, row["session_id"], row["session_id"]]


async def merged_sessions(peers: Peers, request: Request) -> Response:
    try:
        params, limit, offset = shard_params(dict(request.query_params))
    except BadRequest as exc:
        return error(str(exc), 400)
    members = peers.members()
    answers = await asyncio.gather(*(_rows_of(peers, m, params) for m in members))
    rows: list[dict[str, Any]] = []
    missing = []
    total, more = 0, False
    for member, answer in zip(members, answers, strict=True):
        if answer is None or answer[0] != 200:
            if answer is not None and member.id == peers.self_id:
                return JSONResponse(answer[1], status_code=answer[0])  # its 400
            missing.append(member.id)
            continue
        _, body, got = answer
        total += int(got.get("x-total-count") or len(body))
        more = more or "x-next-cursor" in got
        for row in body:
            row["shard"] = member.id
            peers.remember(peers.session_cache, row["session_id"], member.id)
            rows.append(row)
    try:
        rows.sort(key=row_order, reverse=params.get("order") == "desc")
    except TypeError:
        return error("the shards disagree about the rows' order (different versions?)", 502)
    headers = {"X-Total-Count": str(total)}
    if limit is not None:
        more = more or len(rows) > offset + limit
        rows = rows[offset:offset + limit]
        if more and rows:
            headers["X-Next-Cursor"] = rows[-1]["cursor"]
    if missing:
        headers["X-Unavailable-Shards"] = ",".join(sorted(missing))
    return JSONResponse(rows, headers=headers)


# --- GET /v1/events -------------------------------------------------------------------


async def sse_messages(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, str]]:
    """The messages of an SSE stream: {"id", "event", "data"} (comments and ``retry``
    skipped)."""
    msg: dict[str, str] = {}
    async for line in lines:
        if line == "":
            if "data" in msg or "id" in msg:
                yield msg
            msg = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name in ("id", "event"):
            msg[name] = value
        elif name == "data":
            msg["data"] = msg["data"] + "\n" + value if "data" in msg else value


async def _read_shard(peers: Peers, member: Member, position: int,
                      queue: asyncio.Queue[tuple[str, int | None, dict[str, str]]]) -> None:
    """Stream one member's events into ``queue`` for as long as the client reads."""
    reported = False
    while True:
        headers = {**peers.headers(), "accept": "text/event-stream"}
        if position >= 0:
            headers["last-event-id"] = str(position)
        try:
            async with peers.client.stream("GET", f"{member.url}/v1/events", headers=headers,
                                           timeout=httpx.Timeout(peers.timeout, read=None)
                                           ) as resp:
                if resp.status_code != 200:
                    raise httpx.HTTPStatusError("not 200", request=resp.request, response=resp)
                peers.note(member.id, True)
                reported = False
                async for msg in sse_messages(resp.aiter_lines()):
                    ident = msg.get("id")
                    if ident is not None and ident.isdigit():
                        position = int(ident)
                    await queue.put((member.id, position if ident else None, msg))
        except (httpx.HTTPError, ValueError) as exc:
            if not reported:
                peers.note(member.id, False, f"GET /v1/events: {type(exc).__name__}")
                reported = True
                await queue.put((member.id, None, {"event": "shard_unavailable",
                                                   "data": "{}"}))
            if position < 0:
                position = 0  # never reached: when it is back, read all of it
        await asyncio.sleep(RECONNECT)


def merged_events(peers: Peers, request: Request) -> Response:
    header = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    cursor = decode_cursor(header)
    if header and cursor is None and not header.isdigit():
        return error("Last-Event-ID must be a cursor of this cluster's /v1/events "
                     "(c1:SHARD=ID,...)", 400)
    return StreamingResponse(_merged(peers, cursor), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _event_text(shard: str, msg: dict[str, str], positions: dict[str, int] | None) -> str:
    """One shard's event as the merged stream sends it: ``shard`` in its data, and (when
    it had an id) the composite cursor of every shard's position as its id."""
    try:
        data = json.loads(msg.get("data") or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {"data": data}
    data["shard"] = shard
    line = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    ident = ""
    if positions is not None:
        ident = f"id: {encode_cursor({k: v for k, v in positions.items() if v >= 0})}\n"
    return f"{ident}event: {msg.get('event', 'message')}\ndata: {line}\n\n"


async def _merged(peers: Peers, cursor: dict[str, int] | None) -> AsyncIterator[str]:
    queue: asyncio.Queue[tuple[str, int | None, dict[str, str]]] = asyncio.Queue(QUEUE_MAX)
    positions: dict[str, int] = {}
    tasks: list[asyncio.Task] = []

    def join_new(start: Callable[[str], int]) -> None:
        """A reader for every member this stream does not read yet (all of them at
        first; later the ones that joined: from their start, as a cursor that does not
        name a member does)."""
        for member in peers.members():
            if member.id not in positions:
                positions[member.id] = start(member.id)
                tasks.append(asyncio.create_task(
                    _read_shard(peers, member, positions[member.id], queue),
                    name=f"events-{member.id}"))

    join_new(lambda ident: start_position(cursor, ident))
    quiet = 0.0
    try:
        yield "retry: 1000\n\n"
        while True:
            try:
                shard, position, msg = await asyncio.wait_for(queue.get(), MEMBERS_CHECK)
            except asyncio.TimeoutError:
                join_new(lambda ident: 0)
                quiet += MEMBERS_CHECK
                if quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                continue
            quiet = 0.0
            if len(positions) != len(peers.members()):
                join_new(lambda ident: 0)
            if position is not None:
                positions[shard] = position
            yield _event_text(shard, msg, positions if position is not None else None)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
