"""What a restart may skip: per-session state saved after passes, checked at start-up.

Without it every session gets a full pass at start-up (two SQLite opens and
reads, ~0.7 ms): 10 000 sessions took 7 s before the host was "reconciled",
although nearly all of them are stopped with nothing to do, exactly as the
last run left them.

So after a pass that leaves a session *settled* — stopped, no agent, nothing
due, nothing scheduled, no claim, no pending delivery, no failure, every file
read — the supervisor saves the signatures of what that pass read: the folder's
identity and (mtime_ns, size, inode) of ``.heartbeat``, ``outbound.db`` and
``inbound.db``. A pass that leaves it unsettled removes the row. Rows are
written in batches (``StateBook.flush``, one registry transaction a second),
never one commit per pass.

At start-up (after the watch is up, so a change after the check has its event)
a session whose saved row matches what is on disk now, whose registry status
was ``stopped`` and whose agent was not adopted needs no pass: a full pass
would read the same files and find the same nothing to do. Its first pass later
(an event, or the sweep seeing a change) is a full one. Anything else — no row,
a row from before a change, a replaced file (new inode with the same size and
mtime), a folder that cannot be read — gets the full pass as before. Losing the
table costs time, never a wrong decision.

The start-up check stats the files through the group folder's descriptor
(``safefs.FolderStat``: the session folder is ``lstat``-ed, a link is never
taken for it, and nothing but ``stat`` results is read).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from loguru import logger

from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB
from orchestrator.contract.session_status import Status
from orchestrator.engine.tracked import Tracked
from orchestrator.host.filesig import Signature
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import FolderStat, open_group
from orchestrator.support.logonce import LogOnce

SIG_KEYS = (("hb", HEARTBEAT), ("out", OUTBOUND_DB), ("in", INBOUND_DB))


@dataclass(frozen=True, slots=True)
class OnDisk:
    """One session folder's identity and file signatures, as one start-up check saw them."""

    folder: tuple[int, int]
    sigs: dict[str, Signature]

    def text(self) -> str:
        return state_text(self.folder, self.sigs)


def _sig_text(sig: Signature) -> str:
    return "-" if sig is None else f"{sig[0]}:{sig[1]}:{sig[2]}"


def state_text(folder: tuple[int, int], sigs: dict[str, Signature]) -> str:
    """The saved form: compared as a string at start-up, never parsed."""
    return f"{folder[0]}:{folder[1]}|" + "|".join(_sig_text(sigs[k]) for k, _ in SIG_KEYS)


def settled(t: Tracked, alive: bool) -> bool:
    """Whether the pass just ended left ``t`` in a state a restart may skip."""
    ev, read = t.evidence, t.read
    return (t.status == Status.STOPPED and not alive and t.timer.at is None
            and ev.due == 0 and ev.next_inbound_due is None and t.delivery_due is None
            and not ev.claims and not ev.answers.groups and not t.delivery.waiting_files
            and t.exit is None and not t.op_running() and not read.busy
            and not t.start.failures and t.start.blocked_until is None
            and t.broken is None and read.identity is not None
            and all(k in read.sigs for k, _ in SIG_KEYS))


def saved_text(t: Tracked, alive: bool) -> str | None:
    """The row to save after a pass: its signatures when settled, else None (no row)."""
    if not settled(t, alive) or t.read.identity is None:  # (settled: never None)
        return None
    return state_text(t.read.identity[0], t.read.sigs)


def start_pass_reason(saved: str | None, now: str | None, adopted: bool,
                      status_before: str) -> str | None:
    """Why a session needs its full pass at start-up, or None: it may be skipped.

    ``saved``: its row (None: none); ``now``: the same text from disk now (None:
    the folder could not be checked); ``status_before``: its registry status as the
    last run left it; ``adopted``: its agent survived the restart.
    """
    if adopted:
        return "agent adopted"
    if status_before != Status.STOPPED:
        return f"was {status_before}"
    if saved is None:
        return "no saved state"
    if now is None:
        return "folder not checked"
    if saved != now:
        return "changed on disk"
    return None


def scan_group(group_fd: int, agent_group: str, session_ids: Iterable[str]
               ) -> dict[str, OnDisk]:
    """``OnDisk`` of each session folder in the group (opened by the caller through
    ``safefs.open_group``), by ``stat`` alone (``safefs.FolderStat``); a folder that
    is a link, missing or unreadable is left out."""
    out: dict[str, OnDisk] = {}
    for sid in session_ids:
        try:
            seen = FolderStat(group_fd, agent_group, sid)
        except OSError:
            continue
        out[sid] = OnDisk(seen.identity, {k: seen.signature(name) for k, name in SIG_KEYS})
    return out


def unchanged(data_dir: Path, tracked: dict[str, Tracked], saved: dict[str, str],
              adopted: set[str], before: Mapping[str, str]) -> set[str]:
    """The tracked sessions a start-up may skip (``start_pass_reason`` None against the
    disk now), each restored: signatures as checked (the sweep sees no change), and
    ``restored`` (its first real pass is a full one)."""
    groups: dict[str, list[str]] = {}
    for sid, t in tracked.items():
        if sid in saved and start_pass_reason(saved[sid], saved[sid], sid in adopted,
                                              before[sid]) is None:
            groups.setdefault(t.agent_group, []).append(sid)
    skipped: set[str] = set()
    for group, sids in groups.items():
        try:
            fd = open_group(data_dir, group)
        except OSError:  # gone, or a link (refused): their passes say so
            continue
        try:
            disk = scan_group(fd, group, sids)
        finally:
            os.close(fd)
        for sid in sids:
            seen = disk.get(sid)
            if start_pass_reason(saved[sid], seen.text() if seen else None, sid in adopted,
                                 before[sid]) is None and seen is not None:
                restore(tracked[sid], seen)
                skipped.add(sid)
    return skipped


def restore(t: Tracked, seen: OnDisk) -> None:
    """What a full pass would have left in ``t`` about its files."""
    t.read.sigs = dict(seen.sigs)
    out, inb = seen.sigs["out"], seen.sigs["in"]
    t.read.identity = (seen.folder, out[2] if out else None, inb[2] if inb else None)
    t.restored = True


class StateBook:
    """The saved rows: what is in the registry, and what the next flush changes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.saved: dict[str, str] = registry.saved_states()
        self._pending: dict[str, str | None] = {}
        self._said = LogOnce()

    def note(self, t: Tracked, alive: bool) -> None:
        """After a pass: remember the row to write (or to delete), if it changed."""
        text = saved_text(t, alive)
        sid = t.session_id
        latest = self._pending[sid] if sid in self._pending else self.saved.get(sid)
        if latest != text:
            self._pending[sid] = text

    def save(self) -> None:
        """``flush``, a failure said once (e.g. a full disk): the rows are kept for the
        next call, and a restart meanwhile only gives those sessions a full pass."""
        try:
            self.flush()
            self._said.clear("save")
        except (sqlite3.Error, OSError) as exc:
            if self._said.say("save", str(exc)):
                logger.warning("could not save the sessions' start-up state ({}); retrying",
                               exc)

    def flush(self) -> int:
        """Write what changed since the last flush in one transaction; the count."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        try:
            self.registry.save_states(pending)
        except Exception:
            # nothing was written: keep them for the next flush (a newer note wins)
            self._pending = pending | self._pending
            raise
        for sid, text in pending.items():
            if text is None:
                self.saved.pop(sid, None)
            else:
                self.saved[sid] = text
        return len(pending)
