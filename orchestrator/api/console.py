"""The operator's console behind ``GET /``: its files and the routes it needs beyond the
session and message routes (issue 27).

Everything the page does goes through these public routes, so a script can do the
same: the fleet's tiles and last hour (``GET /v1/fleet``), a session's status
timeline and agent runs (``GET /v1/sessions/{id}/timeline``), answering a question
card (``POST /v1/sessions/{id}/answer``), the series (``GET /v1/series``,
``POST /v1/series/{id}/cancel``) and the groups' effective settings
(``GET /v1/groups``, secrets by path only). A mixin of ``app.Api``; registry and
session-file work runs in a worker thread, as in ``app``.

The sessions list is paged on the server (``paged_rows``): filter and sort on the
registry's columns only (one SQL read, no session folder opened), then read the
files of the page's rows alone, so 10 000 sessions cost one page's reads. Pages go
by a **cursor** (``page_cursor``: the last row's sort key, opaque to clients; the
next page's is ``X-Next-Cursor``), which works the same on one orchestrator and on
the merged list of every shard (``api.shard_merge``: each shard's page after the
cursor, merged by the same key) — an offset cannot be merged. ``offset`` still works
on one orchestrator.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import datetime
from importlib import resources
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator.api.checks import BadRequest, error, loads
from orchestrator.api.history import History, totals
from orchestrator.config import groups as groups_mod
from orchestrator.config.show import HIDDEN
from orchestrator.contract.layout import InvalidId, validate_id
from orchestrator.contract.session_status import Status
from orchestrator.engine.ports import Control
from orchestrator.host import destinations, series
from orchestrator.host.registry import SessionRow
from orchestrator.host.sessions import MessageError
from orchestrator.host.status import is_paused
from orchestrator.rules.admission import resolve_max_agents

ASSETS = {"console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "object-src 'none'")
SORTS = ("agent_group", "session_id", "status", "last_active", "created_at", "chat")
STATUS_FILTERS = ("running", "idle", "paused", "stopped", "queued")
MAX_PAGE = 1000


def asset(name: str) -> str:
    return resources.files("orchestrator.api").joinpath(f"console_assets/{name}").read_text(
        encoding="utf-8")


# --- pure decisions (table-tested) ---------------------------------------------------------


def state_of(s: SessionRow) -> str:
    """The console's one word for a session: running, idle, paused, stopped or queued."""
    if s.container_status == Status.STOPPED and s.queued_since is not None:
        return "queued"
    if is_paused(s.container_status, s.status_reason):
        return "paused"
    return str(s.container_status)


def chat_text(route: tuple[str | None, str | None, str | None]) -> str:
    ct, pid, thread = route
    if not ct:
        return ""
    return f"{ct}:{pid}" + (f" / {thread}" if thread else "")


def matches(s: SessionRow, route: tuple[str | None, str | None, str | None],
            q: str | None, status: str | None, group: str | None) -> bool:
    """The list's filter: ``q`` (case-insensitive) in the id, group or chat; ``status``
    one of the container statuses or ``paused``/``queued``; ``group`` exact."""
    if group is not None and s.agent_group_id != group:
        return False
    if status is not None and status not in (s.container_status, state_of(s)):
        return False
    if q:
        needle = q.lower()
        return any(needle in text.lower() for text in (s.id, s.agent_group_id,
                                                        chat_text(route)))
    return True


def sort_key(sort: str, s: SessionRow, route: tuple[str | None, str | None, str | None]
             ) -> tuple:
    """A key that orders every row (None last ascending), ties broken by id."""
    value: Any = {"agent_group": s.agent_group_id, "session_id": s.id,
                  "status": state_of(s), "last_active": s.last_active,
                  "created_at": s.created_at, "chat": chat_text(route)}[sort]
    if isinstance(value, datetime):
        value = value.timestamp()
    return (value is None, value if value is not None else 0, s.id)


def row_key(sort: str | None, s: SessionRow,
            route: tuple[str | None, str | None, str | None]) -> list[Any]:
    """A row's place in the list as JSON-able values (what a cursor holds): the sort's
    key, or without one the registry's order (group, creation time, id)."""
    if sort is None:
        return [s.agent_group_id, s.created_at.isoformat() if s.created_at else "", s.id]
    return list(sort_key(sort, s, route))


def page_cursor(key: list[Any]) -> str:
    """A row key as an opaque, URL-safe cursor."""
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_key(text: str) -> list[Any]:
    """The row key of a cursor; BadRequest for one this server did not give."""
    try:
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        key = None
    if not isinstance(key, list) or len(key) != 3 or not isinstance(key[2], str):
        raise BadRequest("cursor must be the X-Next-Cursor of the previous page "
                         f"(got {text[:40]!r})")
    return key


def after(key: list[Any], cursor: list[Any], order: str) -> bool:
    """Whether a row with ``key`` comes after ``cursor`` in the list's order (a cursor of
    another sort never compares: BadRequest)."""
    try:
        return key > cursor if order == "asc" else key < cursor
    except TypeError:
        raise BadRequest("cursor is from a list with another sort: start again without "
                         "it") from None


def page_params(params: Any) -> dict[str, Any]:
    """The list's query parameters, checked: one line naming the wrong one."""
    out: dict[str, Any] = {"q": params.get("q") or None, "status": params.get("status"),
                           "group": params.get("agent_group"),
                           "sort": params.get("sort"), "order": params.get("order", "asc"),
                           "limit": None, "offset": 0, "cursor": None,
                           "with_cursor": "cursor" in params}
    if params.get("cursor"):
        out["cursor"] = cursor_key(params["cursor"])
    if out["status"] is not None and out["status"] not in STATUS_FILTERS:
        raise BadRequest(f"status must be one of {', '.join(STATUS_FILTERS)}, "
                         f"got {out['status'][:40]!r}")
    if out["sort"] is not None and out["sort"] not in SORTS:
        raise BadRequest(f"sort must be one of {', '.join(SORTS)}, got {out['sort'][:40]!r}")
    if out["order"] not in ("asc", "desc"):
        raise BadRequest(f"order must be asc or desc, got {out['order'][:40]!r}")
    for name, low, high in (("limit", 1, MAX_PAGE), ("offset", 0, 10**9)):
        raw = params.get(name)
        if raw is None:
            continue
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise BadRequest(f"{name} must be a whole number from {low} to {high}")
        out[name] = int(raw)
    return out


def select(sessions: list[SessionRow], routes: dict[str, tuple[str | None, str | None,
                                                               str | None]],
           p: dict[str, Any]) -> tuple[list[SessionRow], int, bool]:
    """(the page's sessions, how many matched in all, whether rows follow the page).
    Pure."""
    def route(s: SessionRow) -> tuple[str | None, str | None, str | None]:
        return routes.get(s.id, (None, None, None))

    found = [s for s in sessions if matches(s, route(s), p["q"], p["status"], p["group"])]
    if p["sort"] is not None:
        found.sort(key=lambda s: sort_key(p["sort"], s, route(s)),
                   reverse=p["order"] == "desc")
    elif p["order"] == "desc":
        found.reverse()
    rest = found
    if p.get("cursor") is not None:
        rest = [s for s in found
                if after(row_key(p["sort"], s, route(s)), p["cursor"], p["order"])]
    end = None if p["limit"] is None else p["offset"] + p["limit"]
    return rest[p["offset"]:end], len(found), end is not None and len(rest) > end


def paged_rows(registry: Any, params: dict[str, Any],
               rows: Callable[[set[str], list[SessionRow]], list[dict[str, Any]]]
               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(the page's ``GET /v1/sessions`` rows in order, the headers: ``X-Total-Count``
    rows matched in all, ``X-Next-Cursor`` when more follow): the registry read once,
    the page chosen from it, then only the page's folders read by ``rows``
    (``Api._rows``). With ``cursor`` in the query (even empty: the first page) each row
    carries its own ``cursor`` too (what the shards' merge orders by). Runs in a worker
    thread."""
    every = registry.sessions()
    routes = registry.routes()
    chosen, total, more = select(every, routes, params)
    order = {s.id: i for i, s in enumerate(chosen)}
    keys = {s.id: page_cursor(row_key(params["sort"], s, routes.get(s.id, (None, None, None))))
            for s in chosen}
    out = sorted(rows(set(order), every), key=lambda r: order[r["session_id"]])
    if params.get("with_cursor"):
        for row in out:
            row["cursor"] = keys[row["session_id"]]
    headers = {"X-Total-Count": str(total)}
    if more and chosen:
        headers["X-Next-Cursor"] = keys[chosen[-1].id]
    return out, headers


def runs(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A session's agent runs from its status changes: each from a start (out of
    ``stopped``) to the next ``stopped``, whose reason is the exit reason. Pure."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for c in changes:
        if c["new"] != Status.STOPPED and c["old"] in (None, Status.STOPPED):
            current = {"started_at": c["at"], "ended_at": None, "exit_reason": None,
                       "seconds": None}
            out.append(current)
        elif c["new"] == Status.STOPPED and c["old"] not in (None, Status.STOPPED) \
                and current is not None:
            current["ended_at"] = c["at"]
            current["exit_reason"] = c["reason"]
            current["seconds"] = _seconds(current["started_at"], c["at"])
            current = None
    return out


def _seconds(start: str, end: str) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start))
                     .total_seconds(), 3)
    except ValueError:
        return None


def shown_settings(cfg: Any, group: str) -> dict[str, Any]:
    """A group's effective settings as ``group show`` prints them, with plain ``env``
    values hidden as ``config show`` does (secret files appear by path only)."""
    described = groups_mod.resolve(cfg, group).describe()
    described["env"] = {k: HIDDEN for k in described["env"]}
    return described


async def small_body(request: Request, limit: int = 64 * 1024) -> bytes:
    """A console action's JSON body, refused (413) beyond ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body is over the {limit}-byte limit of this route", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# --- the routes ----------------------------------------------------------------------------


class ConsoleRoutes:
    control: Control
    history: History

    async def console_asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return error(f"no console file {name[:100]!r}", 404)
        return Response(asset(name), media_type=ASSETS[name],
                        headers={"Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})

    def _tiles(self) -> dict[str, Any]:
        """Counts by state from the registry (one SQL read, no session folder)."""
        counts = dict.fromkeys(STATUS_FILTERS, 0)
        for s in self.control.registry.sessions():
            counts[state_of(s)] = counts.get(state_of(s), 0) + 1
        cfg = self.control.cfg
        cap, _ = resolve_max_agents(cfg.runtime.max_agents, cfg.docker.memory)
        return {"sessions": counts, "total": sum(counts.values()),
                "agents": counts["running"] + counts["idle"] + counts["paused"],
                "max_agents": cap or None}

    async def fleet(self, request: Request) -> Response:
        tiles = await asyncio.to_thread(self._tiles)
        samples = self.history.samples()
        hour = totals(self.history.ring, samples[-1]["t"] - 3600) if samples else {}
        last = samples[-1] if samples else {}
        for key in ("delivered", "failed", "messages_failed"):
            hour[key] = hour.get(key, 0) + last.get(key, 0)  # the live step too
        return JSONResponse({"interval_seconds": self.history.interval, "tiles": tiles,
                             "last_hour": hour, "samples": samples})

    async def timeline(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        registry = self.control.registry
        if await asyncio.to_thread(registry.session, sid) is None:
            return error(f"no session {sid!r}", 404)
        changes = await asyncio.to_thread(registry.status_changes, sid)
        return JSONResponse({"changes": changes[-500:], "runs": runs(changes)[-100:]})

    async def answer(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        data = loads(await small_body(request))
        if not isinstance(data, dict) or not {"question_id", "option"} <= set(data) \
                or set(data) - {"question_id", "option", "user"}:
            raise BadRequest('body must be {"question_id": "...", "option": "...", '
                             '"user": optional}')
        if not all(isinstance(data.get(k, ""), str) for k in ("question_id", "option", "user")):
            raise BadRequest("question_id, option and user must be strings")
        session = await asyncio.to_thread(self.control.registry.session, sid)
        if session is None:
            return error(f"no session {sid!r}", 404)
        try:
            mid, _ = await asyncio.to_thread(
                self.control.sessions.write_system_response, session, data["question_id"],
                data["option"], data.get("user", ""))
        except (MessageError, ValueError) as exc:
            raise BadRequest(str(exc)) from None
        return JSONResponse({"session_id": sid, "message_id": mid}, status_code=201)

    async def list_series(self, request: Request) -> Response:
        group = request.query_params.get("agent_group")
        sid = request.query_params.get("session_id")
        cfg = self.control.cfg
        rows = await asyncio.to_thread(series.collect, cfg.data_dir, self.control.registry,
                                       group)
        return JSONResponse([r for r in series.as_dicts(rows)
                             if sid is None or r["session_id"] == sid])

    async def cancel_series(self, request: Request) -> Response:
        series_id = request.path_params["series_id"]
        try:
            validate_id(series_id, "series id")
        except InvalidId:
            return error(f"no series {series_id[:100]!r}", 404)
        try:
            recurred, removed = await asyncio.to_thread(
                series.cancel, self.control.cfg.data_dir, self.control.registry, series_id)
        except series.SeriesError as exc:
            status = 404 if str(exc).startswith("no series") else 409
            return error(str(exc), status)
        return JSONResponse({"series_id": series_id, "cancelled": True,
                             "recurring_rows": recurred, "removed_pending": removed})

    def _groups(self) -> list[dict[str, Any]]:
        cfg, registry = self.control.cfg, self.control.registry
        by_group: dict[str, int] = {}
        for s in registry.sessions():
            by_group[s.agent_group_id] = by_group.get(s.agent_group_id, 0) + 1
        configured = {g.name for g in cfg.groups}
        all_series = series.as_dicts(series.collect(cfg.data_dir, registry))
        out = []
        for name in sorted(set(by_group) | configured):
            dests = [{"name": d.name, "type": d.type, "display_name": d.display_name,
                      "channel_type": d.channel_type, "platform_id": d.platform_id,
                      "target_agent_group_id": d.agent_group_id, "source": source}
                     for d, source in destinations.projected(registry, name)]
            out.append({"group": name, "configured": name in configured,
                        "sessions": by_group.get(name, 0),
                        "settings": shown_settings(cfg, name), "destinations": dests,
                        "series": [r for r in all_series if r["agent_group"] == name]})
        return out

    async def list_groups(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self._groups))
