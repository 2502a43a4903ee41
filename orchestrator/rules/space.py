"""Space rules, pure: when a session is over its quota, and what the host does with
its reserve on the data dir's file system (``host.space`` measures, the engine's
``SpaceWatch`` applies).

- A session over ``[sessions] max_session_bytes`` is killed and its starts refused
  until it is back under (each refusal counts towards ``max_tries``).
- The reserve (``min_free_bytes``, a file the host holds) is released when free
  space falls below ``min_free_bytes`` — an agent filled the disk up to it — and
  the disk is *low* until the reserve can be taken again, which needs room for the
  reserve and as much again (``2 * min_free_bytes`` free): while low, the session
  using the most space is killed and refused like one over its quota, so the space
  it took is not taken again the moment an operator frees some.
- A file system that never had room for the reserve (a small test disk) never goes
  low: there is no reserve to defend.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping


def over_quota(used: int, limit: int) -> str | None:
    """Why a session folder of ``used`` bytes is over its quota, or None."""
    if limit > 0 and used > limit:
        return f"session over its space quota: {used} bytes > {limit}"
    return None


class Step(enum.Enum):
    NONE = "none"
    RELEASE = "release"  # give the reserve's space to the host's own writes
    TAKE = "take"  # allocate the reserve (again)


@dataclass(frozen=True, slots=True)
class Disk:
    free: int  # bytes free on the data dir's file system (the reserve not counted)
    held: int  # bytes the reserve file holds
    ever_held: bool  # the reserve was held once since the host started


@dataclass(frozen=True, slots=True)
class DiskVerdict:
    step: Step
    low: bool  # the reserve is (being) spent: the biggest session is stopped


def disk_verdict(disk: Disk, min_free: int) -> DiskVerdict:
    """What to do with the reserve, and whether the disk is low (module text)."""
    if min_free <= 0:
        return DiskVerdict(Step.NONE, False)
    if disk.held >= min_free:
        if disk.free < min_free:
            return DiskVerdict(Step.RELEASE, True)
        return DiskVerdict(Step.NONE, False)
    if disk.free >= 2 * min_free:
        return DiskVerdict(Step.TAKE, False)
    return DiskVerdict(Step.NONE, disk.ever_held)


def biggest(usage: Mapping[str, int]) -> str | None:
    """The session using the most space (ties: the first id in order), or None."""
    if not usage:
        return None
    return max(sorted(usage), key=lambda sid: usage[sid])


def low_reason(disk: Disk, min_free: int, used: int) -> str:
    return (f"disk nearly full: {disk.free} bytes free, the host keeps {min_free} "
            f"([sessions] min_free_bytes); this session uses the most space ({used} bytes)")
