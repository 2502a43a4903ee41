"""The webhook channel's payloads, as the OpenAPI document's ``webhooks`` section.

One place for everything the channel POSTs (``orchestrator/channels/webhook.py`` is
the code that writes it), so a change to a payload is a change here and nowhere
else in the document. Requests follow Standard Webhooks 1.0: headers
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, one per configured secret);
times in the bodies are RFC 3339.
"""

from __future__ import annotations

from typing import Any

RFC3339 = {"type": "string", "format": "date-time"}
NULLABLE_STR = {"type": ["string", "null"]}

_FILE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "size": {"type": "integer"},
        "sha256": {**NULLABLE_STR, "description": "hex, null when not inline"},
        "data": {**NULLABLE_STR, "description": "base64, null when not inline"},
        "omitted": {"type": ["string", "null"], "enum": [None, "max_file_bytes",
                                                         "max_payload_bytes"]},
    },
    "required": ["name", "size", "sha256", "data", "omitted"],
}

WEBHOOK_SCHEMAS: dict[str, Any] = {
    "WebhookReply": {
        "type": "object",
        "description": "a reply of an agent (webhook-id: the reply id)",
        "properties": {
            "type": {"const": "reply"},
            "id": {"type": "string"}, "session_id": {"type": "string"},
            "agent_group": {"type": "string"}, "seq": {"type": "integer"},
            "kind": {"type": "string"}, "in_reply_to": NULLABLE_STR,
            "routing": {"$ref": "#/components/schemas/Routing"},
            "timestamp": RFC3339,
            "content": {"description": "the reply's content (JSON)"},
            "files": {"type": "array", "items": _FILE},
            "files_unlisted": {"type": "integer"},
        },
        "required": ["type", "id", "session_id", "agent_group", "seq", "kind",
                     "in_reply_to", "routing", "timestamp", "content", "files",
                     "files_unlisted"],
    },
    "WebhookFailure": {
        "type": "object",
        "description": "a reply given up on, or an inbound message that ended failed "
                       "(webhook-id: failure-<kind>-<id>)",
        "properties": {
            "type": {"const": "failure"},
            "kind": {"type": "string", "enum": ["reply", "message"]},
            "id": {"type": "string"}, "session_id": {"type": "string"},
            "agent_group": {"type": "string"}, "reason": {"type": "string"},
            "channel_type": NULLABLE_STR, "platform_id": NULLABLE_STR,
            "thread_id": NULLABLE_STR, "timestamp": RFC3339,
        },
        "required": ["type", "kind", "id", "session_id", "agent_group", "reason"],
    },
    "WebhookEvent": {
        "type": "object",
        "description": "with [delivery] events: an event of GET /v1/events (type: its "
                       "kind; id: its SSE id; webhook-id: event-<id>); the other fields "
                       "are the event's (components StatusEvent, MessageFailedEvent, …)",
        "properties": {"type": {"type": "string"}, "id": {"type": "integer"},
                       "at": RFC3339},
        "required": ["type", "id", "at"],
    },
}

_HEADERS = [
    {"name": "webhook-id", "in": "header", "required": True, "schema": {"type": "string"}},
    {"name": "webhook-timestamp", "in": "header", "required": True,
     "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    {"name": "webhook-signature", "in": "header", "required": True,
     "schema": {"type": "string"}, "description": "space-separated v1,<base64> signatures"},
]


def _hook(name: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "operationId": f"webhook{name}", "summary": summary, "parameters": _HEADERS,
        "security": [],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/Webhook{name}"}}}},
        "responses": {"2XX": {"description": "taken (any other answer is retried, or for "
                              "4xx but 408/429 failed at once)"}},
    }}


def webhooks() -> dict[str, Any]:
    """POSTed to ``[delivery] url`` by the webhook channel."""
    return {"reply": _hook("Reply", "an agent's reply"),
            "failure": _hook("Failure", "a reply or message that will never get through"),
            "event": _hook("Event", "a status change or failure event ([delivery] events)")}
