"""The console's routes in the OpenAPI document (issue 27): fleet, groups, series,
a session's timeline and the answer to a question card, and the page's own files.

Kept beside ``openapi`` like ``openapi_webhooks``: standalone (no import of
``openapi``, which merges these in), so the console's owner changes its routes'
description in one place. ``tests/api/test_openapi.py`` checks route ↔ document.
"""

from __future__ import annotations

from typing import Any

NUM_OR_NULL = {"type": ["number", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}
INT = {"type": "integer", "minimum": 0}
AUTHED = ("400", "401", "403", "404", "500")
SID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _obj(props: dict[str, Any], *, extra: bool = False, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": list(props)}
    if not extra:
        out["additionalProperties"] = False
    return {**out, **more}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(code: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {code: {"description": description,
                   "content": {"application/json": {"schema": schema}}}}


def _op(op_id: str, summary: str, ok: dict[str, Any], *codes: str, **more: Any
        ) -> dict[str, Any]:
    errs = {c: {"$ref": f"#/components/responses/E{c}"} for c in codes}
    return {"operationId": op_id, "summary": summary, "responses": {**ok, **errs}, **more}


SAMPLE = _obj({
    "t": {"type": "number", "description": "Unix time (seconds)"},
    "running": INT, "idle": INT,
    "queued": {"type": ["integer", "null"], "description": "admission queue length"},
    "delivered": INT, "failed": INT, "messages_failed": INT,
    "delay_p50": {**NUM_OR_NULL, "description": "reply delivery delay (s), estimated "
                  "from the histogram's buckets; null: none delivered in the step"},
    "delay_p99": NUM_OR_NULL,
    "starts": INT, "start_seconds": {**NUM_OR_NULL, "description": "mean time to start"},
}, description="counts are those since the previous sample; the last sample is the "
   "live step up to now")

FLEET = _obj({
    "interval_seconds": {"type": "number"},
    "tiles": _obj({"sessions": _obj({k: INT for k in ("running", "idle", "paused",
                                                      "stopped", "queued")}),
                   "total": INT, "agents": INT,
                   "max_agents": {"type": ["integer", "null"],
                                  "description": "null: no cap"}}),
    "last_hour": _obj({"delivered": INT, "failed": INT, "messages_failed": INT}),
    "samples": {"type": "array", "items": _ref("FleetSample"),
                "description": "oldest first; at most one hour (kept in memory)"},
})

CHANGE = _obj({"at": {"type": "string"}, "old": STR_OR_NULL, "new": {"type": "string"},
               "reason": {"type": "string"}})
RUN = _obj({"started_at": {"type": "string"}, "ended_at": STR_OR_NULL,
            "exit_reason": STR_OR_NULL, "seconds": NUM_OR_NULL})
TIMELINE = _obj({"changes": {"type": "array", "items": CHANGE, "description": "oldest "
                             "first, at most the last 500"},
                 "runs": {"type": "array", "items": RUN, "description": "agent runs, "
                          "oldest first, at most the last 100"}})

SERIES = _obj({"series_id": {"type": "string"}, "agent_group": {"type": "string"},
               "session_id": {"type": "string"}, "recurrence": {"type": "string"},
               "timezone": {"type": "string"},
               "state": {"type": "string", "enum": ["active", "cancelled", "ended"]},
               "next_run": STR_OR_NULL, "completed": INT, "failed": INT,
               "error": STR_OR_NULL})

DESTINATION = _obj({"name": STR_OR_NULL, "type": {"type": "string"},
                    "display_name": STR_OR_NULL, "channel_type": STR_OR_NULL,
                    "platform_id": STR_OR_NULL, "target_agent_group_id": STR_OR_NULL,
                    "source": {"type": "string", "enum": ["manual", "auto"]}})

GROUP = _obj({"group": {"type": "string"}, "configured": {"type": "boolean"},
              "sessions": INT,
              "settings": {"type": "object", "description": "as `orchestrator group show`: "
                           "env values hidden, env_files by path only"},
              "destinations": {"type": "array", "items": DESTINATION},
              "series": {"type": "array", "items": _ref("Series")}})

ANSWER = _obj({"question_id": {"type": "string", "description": "the card's questionId"},
               "option": {"type": "string", "description": "the chosen option's value"},
               "user": {"type": "string", "description": "who answered (userId)"}})
ANSWER["required"] = ["question_id", "option"]

SCHEMAS = {"FleetSample": SAMPLE, "Fleet": FLEET, "Timeline": TIMELINE, "Series": SERIES,
           "Group": GROUP, "Answer": ANSWER}

# GET /v1/sessions: the list's paging, filter and sort (all optional: none = every row)
SESSION_QUERY = [
    {"name": "q", "in": "query", "schema": {"type": "string"},
     "description": "text in the session id, group or chat (case-insensitive)"},
    {"name": "sort", "in": "query", "schema": {"type": "string", "enum": [
        "agent_group", "session_id", "status", "last_active", "created_at", "chat"]},
     "description": "default: group, creation time, id"},
    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"],
                                                "default": "asc"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": 1000},
     "description": "page size (default: every row)"},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                 "maximum": 1000000000, "default": 0}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"},
     "description": "the previous page's X-Next-Cursor (opaque: the last row's place in "
                    "this sort); empty = the first page. With it each row carries its own "
                    "cursor. Pages the same on one orchestrator and across [cluster] "
                    "shards (there each row also names its shard); offset does not"},
]
STATUS_QUERY = {"name": "status", "in": "query", "schema": {"type": "string", "enum": [
    "running", "idle", "paused", "stopped", "queued"]},
    "description": "a container status, or paused (idle, frozen) / queued (stopped, "
                   "waiting for a slot)"}
TOTAL = {"X-Total-Count": {"schema": {"type": "integer"},
                           "description": "rows matched before paging"},
         "X-Next-Cursor": {"schema": {"type": "string"},
                           "description": "the next page's cursor; absent on the last page"}}


def paths() -> dict[str, Any]:
    return {
        "/console/{name}": {"get": _op(
            "consoleFile", "the console's script and style sheet (no token: code, no data)",
            {"200": {"description": "the file", "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}}}}}, "403", "404",
            security=[], parameters=[{"name": "name", "in": "path", "required": True,
                                      "schema": {"type": "string"}}])},
        "/v1/fleet": {"get": _op(
            "getFleet", "tiles (sessions by state, agents against the cap, the last "
            "hour's replies) and the last hour's samples for the plots",
            _ok("200", _ref("Fleet"), "the fleet"), *AUTHED)},
        "/v1/groups": {"get": _op(
            "listGroups", "each group's effective settings (secrets by path only), "
            "destinations and series", _ok("200", {"type": "array", "items": _ref("Group")},
                                           "groups"), *AUTHED)},
        "/v1/series": {"get": _op(
            "listSeries", "recurring series (as `orchestrator series list`)",
            _ok("200", {"type": "array", "items": _ref("Series")}, "series"), *AUTHED,
            parameters=[{"name": "agent_group", "in": "query", "schema": {"type": "string"}},
                        {"name": "session_id", "in": "query", "schema": {"type": "string"}}])},
        "/v1/series/{series_id}/cancel": {"post": _op(
            "cancelSeries", "cancel a series: nothing recurs, its waiting occurrence is "
            "removed (as `orchestrator series cancel`)",
            _ok("200", _obj({"series_id": {"type": "string"}, "cancelled": {"const": True},
                             "recurring_rows": INT, "removed_pending": INT}), "cancelled"),
            *AUTHED, "409", "415", parameters=[{"name": "series_id", "in": "path",
                                                "required": True,
                                                "schema": {"type": "string"}}])},
        "/v1/sessions/{session_id}/timeline": {"get": _op(
            "getTimeline", "the session's status changes and agent runs with their exit "
            "reasons", _ok("200", _ref("Timeline"), "timeline"), *AUTHED, parameters=[SID])},
        "/v1/sessions/{session_id}/answer": {"post": _op(
            "answerQuestion", "answer an agent's question card (as `orchestrator answer`)",
            _ok("201", _obj({"session_id": {"type": "string"},
                             "message_id": {"type": "string"}}), "the answer, written"),
            *AUTHED, "413", "415", parameters=[SID],
            requestBody={"required": True, "content": {"application/json": {
                "schema": _ref("Answer")}}})},
    }
