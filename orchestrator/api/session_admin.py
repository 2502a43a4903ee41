"""``DELETE /v1/sessions/{id}`` (issue 26.1): archive or delete one session by hand.

A mixin of ``app.Api``. The engine does the work (``Control.remove_session``: a running
agent is stopped first, then the crash-safe removal of ``host.retention`` runs in a
worker thread). Query parameters, both ``false`` unless given:

- ``archive=true``: keep one compressed file of it under ``[retention] archive_dir``
  (``orchestrator sessions restore ID`` puts it back); otherwise it is deleted;
- ``force=true``: also when it has pending messages or undelivered replies (lost).

200 ``{"session_id", "action": "archived"|"deleted", "archive"}``; 404 for an unknown
session; 409 with one line when it has pending work and no ``force`` (or its agent did
not stop in time); 400 for a bad parameter.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator.api.checks import BadRequest
from orchestrator.contract.layout import InvalidId, validate_id
from orchestrator.engine.ports import Control

FLAGS = {"true": True, "false": False, "1": True, "0": False}


def flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in FLAGS:
        raise BadRequest(f"{name} must be true or false, got {value!r}")
    return FLAGS[value]


class SessionAdminRoutes:
    control: Control

    async def delete_session(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        try:
            validate_id(sid, "session id")
        except InvalidId as exc:
            raise BadRequest(str(exc), 404) from None
        archive, force = flag(request, "archive"), flag(request, "force")
        outcome = await self.control.remove_session(sid, "archive" if archive else "delete",
                                                    force)
        if outcome.action == "missing":
            raise BadRequest(f"no session {sid!r}", 404)
        if outcome.action not in ("archived", "deleted"):
            raise BadRequest(f"session {sid}: not removed: {outcome.reason}", 409)
        return JSONResponse({"session_id": sid, "action": outcome.action,
                             "archive": outcome.archive})
