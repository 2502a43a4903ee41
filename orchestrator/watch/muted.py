"""The sessions whose heartbeats cannot matter now, shared by the loop and the watch thread.

The session worker mutes a session after a pass that leaves its agent running with a
timer set, and unmutes it at the start of its next pass, before it reads the heartbeat
(``engine.session_worker``). The watch thread drops a muted session's heartbeat events;
``folder_watch`` goes further and stops asking the kernel for them (the session
folder's watch without ``IN_ATTRIB``/``IN_CLOSE_WRITE``: a touch then costs no wake-up
at all). For that it must hear of every unmute, soon and without a scan of every muted
session: ``left`` collects the ids unmuted since the watch last looked.

``reading``: the sessions with a pass queued (marked, not begun) that will read
``outbound.db``, kept by the loop (``engine.ports.Dirty``): the watch thread drops their
``outbound.db`` writes and journal as it reads them (``folder_watch``), since that
pass begins after the read and so reads the commit anyway. Under a flat-out load most
commits land on a session whose pass is already queued; each was ~4 events, a
classification and a mark on the loop for nothing. (Measured: the quick bench's
flat-out run, events mode, 4 interleaved runs each at load ~3: 0.685 → 0.662 ms CPU
per reply at the median, the loop thread 1.75 → 1.67 s: small, near the noise.)

Both sides use single set operations (atomic under the GIL), never an iteration of
``ids`` from the other thread. ``left`` holds each id once, so it is bounded by the
number of sessions even while nobody takes from it (poll mode).
"""

from __future__ import annotations

from typing import Iterator


class Muted:
    """A set of session ids (``add``, ``discard``, ``in``) that also records in ``left``
    the ids it lost (``take_left``)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._left: set[str] = set()
        self.reading: set[str] = set()  # a queued pass will read outbound.db (above)

    def add(self, session_id: str) -> None:
        self._ids.add(session_id)

    def discard(self, session_id: str) -> None:
        if session_id in self._ids:
            self._ids.discard(session_id)
            self._left.add(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._ids))

    def has_left(self) -> bool:
        return bool(self._left)

    def take_left(self) -> list[str]:
        """The ids unmuted since the last call (each ``pop`` is atomic: an id unmuted
        meanwhile is taken now or by the next call)."""
        out: list[str] = []
        while self._left:
            try:
                out.append(self._left.pop())
            except KeyError:  # (emptied between the test and the pop)
                break
        return out
