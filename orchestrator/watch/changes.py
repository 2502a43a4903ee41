"""What happened to a path, as the host's watch reports it.

An ``IntEnum`` with the values the watch has always used (1, 2, 3), so a raw
``(1, path)`` from a stand-in notifier compares equal to ``(Change.added, path)``.
"""

from __future__ import annotations

from enum import IntEnum


class Change(IntEnum):
    added = 1
    modified = 2
    deleted = 3
