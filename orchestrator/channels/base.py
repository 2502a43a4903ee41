"""Where replies go. A channel confirms a delivery by returning normally (optionally
with the platform's message id); anything else is a failure to be retried."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol


class DeliveryError(RuntimeError):
    """The channel could not take the reply now; it will be retried with backoff.

    ``retry_after``: the receiver asked for at least this many seconds (HTTP
    ``Retry-After``); the backoff is never shorter.
    """

    retry_after: float | None = None


class PermanentDeliveryError(DeliveryError):
    """The receiver refused the reply for good (e.g. HTTP 400): recorded failed at once."""


class InFlight(DeliveryError):
    """The channel took the reply and is still sending it (off the event loop's hot
    path). Not an attempt: the channel wakes the session when the outcome is known,
    and the next pass asks again."""


@dataclass(frozen=True, slots=True)
class Reply:
    message_id: str
    session_id: str
    agent_group: str
    seq: int
    kind: str
    in_reply_to: str | None
    channel_type: str | None
    platform_id: str | None
    thread_id: str | None
    timestamp: str
    content: Any  # parsed JSON
    files: tuple[str, ...] = ()  # absolute paths under <data_dir>/delivered/<message_id>/

    def as_record(self) -> dict[str, Any]:
        """The fields as a flat dict for JSON. Not ``asdict``: that deep-copies the
        parsed content, a tenth of a delivery pass, for a dict that is only dumped."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Channel(Protocol):
    name: str

    def already_delivered(self, message_id: str) -> bool:
        """True if this channel has provably taken the reply before (crash window)."""
        ...

    async def deliver(self, reply: Reply) -> str | None:
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A reply or an inbound message given up on, for channels that report failures
    (``deliver_failure``): ``kind`` is ``reply`` or ``message``."""

    kind: str
    message_id: str
    session_id: str
    agent_group: str
    error: str

    def as_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
