"""The API's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Kept as code beside the routes, not as a hand-edited file: the schemas reuse the
server's own limits (``MAX_WAIT``, the page size, the status values), and
``tests/api/test_openapi.py`` fails when a route exists that the document lacks or
the other way round, while schemathesis (``tests/api/test_schemathesis.py``) checks
every answer of a live ``orchestrator run`` against it. The webhook payloads (the
document's ``webhooks`` section) live in ``openapi_webhooks``, next to nothing else,
so the channel's owner changes them in one place.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from orchestrator import version
from orchestrator.api import openapi_console
from orchestrator.api.checks import MAX_WAIT
from orchestrator.api.openapi_webhooks import WEBHOOK_SCHEMAS, webhooks
from orchestrator.contract.session_status import Status
from orchestrator.host.messages import MAX_LIMIT

STATUSES = [s.value for s in Status]
ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"  # layout.validate_id (and no "..")


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def obj(props: dict[str, Any], required: list[str] | None = None, *,
        extra: bool = False, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return {**out, **more}


def json_body(schema: dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


ERRORS = {
    "400": "the request is wrong: the one-line error names the field and the fix",
    "401": "missing or wrong bearer token",
    "403": "Host or Origin not served (DNS rebinding, cross-site requests)",
    "404": "no such session, message or file",
    "409": "the resource's state does not allow it (e.g. no agent runs; a session's "
           "files cannot be read)",
    "413": "request body over the limit",
    "415": "a request body that is not application/json",
    "422": "Idempotency-Key reused with a different body",
    "500": "a bug: the trace is logged",
    "503": "not ready / unhealthy",
}


def errors(*codes: str) -> dict[str, Any]:
    return {c: {"$ref": f"#/components/responses/E{c}"} for c in codes}


AUTHED = ("400", "401", "403", "404", "500")


# --- schemas ---------------------------------------------------------------------------------

ROUTING = obj({"channel_type": nullable("string"), "platform_id": nullable("string"),
               "thread_id": nullable("string")})

SESSION = obj({
    "agent_group": {"type": "string"},
    "session_id": {"type": "string"},
    "container_status": {"type": "string", "description": "one of " + ", ".join(STATUSES)},
    "status_reason": nullable("string"),
    "pending": {"type": "integer"}, "processing": {"type": "integer"},
    "failed": {"type": "integer"}, "completed": {"type": "integer"},
    "last_heartbeat": nullable("string", description="RFC 3339, UTC"),
    "last_active": nullable("string", description="RFC 3339, UTC"),
    "error": nullable("string", description="one line: why the session's files could not "
                      "be read (the other fields are what could be)"),
    "channel_type": nullable("string"), "platform_id": nullable("string"),
    "thread_id": nullable("string"),
    "queue_position": nullable("integer"), "queued_for": nullable("number"),
    "settings": nullable("string"), "image": nullable("string"),
    "settings_current": nullable("boolean"),
    "usage": {"type": ["object", "null"], "description": "what its agent runs used (None "
              "before the first ended; a value the runtime cannot tell is null)",
              "properties": {
                  "runs": {"type": "integer"}, "wall_seconds": nullable("number"),
                  "cpu_seconds": nullable("number"), "peak_memory_bytes": nullable("integer"),
                  "last_run": {"type": "object", "properties": {
                      "started_at": nullable("string"), "ended_at": {"type": "string"},
                      "wall_seconds": nullable("number"), "cpu_seconds": nullable("number"),
                      "peak_memory_bytes": nullable("integer"),
                      "exit_reason": {"type": "string"}}}}},
    "routing": ROUTING,
    "created_at": nullable("string"),
})
# GET /v1/sessions rows may carry two more: their paging cursor (with ?cursor=) and,
# merged across [cluster] shards, the shard holding them
SESSION["properties"].update(
    cursor={"type": "string", "description": "this row's place in the list's sort (with "
            "?cursor=): a cursor for the rows after it"},
    shard={"type": "string", "description": "with [cluster]: the shard holding it"})

MESSAGE_IN = obj({
    "agent_group": {"type": "string", "description": "agent group ([groups.<name>] or any "
                    "id: 1-128 of A-Z a-z 0-9 . _ @ + -, no '..')", "pattern": ID_PATTERN},
    "channel": {"type": "string", "default": "api"},
    "platform_id": {"type": "string", "default": "default"},
    "thread_id": nullable("string"),
    "mode": {"type": "string", "enum": ["shared", "per-thread", "agent-shared"],
             "description": "default: [sessions] default_mode"},
    "content": {"type": "object", "description": "the message content the agent reads, e.g. "
                "{\"text\": \"hi\"}; attachments: [{name, data (base64)}]",
                "example": {"text": "hello", "attachments": [{"name": "a.txt",
                                                              "data": "aGVsbG8="}]}},
    "process_after": {"type": ["string", "null"], "format": "date-time",
                      "description": "deliver at this time (ISO 8601; no offset = UTC); "
                      "null or left out = now"},
    "wait": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_WAIT,
             "description": "hold the answer up to this many seconds (cut to [api] "
             "max_wait) for the first reply: 200 with it; 202 with the ids if none came"},
}, ["agent_group", "content"])

IDS = obj({"session_id": {"type": "string"}, "message_id": {"type": "string"}})

FILE = obj({"name": {"type": "string"},
            "url": nullable("string", description="download path (replies' files only)")})

REPLY_DATA = {
    "session_id": {"type": "string"}, "agent_group": {"type": "string"},
    "message_id": {"type": "string", "description": "the reply's id"},
    "delay_seconds": nullable("number"),
    "in_reply_to": nullable("string"),
    "content": {"description": "the reply's content (JSON) up to [api] "
                "event_content_bytes; null when truncated"},
    "truncated": {"type": "boolean"},
    "url": {"type": "string", "description": "GET this for the whole message"},
    "files": {"type": "array", "items": FILE},
}

REPLY = obj({"event_id": {"type": "integer"}, "at": {"type": "string"}, "kind": {
    "const": "reply_delivered"}, **REPLY_DATA}, extra=True)

WAITED = obj({"session_id": {"type": "string"}, "message_id": {"type": "string"},
              "reply": ref("Reply")})

MESSAGE = obj({
    "id": {"type": "string"},
    "direction": {"type": "string", "enum": ["in", "out"]},
    "timestamp": {"type": "string"},
    "kind": {"type": "string"},
    "status": nullable("string", description="in: pending, completed, failed…; out: "
                       "delivered, failed or pending"),
    "in_reply_to": nullable("string"),
    "content": {"description": "the message content (JSON); null with a problem"},
    "files": {"type": "array", "items": FILE},
    "problem": nullable("string", description="why the content is not shown"),
})

PAGE = obj({"messages": {"type": "array", "items": ref("Message")},
            "next_cursor": nullable("string", description="pass as ?cursor= for the next "
                                    "(older) page; null on the last")})


def event(kind: str, props: dict[str, Any], description: str) -> dict[str, Any]:
    base = {"id": {"type": "integer"}, "at": {"type": "string", "description": "UTC time"},
            "kind": {"const": kind}}
    return obj({**base, **props}, description=description, extra=True)


EVENTS = {
    "StatusEvent": event("status", {"session_id": {"type": "string"},
                                    "agent_group": {"type": "string"},
                                    "old": nullable("string"), "status": {"type": "string"},
                                    "reason": nullable("string")},
                         "event: status — a session's agent changed status"),
    "ReplyDeliveredEvent": event("reply_delivered", REPLY_DATA,
                                 "event: reply_delivered — a reply went out on the channel"),
    "ReplyFailedEvent": event("reply_failed", REPLY_DATA,
                              "event: reply_failed — a reply was given up on"),
    "MessageFailedEvent": event("message_failed", {
        "session_id": {"type": "string"}, "agent_group": {"type": "string"},
        "message_id": {"type": "string"}, "reason": {"type": "string"}},
        "event: message_failed — an inbound message ended failed"),
    "HelloEvent": obj({}, [], description="event: hello — first event of a new stream "
                      "(its id: where a reconnect resumes)"),
    "GapEvent": obj({"reason": {"type": "string"}}, description="event: gap — events after "
                    "Last-Event-ID were pruned; re-read /v1/sessions"),
}


STORED_EVENTS = ("StatusEvent", "ReplyDeliveredEvent", "ReplyFailedEvent",
                 "MessageFailedEvent")


def responses() -> dict[str, Any]:
    return {f"E{code}": json_body(ref("Error"), text) for code, text in ERRORS.items()}


# --- paths -----------------------------------------------------------------------------------

SID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
MID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}
OPEN: list[dict[str, list[str]]] = []  # no security
_SESSION = {"session_id": "$response.body#/session_id"}
REPLY_LINKS = {"GetReply": {"operationId": "getMessage", "parameters": {
    **_SESSION, "message_id": "$response.body#/reply/message_id"}}}
FILE_LINKS = {"GetFirstFile": {"operationId": "getReplyFile", "parameters": {
    "session_id": "$request.path.session_id", "message_id": "$response.body#/id",
    "name": "$response.body#/files/0/name"}}}
LINKS = {  # what a client (and schemathesis's stateful phase) does next with the ids
    "GetSession": {"operationId": "getSession", "parameters": _SESSION},
    "ListMessages": {"operationId": "listMessages", "parameters": _SESSION},
    "GetMessage": {"operationId": "getMessage", "parameters": {
        **_SESSION, "message_id": "$response.body#/message_id"}},
    "StopSession": {"operationId": "stopSession", "parameters": _SESSION},
}


def op(op_id: str, summary: str, ok: dict[str, Any], *codes: str, **more: Any
       ) -> dict[str, Any]:
    return {"operationId": op_id, "summary": summary, "responses": {**ok, **errors(*codes)},
            **more}


def paths() -> dict[str, Any]:
    ok = json_body(obj({"ok": {"const": True}, "last_sweep_seconds_ago": {"type": "number"}}),
                   "healthy")
    ready = json_body(obj({"ok": {"const": True}, "runtime": {"type": "string"}}), "ready")
    return {
        "/": {"get": op("statusPage", "the operator's console (HTML, no token: it asks for "
                        "one; its data comes from the routes below)", {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {
                "type": "string"}}}}}, "403", security=OPEN)},
        "/healthz": {"get": op("healthz", "liveness: the reconcile sweep runs", {"200": ok},
                               "403", "503", security=OPEN)},
        "/readyz": {"get": op("readyz", "readiness: start-up done, runtime answers",
                              {"200": ready}, "403", "503", security=OPEN)},
        "/metrics": {"get": op("metrics", "Prometheus text format (token only with [api] "
                               "metrics_auth)", {"200": {"description": "metrics", "content": {
                                   "text/plain": {"schema": {"type": "string"}}}}},
                               "401", "403", security=[{}, {"bearer": []}])},
        "/openapi.json": {"get": op("openapi", "this document", {"200": {
            "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {
                "type": "object"}}}}}, "403", security=OPEN)},
        "/v1/messages": {"post": op(
            "postMessage", "write a message to a session (created or resolved)", {
                "201": {**json_body(ref("Ids"), "written"), "links": LINKS},
                "200": {**json_body(ref("Waited"), "written, and its first reply came "
                                    "within the wait", **{"Preference-Applied": {"schema": {
                                        "type": "string"}}}), "links": REPLY_LINKS},
                "202": json_body(ref("Ids"), "written; no reply within the wait",
                                 **{"Preference-Applied": {"schema": {"type": "string"}}}),
            }, *AUTHED, "413", "415", "422",
            parameters=[
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                 "description": "a retried POST with the same key returns the first "
                 "result and writes nothing (kept 48 h)"},
                {"name": "Prefer", "in": "header", "required": False,
                 "schema": {"type": "string", "example": "wait=1"},
                 "description": "wait=N (whole seconds): as the body's wait"}],
            requestBody={"required": True, "content": {"application/json": {
                "schema": ref("NewMessage")}}})},
        "/v1/sessions": {"get": op(
            "listSessions", "every session, as status --json plus routing (filtered, "
            "sorted and paged on request)", {
                "200": json_body({"type": "array", "items": ref("Session")}, "rows",
                                 **openapi_console.TOTAL)},
            *AUTHED, parameters=[
                {"name": "agent_group", "in": "query", "schema": {"type": "string"}},
                openapi_console.STATUS_QUERY, *openapi_console.SESSION_QUERY])},
        "/v1/sessions/{session_id}": {"get": op(
            "getSession", "one session", {"200": json_body(ref("Session"), "its row")},
            *AUTHED, parameters=[SID]), "delete": op(
            "deleteSession", "archive (archive=true) or delete the session: its agent is "
            "stopped first; refused (409) while it has pending messages or undelivered "
            "replies unless force=true (they are lost). `orchestrator sessions restore ID` "
            "puts an archived one back", {
                "200": json_body(obj({
                    "session_id": {"type": "string"},
                    "action": {"type": "string", "enum": ["archived", "deleted"]},
                    "archive": nullable("string", description="the archive file (archived)")}),
                    "removed")},
            *AUTHED, "409", parameters=[
                SID,
                {"name": "archive", "in": "query", "schema": {"type": "boolean",
                                                              "default": False}},
                {"name": "force", "in": "query", "schema": {"type": "boolean",
                                                            "default": False}}])},
        "/v1/sessions/{session_id}/stop": {"post": op(
            "stopSession", "stop the session's agent now (due work starts it again)", {
                "202": json_body(obj({"session_id": {"type": "string"},
                                      "stopping": {"const": True}}), "stopping")},
            *AUTHED, "409", "415", parameters=[SID])},
        "/v1/sessions/{session_id}/messages": {"get": op(
            "listMessages", "the session's messages in and out, newest first, cursor-paged",
            {"200": json_body(ref("MessagePage"), "one page")}, *AUTHED, "409",
            parameters=[SID,
                        {"name": "limit", "in": "query", "schema": {
                            "type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                            "default": 50}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"},
                         "description": "next_cursor of the previous page (opaque)"}])},
        "/v1/sessions/{session_id}/messages/{message_id}": {"get": op(
            "getMessage", "one message of the session, whole (content up to [delivery] "
            "max_content_bytes)", {"200": {**json_body(ref("Message"), "the message"),
                                           "links": FILE_LINKS}},
            *AUTHED, "409", parameters=[SID, MID])},
        "/v1/sessions/{session_id}/messages/{message_id}/files/{name}": {"get": op(
            "getReplyFile", "a delivered reply's file (from <data_dir>/delivered/<id>/)", {
                "200": {"description": "the file's bytes", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}},
            *AUTHED, "409", parameters=[SID, MID, {
                "name": "name", "in": "path", "required": True,
                "schema": {"type": "string"}}])},
        "/v1/sessions/{session_id}/logs": {"get": op(
            "getAgentLogs", "one agent run's kept output (stdout and stderr), its last "
            "[sessions] max_agent_log_bytes at most", {
                "200": {"description": "the run's output as the agent wrote it (never "
                        "interpreted: escape control characters before showing it)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                        "headers": {
                            "X-Agent-Log-Run": {"schema": {"type": "string"},
                                                "description": "the run shown"},
                            "X-Agent-Log-Runs": {"schema": {"type": "string"},
                                                 "description": "every kept run, "
                                                 "comma-separated, oldest first"},
                            "X-Agent-Log-Size": {"schema": {"type": "string"},
                                                 "description": "the run file's size "
                                                 "(bytes; the body is its end)"}}}},
            *AUTHED, "409", parameters=[SID, {
                "name": "run", "in": "query", "schema": {
                    "type": "integer", "minimum": 0, "maximum": 999_999_999},
                "description": "the run (default: the newest)"}])},
        # POST /v1/deliveries/retry: the webhook channel's route (branch webhooks)
        "/v1/deliveries/retry": {"post": op(
            "retryDeliveries", "re-queue failed replies with fresh attempts (all sessions, "
            "or one)", {"200": json_body(obj({"retried": {"type": "integer", "minimum": 0}}),
                                         "how many replies were re-queued")},
            *AUTHED, "413", "415",
            requestBody={"required": False, "content": {"application/json": {"schema": obj(
                {"session_id": {"type": ["string", "null"], "description": "only this "
                                "session's (unknown: 404); null or left out: every session"}},
                [])}}})},
        "/v1/events": {"get": op(
            "streamEvents", "Server-Sent Events: status changes, replies, failures; "
            "replayed from Last-Event-ID", {"200": {
                "description": "text/event-stream; each message: `id: <n>`, `event: "
                "<kind>`, `data: <one JSON line>` (schemas: the *Event components, "
                "oneOf below); `: keep-alive` comments every 15 s",
                "content": {"text/event-stream": {"schema": {
                    "type": "string", "description": "SSE stream",
                    "x-event-data": ref("Event")}},
                    "application/json": {"schema": ref("EventPage")}}}},
            *AUTHED, description="With Accept: application/json (and not "
            "text/event-stream) the answer is one JSON page of the stored events after "
            "Last-Event-ID (at most 1000; none without it) instead of a stream: for "
            "clients that poll.", parameters=[
                {"name": "Last-Event-ID", "in": "header", "schema": {
                    "type": "string", "pattern": "^([0-9]{1,18})?$"},
                 "description": "resume after this event id (empty: a new client)"},
                {"name": "last_event_id", "in": "query", "schema": {
                    "type": "string", "pattern": "^([0-9]{1,18})?$"},
                 "description": "as the header (EventSource cannot set headers)"}])},
        **openapi_console.paths(),  # the operator's console (issue 27)
    }


@functools.lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    schemas = {"Error": obj({"error": {"type": "string", "description": "one line"}}),
               "Session": SESSION, "NewMessage": MESSAGE_IN, "Ids": IDS, "Waited": WAITED,
               "Reply": REPLY, "Message": MESSAGE, "MessagePage": PAGE, "File": FILE,
               "Routing": ROUTING, **EVENTS,
               "Event": {"oneOf": [ref(n) for n in EVENTS]},
               "EventPage": obj({"events": {"type": "array", "items": {"oneOf": [
                   ref(n) for n in STORED_EVENTS]}},
                   "last_event_id": {"type": "integer", "description": "send as "
                                     "Last-Event-ID next time"},
                   "gap": {"type": "boolean", "description": "events after yours were "
                           "pruned: re-read /v1/sessions"}}),
               **WEBHOOK_SCHEMAS, **openapi_console.SCHEMAS}
    return {
        "openapi": "3.1.0",
        "info": {"title": "orchestrator API", "version": version(),
                 "description": "Runs AI agent sessions and delivers their replies. Errors "
                 "are {\"error\": \"<one line>\"}. See README.md and docs/contract.md."},
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "security": [{"bearer": []}],
        "paths": paths(),
        "webhooks": webhooks(),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "the contents of [api] token_file"}},
            "schemas": schemas,
            "responses": responses(),
        },
    }


def document() -> dict[str, Any]:
    """The document (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_document())


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, METHOD) of every operation in ``doc``."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {(p, m.upper()) for p, item in doc["paths"].items() for m in item if m in methods}
