"""The inbound message value: what the rules decide to write and host.inbound writes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An inbound message to write. ``content`` is already-serialised JSON text."""

    id: str
    kind: str
    content: str
    process_after: str | None = None
    trigger: int = 1
    platform_id: str | None = None
    channel_type: str | None = None
    thread_id: str | None = None
    series_id: str | None = None
    recurrence: str | None = None
    source_session_id: str | None = None
    on_wake: int = 0
