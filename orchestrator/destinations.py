"""Destinations added by hand: where a group's agents may send besides the reply route.

Stored in the registry (``manual_destinations``, one table of their own: the
automatic per-chat destinations live elsewhere) and projected into each
session's ``inbound.db`` ``destinations`` table on every wake, merged with the
automatic ones (a manual destination wins a name clash). A change therefore
reaches a session at its next wake, like everything the wake writes.

``parse`` is the pure check (one line naming the fix); ``add``/``remove``/
``listing`` are the registry edge used by the CLI (and by an HTTP API).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from orchestrator.errors import UserError
from orchestrator.layout import InvalidId, validate_id
from orchestrator.store.registry import Registry

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DestinationError(UserError, ValueError):
    """Refused destination input: one line, CLI exit code 2."""


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    type: str  # channel | agent
    display_name: str | None = None
    channel_type: str | None = None
    platform_id: str | None = None
    agent_group_id: str | None = None


def _text(value: str | None, what: str) -> str:
    if value is None or not value.strip() or len(value) > 256 or any(
            ord(ch) < 32 for ch in value):
        raise DestinationError(f"{what} must be 1-256 printable characters, got {value!r}")
    return value


def parse(name: str, *, channel: str | None = None, platform: str | None = None,
          agent: str | None = None, display_name: str | None = None) -> Destination:
    """A checked destination: a chat (``channel`` + ``platform``) or an agent group."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DestinationError(f"destination name {name!r}: use 1-64 characters from A-Z a-z "
                               "0-9 _ . -, starting with a letter or digit")
    if display_name is not None:
        _text(display_name, "--display-name")
    if agent is not None:
        if channel is not None or platform is not None:
            raise DestinationError(f"destination {name}: give either --agent GROUP or "
                                   "--channel and --platform, not both")
        try:
            validate_id(agent, "agent group")
        except InvalidId as exc:
            raise DestinationError(f"--agent: {exc}") from None
        return Destination(name, "agent", display_name, agent_group_id=agent)
    if channel is None or platform is None:
        raise DestinationError(f"destination {name}: give --channel and --platform (a chat) "
                               "or --agent GROUP (another agent group)")
    return Destination(name, "channel", display_name, _text(channel, "--channel"),
                       _text(platform, "--platform"))


def add(registry: Registry, group: str, dest: Destination) -> None:
    validate_id(group, "agent group")
    registry.ensure_agent_group(group)
    if not registry.add_manual_destination(group, asdict(dest)):
        raise DestinationError(f"group {group} already has a destination {dest.name}; "
                               "remove it first")


def remove(registry: Registry, group: str, name: str) -> None:
    validate_id(group, "agent group")
    if not registry.remove_manual_destination(group, name):
        raise DestinationError(f"group {group} has no destination {name!r} added by hand; "
                               f"see: orchestrator group destinations {group} list")


def projected(registry: Registry, group: str) -> list[dict]:
    """Manual and automatic ones as a wake projects them (manual wins a name),
    sorted by name; each with ``source``: manual | auto."""
    validate_id(group, "agent group")
    merged = {d["name"]: {**d, "source": "auto"} for d in registry.destinations(group)}
    merged.update((d["name"], {**d, "source": "manual"})
                  for d in registry.manual_destinations(group))
    return [merged[k] for k in sorted(merged)]
