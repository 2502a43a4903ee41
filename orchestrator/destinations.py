"""The ``destinations`` an agent sees: every chat of its group, plus the ones set by hand.

NanoClaw's runner only sends to names in ``destinations`` and shows each inbound
message ``from="<name>"`` by looking its chat up there; a chat missing from the
table is ``unknown:<channel>:<platform>`` and every reply to it is dropped. So
every chat that routes to an agent group (recorded in the registry when a message
from it is written) is projected as a destination of that group, next to the
destinations an admin set by hand, before every wake.

Naming rule (stable, readable, and the same on every projection):
``<channel_type>:<platform_id>``, plus ``:<thread_id>`` for a thread of a
``per-thread`` session. Characters outside ``A-Z a-z 0-9 . _ @ + -`` become
``_``; a name that had to be changed that way, or is longer than 64 characters,
gets ``~`` and 8 hex digits of a hash of the chat appended, so two chats never
share a name. Hand-set destinations win: a chat that already has one is not
added again, and an automatic name taken by a hand-set one gets the hash suffix.

Pure functions: the registry read and the inbound.db write are the caller's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from orchestrator.store.inbound import Destination

MAX_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")


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


def project(chats: Iterable[Chat], manual: Iterable[Mapping], own: Chat | None = None
            ) -> list[Destination]:
    """Hand-set destinations plus one per chat, the session's own chat first.

    NanoClaw resolves ``from`` with the first row matching a message's channel and
    platform (its table has no thread column), so the session's own chat — its
    thread, for a per-thread session — comes first.
    """
    out: list[Destination] = []
    for d in manual:
        out.append(Destination(name=d["name"], type=d["type"],
                               display_name=d.get("display_name"),
                               channel_type=d.get("channel_type"),
                               platform_id=d.get("platform_id"),
                               agent_group_id=d.get("target_agent_group_id",
                                                    d.get("agent_group_id"))))
    by_hand = {(d.channel_type, d.platform_id) for d in out if d.type == "channel"}
    taken = {d.name for d in out}
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
