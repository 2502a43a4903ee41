"""What a change under the sessions root means: an ``Activity`` (group, session, kind),
and the batch filters both watch modes share.

Separate from the watch that produces the changes (``inotify_thread``, the poll mode in
``watcher``) and from the loop that consumes them (the supervisor): all three name
``Activity``, and the classification of a raw inotify batch is the watch thread's main
work per reply, kept here as pure functions.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Container

from orchestrator.contract.layout import HEARTBEAT, Kind, PathInfo, classify
from orchestrator.watch.changes import Change


@dataclass(frozen=True, slots=True)
class Activity:
    agent_group: str
    session_id: str | None
    kind: Kind
    added: bool = False  # a directory or file appeared (list it: contents may be unreported)


RESCAN = Activity("", None, Kind.OTHER)  # "events may have been lost: reconcile everything"


def to_activities(root: Path, changes: set[tuple[Change, str]]) -> list[Activity]:
    """Classify one batch; unrelated paths (journals, agent scratch files) drop out."""
    out: dict[tuple, Activity] = {}
    base = os.fspath(root)
    for change, path in changes:
        info = _classified(base, path)
        if info is None or info.kind is Kind.OTHER:
            continue
        key = (info.agent_group, info.session_id, info.kind, change == Change.added)
        if key not in out:
            out[key] = Activity(*key)
    return list(out.values())


@functools.lru_cache(maxsize=16384)
def _classified(root: str, path: str) -> PathInfo | None:
    """``classify``, remembered: the same few paths per session (its databases, their
    journals, its heartbeat) come in every batch, and classifying them again was most
    of the watch thread's work per reply. Bounded: an agent's names cannot grow it."""
    return classify(root, path)


def unmuted(batch: list[Activity], muted: Container[str]) -> list[Activity]:
    """``batch`` without the heartbeats of muted sessions."""
    return [a for a in batch if a.kind is not Kind.HEARTBEAT or a.session_id not in muted]


def only_muted_heartbeats(prefix: str, raw: set[tuple[Change, str]],
                          muted: Container[str]) -> bool:
    """Whether a raw batch is nothing but heartbeats of muted sessions (``prefix``:
    the sessions root with a trailing separator). The common batch under heartbeat
    load, told apart with string operations alone before anything is classified."""
    for _, path in raw:
        if not path.startswith(prefix):
            return False
        parts = path[len(prefix):].split(os.sep)
        if len(parts) != 3 or parts[2] != HEARTBEAT or parts[1] not in muted:
            return False
    return True
