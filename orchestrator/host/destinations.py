"""The ``destinations`` an agent sees: every chat of its group, plus the ones set by hand.

NanoClaw's runner only sends to names in ``destinations`` and shows each inbound
message ``from="<name>"`` by looking its chat up there; a chat missing from the
table is ``unknown:<channel>:<platform>`` and every reply to it is dropped. So
every chat that routes to an agent group (recorded in the registry's
``group_chats`` when a message from it is written) is projected as an automatic
destination of that group, next to the destinations set by hand, before every
wake (and at once into the session a new chat writes to).

Set by hand: ``orchestrator group destinations GROUP add`` (registry table
``manual_destinations``; ``parse``/``add``/``remove`` here are its checks and
registry edge) and rows host code put in the registry's ``destinations`` table
(``Registry.set_destinations``). A name in both: the CLI's wins.

Naming rule of an automatic destination (stable, readable, the same on every
projection): ``<channel_type>:<platform_id>``, plus ``:<thread_id>`` for a thread
of a ``per-thread`` session. Characters outside ``A-Z a-z 0-9 . _ @ + -`` become
``_``; a name that had to be changed that way, or is longer than 64 characters,
gets ``~`` and 8 hex digits of a hash of the chat appended, so two chats never
share a name. Hand-set destinations win: a chat that already has one is not
added again, and an automatic name taken by a hand-set one gets the hash suffix.

``project`` is the pure merge; ``projected`` is the one registry edge both the
wake (``Sessions.write_destinations``) and ``group destinations list`` use.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from orchestrator.contract.layout import InvalidId, validate_id
from orchestrator.host.inbound import Destination
from orchestrator.host.registry import Registry
from orchestrator.support.errors import UserError

MAX_NAME = 64
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a hand-set name (CLI)
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")


class DestinationError(UserError, ValueError):
    """Refused destination input: one line, CLI exit code 2."""


# --- hand-set destinations (``orchestrator group destinations``) --------------------------


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


# --- automatic destinations: one per chat ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chat:
    channel_type: str
    platform_id: str
    thread_id: str | None = None  # only for per-thread sessions


def _suffix(chat: Chat) -> str:
    raw = "\0".join((chat.channel_type, chat.platform_id, chat.thread_id or ""))
    return "~" + hashlib.sha256(raw.encode()).hexdigest()[:8]


def chat_name(chat: Chat) -> str:
    """The destination name of a chat (see the module docstring for the rule)."""
    parts = [chat.channel_type, chat.platform_id] + (
        [chat.thread_id] if chat.thread_id is not None else [])
    safe = [_UNSAFE.sub("_", p) or "_" for p in parts]
    name = ":".join(safe)
    if safe != parts or len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + _suffix(chat)
    return name


def display_name(chat: Chat) -> str:
    label = f"{chat.channel_type} chat {chat.platform_id}"
    return label + (f", thread {chat.thread_id}" if chat.thread_id is not None else "")


# --- the merge -------------------------------------------------------------------------------


def project(chats: Iterable[Chat], manual: Iterable[Mapping], own: Chat | None = None
            ) -> list[Destination]:
    """Hand-set destinations (registry rows, first one of a name wins) plus one per
    chat, the session's own chat first.

    NanoClaw resolves ``from`` with the first row matching a message's channel and
    platform (its table has no thread column), so the session's own chat — its
    thread, for a per-thread session — comes first.
    """
    out: list[Destination] = []
    taken: set[str] = set()
    for d in manual:
        if d["name"] in taken:
            continue
        taken.add(d["name"])
        out.append(Destination(name=d["name"], type=d["type"],
                               display_name=d.get("display_name"),
                               channel_type=d.get("channel_type"),
                               platform_id=d.get("platform_id"),
                               agent_group_id=d.get("target_agent_group_id",
                                                    d.get("agent_group_id"))))
    by_hand = {(d.channel_type, d.platform_id) for d in out if d.type == "channel"}
    auto: list[Destination] = []
    for chat in sorted(set(chats), key=lambda c: (c.channel_type, c.platform_id,
                                                  c.thread_id or "")):
        if (chat.channel_type, chat.platform_id) in by_hand:
            continue
        name = chat_name(chat)
        if name in taken:
            name = name[:MAX_NAME - 9] + _suffix(chat)
        taken.add(name)
        auto.append(Destination(name=name, type="channel", display_name=display_name(chat),
                                channel_type=chat.channel_type, platform_id=chat.platform_id))
    rows = out + auto
    if own is not None:
        own_name = chat_name(own)
        first = [d for d in rows if d.name == own_name and d.channel_type == own.channel_type
                 and d.platform_id == own.platform_id]
        if not first:  # set by hand: the chat's hand-set destination
            first = [d for d in out if d.type == "channel" and
                     (d.channel_type, d.platform_id) == (own.channel_type, own.platform_id)][:1]
        rows = first + [d for d in rows if d not in first]
    return rows


def projected(registry: Registry, group: str, own: Chat | None = None
              ) -> list[tuple[Destination, str]]:
    """What a wake of a session of ``group`` (its chat ``own``) projects, in that
    order, each with its source: ``manual`` (set by hand) or ``auto`` (a chat)."""
    validate_id(group, "agent group")
    manual = registry.manual_destinations(group) + registry.destinations(group)
    chats = [Chat(*c) for c in registry.group_chats(group)]
    names = {d["name"] for d in manual}
    return [(d, "manual" if d.name in names else "auto") for d in project(chats, manual, own)]
