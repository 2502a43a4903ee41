"""Which messages an agent has acknowledged but not answered yet.

NanoClaw's runner feeds follow-up messages into a model call that is already
running and acks them ``completed`` at once, long before it answers them; the
model may then be silent (no heartbeat) for a while. Such a message is work in
flight even though no claim shows it, and an agent stopped then would drop it.
So the host keeps, per session, the acked messages still awaiting a reply:

- messages are taken in the order the host first saw them claimed or acked
  (the agent's prompt order), grouped by acknowledgement (one ack transaction,
  one stamp — one prompt, one answer);
- each new reply answers the oldest waiting group that it can have come after:
  one acked in an earlier read of outbound.db (the host saw the ack first), or,
  within the same read, one the reply names in ``in_reply_to`` or whose ack is
  not newer than the reply's ``timestamp``;
- a reply that finds no group but comes while messages are claimed counts for
  the claim it names (or the oldest one): an agent that writes the reply first
  and the ack after is answered when the ack comes;
- a question card (``{"type": "ask_question"}``) answers nothing;
- a group waits at most ``answer_wait`` seconds after its ack; after that its
  silence is taken as the answer (agents may choose not to reply).

``in_reply_to`` is used only as a hint inside one read: NanoClaw fills it with the
newest message of the chat, not the one answered. Pure functions of values, so
the rules are table-tested (tests/rules/test_answers.py); the session worker keeps the
state and applies the rule for a stopped agent (retry what still waits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Mapping, Sequence

MAX_GROUPS = 1000  # an agent that acks without ever replying costs bounded memory


@dataclass(frozen=True, slots=True)
class Group:
    ids: frozenset[str]
    seen: tuple[int, datetime]  # (read, stamp) of when the host first saw it claimed/acked
    acked_at: datetime  # the ack's stamp, never later than when the host saw it


@dataclass(frozen=True, slots=True)
class Reply:
    in_reply_to: str | None
    at: datetime | None  # its ``timestamp``; None if unreadable


@dataclass(frozen=True, slots=True)
class Answers:
    reads: int = 0
    first_seen: Mapping[str, tuple[int, datetime]] = field(default_factory=dict)
    groups: tuple[Group, ...] = ()  # waiting for a reply, oldest first
    prepaid: frozenset[str] = frozenset()  # claims a reply already answered
    expired: frozenset[str] = frozenset()  # given up on in the last step (for a log line)


def is_answer(content: str) -> bool:
    """False for a question card: asking is not answering."""
    try:
        body = json.loads(content)
    except (ValueError, TypeError):
        return True
    return not (isinstance(body, dict) and body.get("type") == "ask_question")


def _eligible(group: Group, reply: Reply, read: int) -> bool:
    if group.seen[0] < read:
        return True
    return reply.in_reply_to in group.ids or (reply.at is not None and group.acked_at <= reply.at)


def step(state: Answers, *, now: datetime, answer_wait: float,
         claims: Mapping[str, datetime | None], completed: Mapping[str, datetime | None],
         replies: Sequence[Reply]) -> Answers:
    """Fold one read of outbound.db into the state.

    ``claims``: messages acked ``processing`` now, with their claim stamps (first
    seen in one read, a claim was taken before a follow-up acked after its stamp);
    ``completed``: messages newly
    acked ``completed`` in this read that need an answer (trigger=1, not system),
    with their ack stamps; ``replies``: reply rows new in this read, by seq.
    """
    read = state.reads + 1
    wait = timedelta(seconds=answer_wait)
    claimed = list(claims)
    first_seen = dict(state.first_seen)
    for mid, stamp in claims.items():
        first_seen.setdefault(mid, (read, min(stamp, now) if stamp is not None else now))
    prepaid = set(state.prepaid)
    fresh: dict[tuple[tuple[int, datetime], datetime], set[str]] = {}
    for mid, stamp in completed.items():
        if mid in prepaid:
            prepaid.discard(mid)
            continue
        acked = min(stamp, now) if stamp is not None else now
        if acked + wait <= now:
            continue  # history (e.g. the first read after a restart): long settled
        fresh.setdefault((first_seen.get(mid, (read, acked)), acked), set()).add(mid)
    groups = list(state.groups) + [Group(frozenset(ids), seen, acked)
                                   for (seen, acked), ids in fresh.items()]
    if fresh:  # the rest is in order already
        groups.sort(key=lambda g: (g.seen, g.acked_at, min(g.ids)))
    for reply in replies:
        open_claims = [c for c in claimed if c not in prepaid and c not in completed]
        if reply.in_reply_to in open_claims:
            prepaid.add(reply.in_reply_to)
            continue
        hit = next((i for i, g in enumerate(groups) if _eligible(g, reply, read)), None)
        if hit is not None:
            groups.pop(hit)
        elif open_claims:
            prepaid.add(min(open_claims, key=lambda c: (first_seen[c], c)))
    kept = [g for g in groups if g.acked_at + wait > now]
    expired = frozenset(mid for g in groups if g.acked_at + wait <= now for mid in g.ids)
    kept = kept[-MAX_GROUPS:]
    live = set(claimed) | prepaid | {mid for g in kept for mid in g.ids}
    return Answers(reads=read, first_seen={m: r for m, r in first_seen.items() if m in live},
                   groups=tuple(kept), prepaid=frozenset(prepaid & live), expired=expired)


def awaiting(state: Answers, now: datetime, answer_wait: float) -> list[str]:
    """Messages acked and still waiting for their answer at ``now``."""
    wait = timedelta(seconds=answer_wait)
    return sorted(mid for g in state.groups if g.acked_at + wait > now for mid in g.ids)


def answer_due(state: Answers, answer_wait: float) -> datetime | None:
    """Until when some acked message may still be answered (None: nothing waits)."""
    if not state.groups:
        return None
    return max(g.acked_at for g in state.groups) + timedelta(seconds=answer_wait)


def forget(state: Answers) -> Answers:
    """After the agent has gone: what waited has been retried; start afresh."""
    return Answers(reads=state.reads)
