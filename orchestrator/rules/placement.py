"""Where a conversation lives when several orchestrators (shards) serve one API.

Pure decisions, table-tested (tests/rules/test_placement.py):

- ``conversation_key``: the shard-independent identity of a conversation. The
  registry's resolution key names a messaging group by its *local* row id, which
  differs per shard; this one names the chat itself (channel, platform id, thread
  under ``per-thread``), so every shard computes the same key for the same chat.
- ``ranking``: rendezvous (highest-random-weight) hashing of that key over the
  members. Deterministic: two shards placing the same new conversation at the
  same moment pick the same owner, with no coordination. Adding a member moves
  only the keys it now ranks first for (about 1/n of *new* placements); existing
  conversations never move, because a shard is always asked first whether it
  already holds a conversation (``api.shard_router``). Not weighted by free
  capacity: a weight that changes with load would make two shards disagree about
  a new conversation's owner at the same instant, which is exactly what must not
  happen; an even spread is what HRW gives, and a full shard queues (admission).
- ``place``: the owner of a conversation no live member holds. If a *down* member
  may hold the conversation (``possible_holders``: it was the owner under the
  membership of some earlier time, the members listed in the order they joined),
  the answer is "unavailable, retry" naming it — never a second session elsewhere.
- ``is_down``: a member's liveness from its last successful and failed contact.
- ``encode_cursor`` / ``decode_cursor``: the composite event cursor of a merged
  ``/v1/events`` stream (the last event id of every shard, in one SSE ``id``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.config.cluster import MEMBER_ID, Member, parse_member

__all__ = ["MEMBER_ID", "Member", "parse_member", "Placement", "conversation_key",
           "decode_cursor", "encode_cursor", "is_down", "place", "possible_holders", "ranking",
           "score", "start_position"]

CURSOR_PREFIX = "c1:"


def conversation_key(mode: str, agent_group: str, channel: str | None,
                     platform_id: str | None, thread_id: str | None) -> str:
    """The same on every shard for the same chat (see the module docstring)."""
    if mode == "agent-shared":
        return f"agent-shared\0{agent_group}"
    if mode == "per-thread":
        return f"per-thread\0{agent_group}\0{channel}\0{platform_id}\0{thread_id or ''}"
    return f"{mode}\0{agent_group}\0{channel}\0{platform_id}"


def score(key: str, member_id: str) -> int:
    """The rendezvous weight of ``member_id`` for ``key`` (64 bits of BLAKE2b)."""
    digest = hashlib.blake2b(f"{member_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(key: str, member_ids: list[str] | tuple[str, ...]) -> list[str]:
    """Members best first for ``key`` (ties, practically impossible, by id)."""
    return sorted(member_ids, key=lambda m: (-score(key, m), m))


@dataclass(frozen=True, slots=True)
class Placement:
    """``owner``: where a new conversation goes; else ``blocked_by``: the down member
    that may hold it (answer 503, retry later). Both None: no member is live."""

    owner: str | None
    blocked_by: str | None = None


def possible_holders(key: str, member_ids: list[str] | tuple[str, ...],
                     draining: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Every member that may hold ``key``'s conversation, given that ``member_ids`` is
    in the order the members joined. A conversation is only ever placed on the first
    non-draining member of the ranking over the members *of that time* (``place``
    refuses while any possible holder is down), so its holder is that member for some
    prefix of the list: the first non-draining of each prefix's ranking (and the
    draining ones ranked above it, which may have held it before they were drained)."""
    out: list[str] = []
    for n in range(1, len(member_ids) + 1):
        for member in ranking(key, member_ids[:n]):
            if member not in out:
                out.append(member)
            if member not in draining:
                break
    return out


def place(key: str, member_ids: list[str] | tuple[str, ...], down: set[str] | frozenset[str],
          draining: set[str] | frozenset[str] = frozenset()) -> Placement:
    """The owner of a conversation that no live member holds: the first non-draining
    member of the ranking. Blocked (``blocked_by``) while a possible holder of it is
    down — it may hold the conversation — so it is never placed a second time."""
    for member in possible_holders(key, member_ids, draining):
        if member in down:
            return Placement(None, blocked_by=member)
    for member in ranking(key, member_ids):
        if member not in draining:
            return Placement(member)
    return Placement(None)


def is_down(last_ok: float | None, last_fail: float | None) -> bool:
    """Down: its last contact failed (or it was never reached). One success ends it."""
    if last_fail is None:
        return last_ok is None
    return last_ok is None or last_fail >= last_ok


# --- the composite event cursor -------------------------------------------------------


def encode_cursor(positions: dict[str, int]) -> str:
    """``{"a": 12, "b": 40}`` → ``"c1:a=12,b=40"`` (an SSE ``id``: no newline, no NUL)."""
    return CURSOR_PREFIX + ",".join(f"{m}={n}" for m, n in sorted(positions.items()))


def decode_cursor(text: str | None) -> dict[str, int] | None:
    """The positions of a composite cursor; None if ``text`` is not one (a client
    without a cursor, or a plain single-shard event id: it starts live)."""
    if not text or not text.startswith(CURSOR_PREFIX):
        return None
    out: dict[str, int] = {}
    body = text[len(CURSOR_PREFIX):]
    if not body:
        return out
    for part in body.split(","):
        ident, sep, num = part.partition("=")
        if not sep or not MEMBER_ID.fullmatch(ident) or not num.isdigit() or len(num) > 18:
            return None
        out[ident] = int(num)
    return out


def start_position(cursor: dict[str, int] | None, member_id: str) -> int:
    """Where a merged stream starts reading ``member_id``: -1 = live (no cursor),
    else its position; a member the cursor does not name is read from the start
    (0: it was down or not yet a member when the client last read — nothing missed)."""
    if cursor is None:
        return -1
    return cursor.get(member_id, 0)
