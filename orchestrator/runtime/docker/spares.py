"""Containers created ahead of their start (``[docker] precreate``): the bookkeeping.

A cold start is ``docker create`` + ``docker start`` + the agent's own start-up.
The create (and the image check before it) can be done while nobody waits: right
after a session's container has stopped and been removed, its next container is
created (not started). Its next start then only has to ``start`` it.

Only the ``capacity`` most recently stopped sessions keep a spare: each is a
created container visible in ``docker ps -a``, and every reconcile lists them, so
10 000 spares would cost more than they save. Pure bookkeeping, no I/O: the runtime
creates, starts and removes; this says which container is whose and which to evict.
"""

from __future__ import annotations

from collections import OrderedDict


class Spares:
    """session id → created container id, least recently added first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_session: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_session)

    def has(self, session_id: str) -> bool:
        return session_id in self._by_session

    def ids(self) -> set[str]:
        return set(self._by_session.values())

    def put(self, session_id: str, container_id: str) -> list[str]:
        """Record a spare; return the container ids evicted to stay within capacity
        (the caller removes them). A replaced spare of the same session is evicted too."""
        evicted = []
        old = self._by_session.pop(session_id, None)
        if old is not None and old != container_id:
            evicted.append(old)
        self._by_session[session_id] = container_id
        while len(self._by_session) > self.capacity:
            _sid, cid = self._by_session.popitem(last=False)
            evicted.append(cid)
        return evicted

    def take(self, session_id: str) -> str | None:
        """The session's spare, now no longer a spare (it is being started)."""
        return self._by_session.pop(session_id, None)

    def forget_missing(self, present: set[str]) -> list[str]:
        """Drop spares whose container is gone (removed by hand, daemon reset)."""
        gone = [sid for sid, cid in self._by_session.items() if cid not in present]
        for sid in gone:
            del self._by_session[sid]
        return gone
