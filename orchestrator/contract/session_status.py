"""A session's status: the one word the registry records (``container_status``) and
the contract shows, as an enum, so no module spells it by hand.

Three values (docs/contract.md): ``running`` (an agent is working), ``idle`` (an agent
is there with nothing to do) and ``stopped`` (no agent). Waiting for an admission slot
and being frozen are not statuses: a queued session is ``stopped`` with the reason
``queued: ...``, a paused agent ``idle`` with the reason ``paused ...``.

A ``StrEnum``: a member *is* its string, so it goes into SQLite, JSON and log lines as
the plain word, and a word read back from the registry compares equal to its member.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    RUNNING = "running"
    IDLE = "idle"
    STOPPED = "stopped"


def sql_list() -> str:
    """The values as an SQL list (``'running', 'idle', 'stopped'``), for CHECK constraints."""
    return ", ".join(f"'{s.value}'" for s in Status)
