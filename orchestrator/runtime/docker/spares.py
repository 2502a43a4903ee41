"""A session's next container, created ahead of demand: only ``docker start`` is left.

    Spares(limit)                       # at most ``limit`` sessions, most recent first
    spares.put(Spare(...)) -> evicted   # the ones that no longer fit (or were replaced)
    spares.take(session_id) -> Spare | None
    spares.owns(container_id)           # reconcile and stop leave these alone
    spares.started(session_id)          # count a start: a session started twice returns
    spares.returning(session_id)
    spare_key(spec, host_kwargs, image_id)

Why: after a session's agent stopped (idle, ``stop_idle_after``) its next message
waited for ``docker create`` (and the image inspect before it) on top of ``docker
start``; measured ~20-25 ms of a cold round trip on this host. So when an agent ends
well (``wants_spare``: stopped, or exited 0) and its session has been started before
(``returning``: the first end of a session says nothing about whether it comes back —
measured: a spare made for every new session's first stop, never used, was background
work that collided with the next new session's start) the runtime creates the next
container right after the old one is removed — with the session's last settings and,
where the group allows it, the network namespace its last agent had (``netns.py``:
kept for the session) — and the next ``start`` only starts it.

A spare is used only if it is what ``start`` would create now: ``spare_key`` hashes
the create arguments (image, command, user, environment — secrets included, the hash
is kept in memory only and never logged —, labels, mounts, limits, the network it
joins) and the image's id; any difference (settings changed, image rebuilt, another
uid) and it is removed and the start goes the plain way. So a spare can never run an
agent with settings other than the ones in force when it starts.

Bounded: ``[docker] prepared_containers`` sessions (default 4), the oldest removed
when a newer one needs the room; spares are removed when the runtime closes, and a
crash's leftovers (state ``created``) by the next reconcile, like any dead container.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Spare:
    session_id: str
    container_id: str
    holder: str | None  # the netns holder it joins (kept until it starts), or None
    key: str  # spare_key of what it was created with


def spare_key(spec: dict[str, Any], host_kwargs: dict[str, Any], image_id: str) -> str:
    """A digest of everything a container is created with (see the module docstring)."""
    blob = json.dumps({"spec": spec, "host": host_kwargs, "image": image_id}, sort_keys=True,
                      default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def wants_spare(reason: str, exit_code: int | None) -> bool:
    """Whether an agent's end makes its session's next container worth creating now: it
    was stopped (idle, or by hand) or ended by itself with 0 — not killed, out of
    memory, vanished or failing (a failing agent's next start is not about speed)."""
    return reason == "stopped" or (reason == "exited" and exit_code == 0)


class Spares:
    """The created, not yet started, containers of at most ``limit`` sessions."""

    def __init__(self, limit: int, remember: int = 4096) -> None:
        self.limit = max(0, limit)
        self._by_session: OrderedDict[str, Spare] = OrderedDict()
        self._remember = remember
        self._starts: OrderedDict[str, int] = OrderedDict()  # recent sessions' start counts

    def started(self, session_id: str) -> None:
        """Count one start of ``session_id`` (the ``remember`` most recent sessions)."""
        self._starts[session_id] = self._starts.pop(session_id, 0) + 1
        while len(self._starts) > self._remember:
            self._starts.popitem(last=False)

    def returning(self, session_id: str) -> bool:
        """Whether ``session_id`` was started more than once (recently)."""
        return self._starts.get(session_id, 0) > 1

    @property
    def on(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._by_session)

    def put(self, spare: Spare) -> list[Spare]:
        """Keep ``spare`` (newest); return those to remove: one it replaced, the oldest
        beyond ``limit`` (``spare`` itself when the limit is 0)."""
        out = []
        old = self._by_session.pop(spare.session_id, None)
        if old is not None:
            out.append(old)
        self._by_session[spare.session_id] = spare
        while len(self._by_session) > self.limit:
            out.append(self._by_session.popitem(last=False)[1])
        return out

    def take(self, session_id: str) -> Spare | None:
        return self._by_session.pop(session_id, None)

    def owns(self, container_id: str) -> bool:
        return any(s.container_id == container_id for s in self._by_session.values())

    def drain(self) -> list[Spare]:
        out = list(self._by_session.values())
        self._by_session.clear()
        return out
