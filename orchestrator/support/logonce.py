"""Say a trouble once, not once per pass: the last message said, per key.

A session whose folder is unreadable is met by every pass, a Docker daemon that is
down by every call, a full disk by every event: logging each meeting would bury the
one line that matters. Every place that must "log it once" asks a ``LogOnce``:
``say(key, message)`` is True only when ``message`` is not what was last said for
``key`` (so the caller logs it), and ``clear(key)`` forgets the key, returning what
had been said (so the caller can say it cleared) or None when nothing was.

It logs nothing itself: the caller picks the level and the words. Keys are anything
hashable (a session id, an image name, a fixed word). Not thread-safe: one owner
(the event loop, or one thread) per instance.
"""

from __future__ import annotations

from typing import Hashable


class LogOnce:
    __slots__ = ("_said",)

    def __init__(self) -> None:
        # made at the first ``say``: 100 000 tracked sessions hold two of these each,
        # nearly all never say anything (an empty dict each was ~12 MB)
        self._said: dict[Hashable, str] | None = None

    def say(self, key: Hashable, message: str) -> bool:
        """Remember ``message`` for ``key``; whether it is new (log it) or a repeat."""
        if self._said is None:
            self._said = {}
        elif self._said.get(key) == message:
            return False
        self._said[key] = message
        return True

    def clear(self, key: Hashable) -> str | None:
        """The trouble of ``key`` is over: what had been said, or None if nothing was."""
        return None if self._said is None else self._said.pop(key, None)

    def last(self, key: Hashable) -> str | None:
        """What was last said for ``key`` and not cleared since."""
        return None if self._said is None else self._said.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return self._said is not None and key in self._said
