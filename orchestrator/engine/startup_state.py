"""What a restart may skip: per-session state saved after passes, checked at start-up.

Without it every session gets a full pass at start-up (two SQLite opens and
reads, ~0.7 ms): 10 000 sessions took 7 s before the host was "reconciled",
although nearly all of them are stopped with nothing to do, exactly as the
last run left them.

So after a pass that leaves a session *settled* — stopped, no agent, nothing
due, nothing scheduled, no claim, no pending delivery, no failure, every file
read — the supervisor saves the signatures of what that pass read: the folder's
identity, (mtime_ns, size, inode) of ``.heartbeat``, ``outbound.db`` and
``inbound.db``, and the folder's own (mtime_ns, ctime_ns) from before the last
pass that read all three (its *stamp*, ``tracked.trusted_stamp``). A pass that
leaves it unsettled removes the row. Rows are written in batches
(``StateBook.flush``, one registry transaction a second), never one commit per pass.

At start-up (after the watch is up, so a change after the check has its event)
a session whose saved row matches what is on disk now, whose registry status
was ``stopped`` and whose agent was not adopted needs no pass: a full pass
would read the same files and find the same nothing to do. Such a session stays
a *dormant row* (``tracked.TrackedMap``: no ``Tracked`` is built for it, 100 000
of them took 3 s and ~110 MB) until something touches it; then it wakes restored
from its row, and its first pass is a full one. Anything else — no row, a row
from before a change, a replaced file (new inode with the same size and mtime),
a folder that cannot be read — gets the full pass as before. Losing the table
costs time, never a wrong decision.

The check (``recheck``) is one ``lstat`` of the folder through its group
folder's descriptor when the stamp is as saved (plus ``.heartbeat``'s when there
is one), the three files' when it is not; a link is never taken for the folder,
and nothing but ``stat`` results is read. The reconcile sweep keeps comparing a
dormant session's databases themselves (``changed``).
"""

from __future__ import annotations

import array
import os
import sqlite3
from itertools import compress, repeat
from operator import add, and_, itemgetter
from pathlib import Path
from stat import S_ISDIR
from typing import Mapping, NamedTuple

from loguru import logger

from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB
from orchestrator.contract.session_status import Status
from orchestrator.engine.tracked import LazyPaths, Stamp, Tracked, Wake, trusted_stamp
from orchestrator.host.filesig import Signature, file_signature
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import open_group
from orchestrator.support.logonce import LogOnce
from orchestrator.watch.bulk_add import FIELDS
from orchestrator.watch.head_start import Seen

SIG_KEYS = (("hb", HEARTBEAT), ("out", OUTBOUND_DB), ("in", INBOUND_DB))
NO_STAMP = "-"


def _sig_text(sig: Signature) -> str:
    return "-" if sig is None else f"{sig[0]}:{sig[1]}:{sig[2]}"


def _stamp_text(stamp: Stamp | None) -> str:
    return NO_STAMP if stamp is None else f"{stamp[0]}:{stamp[1]}"


def files_text(folder: tuple[int, int], sigs: dict[str, Signature]) -> str:
    """The folder's identity and its three files' signatures, as saved."""
    return f"{folder[0]}:{folder[1]}|" + "|".join(_sig_text(sigs[k]) for k, _ in SIG_KEYS)


def state_text(folder: tuple[int, int], sigs: dict[str, Signature],
               stamp: Stamp | None = None) -> str:
    """The saved form, ``files_text`` and the folder's stamp: compared as strings at
    start-up; parsed only when a dormant session wakes (``restore``)."""
    return f"{files_text(folder, sigs)}|{_stamp_text(stamp)}"


def split_row(row: str) -> tuple[str, str]:
    """(``files_text``, stamp text) of a saved row; a row from before stamps were
    saved (four fields) has none."""
    if row.count("|") == 4:
        files, _, stamp = row.rpartition("|")
        return files, stamp
    return row, NO_STAMP


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
    return state_text(t.read.identity[0], t.read.sigs, t.read.stamp)


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


def recheck(group_fd: int, session_id: str, row: str,
            st: os.stat_result | _Seen | None = None) -> str | None:
    """The session's row as its folder is now if nothing changed since ``row`` was
    saved (the same row, or with a new stamp), None if something did or the folder
    cannot be checked (a link, missing, unreadable). ``group_fd``: its group folder
    (``safefs.open_group``); nothing but ``stat`` results is read.

    One ``lstat`` of the folder when its stamp is as saved: a commit to either
    database creates and removes a ``-journal`` beside it (``journal_mode=DELETE``,
    the contract), and a file created, removed or replaced is a change of the
    folder's entries, so either moves its mtime and ctime. A ``.heartbeat`` that
    was there is touched in place, which moves neither: it is ``stat``-ed too. When
    the stamp differs (a scratch file came and went, or the row has no stamp) the
    three files are compared one by one, and a match gives the row the new stamp.
    A write that needs no journal (``journal_mode=OFF``, against the contract) is
    not seen here: the sweep compares the files themselves (``changed``).
    ``st``: the folder's ``lstat``, if the caller has it.
    """
    if st is None:
        try:
            st = os.stat(session_id, dir_fd=group_fd, follow_symlinks=False)
        except OSError:
            return None
    if not S_ISDIR(st.st_mode):
        return None
    files, stamp = split_row(row)
    folder = f"{st.st_dev}:{st.st_ino}|"
    if not files.startswith(folder):
        return None  # another folder
    prefix = session_id + "/"
    times = (st.st_mtime_ns, st.st_ctime_ns)
    if stamp != NO_STAMP and stamp == _stamp_text(times):
        beat = files[len(folder):].split("|", 1)[0]
        if beat == "-" or _sig_text(file_signature(prefix + HEARTBEAT, group_fd)) == beat:
            return row
        return None
    sigs = {k: file_signature(prefix + name, group_fd) for k, name in SIG_KEYS}
    if files_text((st.st_dev, st.st_ino), sigs) != files:
        return None
    return f"{files}|{_stamp_text(trusted_stamp(times))}"  # (read before the files)


def changed(group_fd: int, session_id: str, row: str) -> bool:
    """The sweep's look at a dormant session: its folder or either database differs
    from ``row`` (``stat`` only; no agent runs, so its heartbeat decides nothing)."""
    try:
        st = os.stat(session_id, dir_fd=group_fd, follow_symlinks=False)
    except OSError:
        return True
    if not S_ISDIR(st.st_mode):
        return True
    files, _ = split_row(row)
    parts = files.split("|")
    if len(parts) != 4 or parts[0] != f"{st.st_dev}:{st.st_ino}":
        return True
    prefix = session_id + "/"
    return (_sig_text(file_signature(prefix + OUTBOUND_DB, group_fd)) != parts[2]
            or _sig_text(file_signature(prefix + INBOUND_DB, group_fd)) != parts[3])


class _Seen(NamedTuple):
    """A folder's ``lstat`` as the watch took it (``recheck`` reads these fields)."""

    st_dev: int
    st_ino: int
    st_mode: int
    st_mtime_ns: int
    st_ctime_ns: int


def as_saved(rows: Mapping[str, tuple[str, str]], values: array.array,
             index: Mapping[str, int], texts: tuple[list[str], list[str]]) -> set[str]:
    """The common case of the check below for a whole group at once: the sessions
    whose row has no heartbeat and starts with their folder's ``dev:ino`` and ends
    with its ``mtime:ctime`` as the head start's child gave them (``bulk_add``: every
    folder recorded, in order). By C loops: 100 000 sessions ~0.1 s, against ~0.3 s
    formatting two strings each here, the last step of a restart. Empty where the
    records are not whole or one is not a folder's (each is then checked by itself)."""
    idents, times = texts
    n = len(index)
    if (not n or len(idents) != n or n * FIELDS != len(values)
            or any(not S_ISDIR(mode) for mode in set(values[3::FIELDS]))
            or list(index.values()) != list(range(0, len(values), FIELDS))):
        return set()
    names = list(index)
    try:
        saved = list(map(itemgetter(1), map(rows.__getitem__, names)))  # (all dormant)
    except KeyError:
        saved = [row[1] if (row := rows.get(name)) else "" for name in names]
    heads = map(str.startswith, saved, map(add, idents, repeat("|-|")))
    tails = map(str.endswith, saved, map(add, repeat("|"), times))
    return set(compress(names, map(and_, heads, tails)))


def unchanged(data_dir: Path, rows: Mapping[str, tuple[str, str]],
              seen: Mapping[str, Seen] | None = None) -> tuple[set[str], dict[str, str]]:
    """Of the dormant ``rows`` (session → (agent group, saved row)): the sessions that
    changed on disk or cannot be checked (they need their full pass), and the rows
    that are unchanged but got a new stamp (to save, so the next start needs one
    ``stat`` for them).

    ``seen`` (agent group → (records, session → offset, the lstats as text),
    ``watch.head_start``): the folder's ``lstat`` the watch took just after adding its
    watch, used instead of one now (a change after it has its event: the caller keeps
    its mark); first for the whole group at once (``as_saved``), then by itself where
    that says nothing."""
    lstat = os.stat
    seen = seen or {}
    groups: dict[str, list[str]] = {}
    for sid, (group, _) in rows.items():
        groups.setdefault(group, []).append(sid)
    moved: set[str] = set()
    fresh: dict[str, str] = {}
    for group, sids in groups.items():
        try:
            fd = open_group(data_dir, group)
        except OSError:  # gone, or a link (refused): their passes say so
            moved.update(sids)
            continue
        values, index, texts = seen.get(group, (None, {}, ([], [])))
        if values is not None:
            sure = as_saved(rows, values, index, texts)
            sids = [sid for sid in sids if sid not in sure] if sure else sids
        try:
            for sid in sids:
                row = rows[sid][1]
                at = index.get(sid)
                if at is not None:
                    assert values is not None
                    dev, ino, mode, mtime, ctime = values[at + 1:at + 6]
                    if (row.endswith(f"|{mtime}:{ctime}") and S_ISDIR(mode)
                            and row.startswith(f"{dev}:{ino}|-|")):  # (as below)
                        continue
                    st: os.stat_result | _Seen = _Seen(dev, ino, mode, mtime, ctime)
                else:
                    try:
                        st = lstat(sid, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        moved.add(sid)
                        continue
                if (row.endswith(f"|{st.st_mtime_ns}:{st.st_ctime_ns}")  # the common case,
                        and row.startswith(f"{st.st_dev}:{st.st_ino}|-|")  # by string ops:
                        and S_ISDIR(st.st_mode)):  # no heartbeat, and the stamp as saved
                    continue
                now = recheck(fd, sid, row, st)
                if now is None:
                    moved.add(sid)
                elif now != row:
                    fresh[sid] = now
        finally:
            os.close(fd)
    return moved, fresh


def _sig(text: str) -> Signature:
    if text == "-":
        return None
    m, s, i = text.split(":")
    return (int(m), int(s), int(i))


def restore(t: Tracked, row: str) -> Tracked:
    """What a full pass would have left in ``t`` about its files (``row`` checked
    against the disk at start-up): its first real pass is a full one (``restored``).
    A row that does not parse leaves ``t`` as new (a full pass reads everything)."""
    files, stamp = split_row(row)
    try:
        head, *rest = files.split("|")
        dev, ino = head.split(":")
        sigs = {k: _sig(text) for (k, _), text in zip(SIG_KEYS, rest, strict=True)}
        times = None if stamp == NO_STAMP else tuple(int(x) for x in stamp.split(":"))
    except ValueError:
        return t
    out, inb = sigs["out"], sigs["in"]
    t.read.sigs = sigs
    t.read.identity = ((int(dev), int(ino)), out[2] if out else None, inb[2] if inb else None)
    t.read.stamp = (times[0], times[1]) if times and len(times) == 2 else None
    t.restored = True
    return t


def waker(data_dir: Path) -> Wake:
    """``TrackedMap.wake``: a dormant session's ``Tracked``, restored from its row."""
    def wake(agent_group: str, session_id: str, row: str) -> Tracked:
        return restore(Tracked(agent_group, session_id,
                               LazyPaths(data_dir, agent_group, session_id)), row)
    return wake


class StateBook:
    """The saved rows: what is in the registry, and what the next flush changes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._saved: dict[str, str] | None = None
        self._pending: dict[str, str | None] = {}
        self._said = LogOnce()

    @property
    def saved(self) -> dict[str, str]:
        """The rows as saved (read when first asked: at start-up that is once the
        watch thread has begun its walk, which it overlaps)."""
        if self._saved is None:
            self._saved = self.registry.saved_states()
        return self._saved

    def note(self, t: Tracked, alive: bool) -> None:
        """After a pass: remember the row to write (or to delete), if it changed."""
        text = saved_text(t, alive)
        sid = t.session_id
        latest = self._pending[sid] if sid in self._pending else self.saved.get(sid)
        if latest != text:
            self._pending[sid] = text

    def refresh(self, session_id: str, row: str) -> None:
        """A dormant session's row with a new stamp (``unchanged``), for the next flush."""
        if self.saved.get(session_id) != row:
            self._pending[session_id] = row

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
