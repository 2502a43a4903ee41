"""What retention does with one session now (issue 26.1): keep it, archive it, delete it.

Pure: the facts are read by the host (``host.retention.read_facts``) and the engine
(is an agent running); this module only decides, so every case is a row of a table
test (``tests/rules/test_retention.py``).

Two callers:

- the periodic sweep (``due``): only a *stopped* session with nothing pending and
  every reply settled, inactive for at least ``archive_after`` / ``delete_after``
  seconds, is removed. When both are set the shorter one applies: an archived
  session has no folder left to delete later, so "archive after a week, delete
  after a month" would never delete; the operator picks one per group instead.
- a removal by hand (``by_hand``: ``orchestrator sessions archive|delete``,
  ``DELETE /v1/sessions/{id}``): a running agent is stopped first (``STOP_FIRST``);
  pending inbound messages or undelivered replies refuse it unless forced — they
  would be lost, which is what ``--force`` says the operator wants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    KEEP = "keep"
    ARCHIVE = "archive"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Facts:
    """What is known of one session at the moment of the decision."""

    running: bool  # an agent runs (or is starting / stopping) for it
    pending_inbound: int  # messages_in rows still pending or paused (not 'system')
    undelivered: int  # messages_out rows not settled in inbound.db's delivered table
    idle_seconds: float  # since its last activity (reply, heartbeat, creation)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a removal by hand is not done: ``stop_first`` = stop its agent, then ask again;
    otherwise ``reason`` is the one line the CLI prints (exit 2) and the API returns (409)."""

    reason: str
    stop_first: bool = False


STOP_FIRST = Refusal("its agent is running: stopped first", stop_first=True)


def threshold(archive_after: float, delete_after: float) -> tuple[float, Action] | None:
    """(seconds of inactivity, action) of a group's settings; None = retention off.
    Both set: the shorter wins (the archive wins a tie: it can be restored)."""
    options = [(after, action) for after, action in ((archive_after, Action.ARCHIVE),
                                                     (delete_after, Action.DELETE))
               if after > 0]
    if not options:
        return None
    return min(options, key=lambda o: (o[0], o[1] is Action.DELETE))


def has_work(f: Facts) -> bool:
    return f.pending_inbound > 0 or f.undelivered > 0


def due(f: Facts, archive_after: float, delete_after: float) -> Action:
    """The periodic sweep's decision: never forced, never a running agent."""
    rule = threshold(archive_after, delete_after)
    if rule is None or f.running or has_work(f):
        return Action.KEEP
    after, action = rule
    return action if f.idle_seconds >= after else Action.KEEP


def by_hand(f: Facts, *, force: bool) -> Refusal | None:
    """A removal asked for by the operator: None = go ahead."""
    if f.running:
        return STOP_FIRST
    if has_work(f) and not force:
        parts = []
        if f.pending_inbound:
            parts.append(f"{f.pending_inbound} pending message"
                         f"{'' if f.pending_inbound == 1 else 's'}")
        if f.undelivered:
            parts.append(f"{f.undelivered} undelivered repl"
                         f"{'y' if f.undelivered == 1 else 'ies'}")
        return Refusal(f"it has {' and '.join(parts)}; wait for them, or pass --force "
                       "(?force=true) to drop them")
    return None
