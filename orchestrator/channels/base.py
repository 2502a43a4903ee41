"""Where replies go. A channel confirms a delivery by returning normally (optionally
with the platform's message id); anything else is a failure to be retried."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol


class DeliveryError(RuntimeError):
    """The channel could not take the reply now; it will be retried with backoff.

    ``retry_after``: the receiver asked for at least this many seconds (HTTP
    ``Retry-After``); the backoff is never shorter.
    """

    retry_after: float | None = None


class InFlight(DeliveryError):
    """The channel took the reply and is still sending it (off the event loop's hot
    path). Not an attempt: the channel wakes the session when the outcome is known,
    and the next pass asks again."""


class PermanentDeliveryError(DeliveryError):
    """The reply can never be delivered (a bad file, a refused name, or the channel
    says so for good): it is failed at once with this reason, not retried."""


class StorageFull(DeliveryError):
    """The host's own disk is full (or read-only): not the reply's fault.

    Retried every ``retry_base`` seconds without spending an attempt, so a full
    disk never turns good replies into ``failed`` ones; they all go out once space
    is freed.
    """


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


@dataclass(frozen=True, slots=True)
class Failure:
    """Something the chat will never get: an inbound message that ended ``failed``
    after ``max_tries`` (``kind="message"``) or a reply recorded ``failed``
    (``kind="reply"``), with the reason and where it was going, so a front end can
    tell its user."""

    kind: str  # "message" | "reply"
    id: str  # messages_in.id or messages_out.id
    session_id: str
    agent_group: str
    reason: str
    channel_type: str | None
    platform_id: str | None
    thread_id: str | None

    def as_record(self) -> dict[str, Any]:
        """``type: "failure"`` tells it apart from a reply (which has no ``type``)."""
        return {"type": "failure", **{f.name: getattr(self, f.name) for f in fields(self)}}


OnOutcome = Callable[[str], None]  # (session_id): an outcome of that session is known


class Channel(Protocol):
    name: str

    def bind(self, on_outcome: OnOutcome) -> None:
        """Called once before the first delivery. A channel that answers ``InFlight``
        calls ``on_outcome(session_id)`` when the outcome is known, so a pass asks
        again; one that answers at once never calls it."""
        ...

    def already_delivered(self, message_id: str) -> bool:
        """True if this channel has provably taken the reply before (crash window)."""
        ...

    async def deliver(self, reply: Reply) -> str | None:
        ...

    async def report_failure(self, failure: Failure) -> None:
        """Tell the chat a message or reply ended failed. Called once per failure;
        an error here is logged, never retried (the failure is already final)."""
        ...

    async def aclose(self) -> None:
        """Release what needs the event loop (tasks in flight, an HTTP client);
        called once at shutdown, before ``close``."""
        ...

    def close(self) -> None:
        ...


class ChannelBase:
    """``bind`` and ``aclose`` for a channel that needs neither: it answers every
    delivery at once and holds nothing that needs the event loop to release."""

    def bind(self, on_outcome: OnOutcome) -> None:
        pass

    async def aclose(self) -> None:
        pass
