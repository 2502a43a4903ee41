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

def _event(kind: str, description: str, props: dict[str, Any]) -> dict[str, Any]:
    """An event of ``GET /v1/events`` as POSTed with ``[delivery] events``: ``type`` is
    its kind, ``id`` its SSE id (``webhook-id: event-<id>``), ``at`` when it was logged."""
    return {"type": "object", "description": description,
            "properties": {"type": {"const": kind}, "id": {"type": "integer"},
                           "at": RFC3339, "session_id": {"type": "string"},
                           "agent_group": {"type": "string"}, **props},
            "required": ["type", "id", "at", "session_id", "agent_group", *props]}


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
            "timestamp": {"type": "string", "description": "the row's time, RFC 3339 "
                          "(as the agent wrote it when it is not a time)"},
            "content": {"description": "the reply's content (JSON; the raw text if the "
                        "agent's is not JSON)"},
            "files": {"type": "array", "items": _FILE},
            "files_unlisted": {"type": "integer"},
        },
        "required": ["type", "id", "session_id", "agent_group", "seq", "kind",
                     "in_reply_to", "routing", "timestamp", "content", "files",
                     "files_unlisted"],
    },
    "WebhookFailure": {
        "type": "object",
        "description": "a reply recorded failed, or an inbound message that ended failed, "
                       "routed like the reply would have been; always sent (webhook-id: "
                       "failure-<kind>-<id>)",
        "properties": {
            "type": {"const": "failure"},
            "kind": {"type": "string", "enum": ["reply", "message"]},
            "id": {"type": "string"}, "session_id": {"type": "string"},
            "agent_group": {"type": "string"}, "reason": {"type": "string"},
            "channel_type": NULLABLE_STR, "platform_id": NULLABLE_STR,
            "thread_id": NULLABLE_STR, "timestamp": RFC3339,
        },
        "required": ["type", "kind", "id", "session_id", "agent_group", "reason",
                     "channel_type", "platform_id", "thread_id", "timestamp"],
    },
    "WebhookStatus": _event("status", "[delivery] events \"status\": a status change",
                            {"old": {"type": "string"}, "status": {"type": "string"},
                             "reason": NULLABLE_STR}),
    "WebhookReplyFailed": _event(
        "reply_failed", "[delivery] events \"failure\": a reply given up on (the "
        "fields of the reply_failed event of /v1/events)",
        {"message_id": {"type": "string"},
         "delay_seconds": {"type": ["number", "null"]}}),
    "WebhookMessageFailed": _event(
        "message_failed", "[delivery] events \"failure\": an inbound message that ended "
        "failed", {"message_id": {"type": "string"}, "reason": {"type": "string"}}),
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
            "status": _hook("Status", "a status change ([delivery] events)"),
            "reply_failed": _hook("ReplyFailed", "a reply failed ([delivery] events)"),
            "message_failed": _hook("MessageFailed", "a message failed ([delivery] events)")}
