"""The API's reading side of messages and its own description: ``GET /openapi.json``,
a session's messages (``GET /v1/sessions/{id}/messages``, one message, a reply's
file). A mixin of ``app.Api``: the handlers run on the supervisor's loop and read
the session's files in a worker thread through ``host.messages`` (``SessionDir``:
no link followed, the read deadline), so a hostile session costs its own request
a 409, never the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any, Callable
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orchestrator.api import openapi
from orchestrator.api.checks import BadRequest
from orchestrator.api.hub import file_entries
from orchestrator.contract.layout import InvalidId, validate_id
from orchestrator.engine.ports import Control
from orchestrator.host import messages
from orchestrator.host.agent_logs import AgentLogs


class MessageRoutes:
    control: Control

    async def openapi_doc(self, request: Request) -> Response:
        return JSONResponse(openapi.document(), headers={"Cache-Control": "no-store"})

    async def _session(self, sid: str) -> Any:
        session = await asyncio.to_thread(self.control.registry.session, sid)
        if session is None:
            raise BadRequest(f"no session {sid!r}", 404)
        return session

    def _read(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A reader of a session's files (worker thread): the agent's bad files are a
        409 naming them, a missing folder a 404."""
        try:
            return fn(*args, **kwargs)
        except messages.CursorError as exc:
            raise BadRequest(str(exc)) from None
        except FileNotFoundError:
            raise BadRequest(f"{what}: not found", 404) from None
        except (OSError, sqlite3.Error) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise BadRequest(f"{what}: its files cannot be read ({line})", 409) from None

    def _shown(self, session_id: str, item: dict[str, Any]) -> dict[str, Any]:
        names = item.pop("files")
        if item["direction"] == "out":
            item["files"] = file_entries(session_id, item["id"], {"files": names})
        else:
            item["files"] = [{"name": n, "url": None} for n in names]
        item.setdefault("problem", None)
        return item

    async def list_messages(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= messages.MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {messages.MAX_LIMIT}")
        cursor = request.query_params.get("cursor") or None
        session = await self._session(sid)
        page = await asyncio.to_thread(
            self._read, f"session {sid}", messages.list_messages, self.control.cfg.data_dir,
            session.agent_group_id, sid, limit=int(raw), cursor=cursor,
            max_bytes=self.control.cfg.delivery.max_content_bytes)
        return JSONResponse({"messages": [self._shown(sid, m) for m in page.messages],
                             "next_cursor": page.next_cursor})

    async def get_message(self, request: Request) -> Response:
        sid, mid = request.path_params["session_id"], request.path_params["message_id"]
        session = await self._session(sid)
        item = await asyncio.to_thread(
            self._read, f"session {sid}", messages.find_message, self.control.cfg.data_dir,
            session.agent_group_id, sid, mid,
            max_bytes=self.control.cfg.delivery.max_content_bytes)
        if item is None:
            raise BadRequest(f"session {sid} has no message {mid!r}", 404)
        return JSONResponse(self._shown(sid, item))

    async def get_file(self, request: Request) -> Response:
        sid, mid = request.path_params["session_id"], request.path_params["message_id"]
        name = request.path_params["name"]
        session = await self._session(sid)
        missing = f"session {sid}: reply {mid!r} has no delivered file {name[:100]!r}"
        try:
            validate_id(mid, "message id")
        except InvalidId:
            raise BadRequest(missing, 404) from None
        if messages.check_name(name):
            raise BadRequest(missing, 404)
        data_dir = self.control.cfg.data_dir

        def opened() -> tuple[int, int] | None:
            if not messages.reply_of(data_dir, session.agent_group_id, sid, mid):
                return None
            return messages.open_reply_file(data_dir, mid, name)

        found = await asyncio.to_thread(self._read, missing, opened)
        if found is None:
            raise BadRequest(missing, 404)
        fd, size = found
        return StreamingResponse(messages.Chunks(fd), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size),
                                          "Content-Disposition": "attachment; filename*=UTF-8''"
                                          + quote(name, safe=""),
                                          "X-Content-Type-Options": "nosniff",
                                          "Cache-Control": "no-store"})

    async def get_logs(self, request: Request) -> Response:
        """``GET /v1/sessions/{id}/logs[?run=N]``: one run's kept output (default the
        newest), its last ``[sessions] max_agent_log_bytes`` at most, as the agent wrote
        it (text/plain, never interpreted; ``nosniff``). X-Agent-Log-Run names the run,
        X-Agent-Log-Runs every kept one, X-Agent-Log-Size the file's whole size."""
        sid = request.path_params["session_id"]
        raw = request.query_params.get("run")
        if raw is not None and not (raw.isdigit() and len(raw) <= 9):
            raise BadRequest("run must be a whole number (a run of GET .../logs: "
                             "X-Agent-Log-Runs)")
        session = await self._session(sid)
        store = AgentLogs.of(self.control.cfg)
        found = await asyncio.to_thread(self._read, f"session {sid}", store.read,
                                        session.agent_group_id, sid,
                                        int(raw) if raw is not None else None)
        if found is None:
            raise BadRequest(f"session {sid} has no kept agent output"
                             + (f" of run {int(raw)}" if raw is not None else ""), 404)
        return Response(found.data, media_type="text/plain; charset=utf-8", headers={
            "X-Agent-Log-Run": str(found.run),
            "X-Agent-Log-Runs": ",".join(str(r) for r in found.runs),
            "X-Agent-Log-Size": str(found.size),
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})
