"""The host's inotify watch, reading side: the events of the folders ``watch_table``
watches, as batches of ``(Change, path)``.

``FolderWatch`` is the ``inotify_thread.Notifier`` the watch thread drives
(``watch(debounce_ms, step_ms, timeout_ms, stop_event)`` returning a set of
``(Change, path)``, "timeout" or "stop"; a context manager; tests script a
stand-in). A queue overflow (``IN_Q_OVERFLOW``) is reported (``take_lost``), not
dropped, and the watched inodes come from its own bookkeeping (``watched_inodes``).
It reads and parses the queue, drops (and then stops asking for) the heartbeats of
muted sessions, drops the events of *retiring* sessions (retention is moving and
removing their folders: their departures from a group folder and every event of their
own folder, ~8 per session), and ends a batch; which folders hold a watch (the walk,
the budget, a new folder's watch) is ``watch_table.WatchTable``'s, which it builds on.
"""

from __future__ import annotations

import os
import select
import struct
import time
from typing import Container, Protocol

from orchestrator.contract.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
)
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, INBOX, OUTBOUND_DB, OUTBOX
from orchestrator.watch.changes import Change
from orchestrator.watch.commits import (
    COMMIT_ENDS,
    COMMITTED,
    OPEN,
    commit_state,
    stretch_after,
)
from orchestrator.watch.muted import Muted
from orchestrator.watch.start_walk import MASK
from orchestrator.watch.watch_table import (
    POLL_INTERVAL,
    POLL_RATE,
    WatchTable,
    watched_level,
)

IN_ISDIR = 0x40000000

# A muted session's folder (``quiet``): no attribute changes or closes, so its agent's
# heartbeat touches (a utime, a close) wake nobody; a commit is still IN_MODIFY, a
# file or folder made, removed or renamed still reported.
QUIET_MASK = MASK & ~(IN_ATTRIB | IN_CLOSE_WRITE)
UNMUTED_EVERY = 0.02  # s: how often the watch looks for unmuted sessions, at most
# s: how long a session stays unmuted before its watch asks for heartbeats again: a pass
# unmutes its session and (usually) mutes it again a few ms later, and a watch changed
# and changed back for each pass cost more than the heartbeats it saved
UNMUTED_FOR = 0.05
ADDED, MODIFIED, DELETED = Change.added, Change.modified, Change.deleted
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
# The entries of a session folder whose events the host acts on (``layout.classify``
# gives every other name there Kind.OTHER, which no pass reads), and the databases'
# journals, which tell where a batch stands with a commit (``commits``).
SESSION_ENTRIES = frozenset({HEARTBEAT, OUTBOUND_DB, INBOUND_DB, OUTBOX, INBOX}) | COMMIT_ENDS
# The databases' writes and journals, dropped as they are read when no pass needs
# them (``FolderWatch._needless``): inbound.db's of a muted session (its agent runs and
# reads its messages itself, so a pass for them alone is skipped anyway,
# ``SessionWorker._quiet``; nearly all are the host's own delivery records, ~4 events
# per pass that delivered), outbound.db's of a session whose queued pass will read it
# (``Muted.reading``). Each cost the watch thread a classification and the loop a
# mark, or a pass begun to be skipped. (A database itself made, removed or renamed
# over still goes the whole way.)
DB_WRITES = frozenset({INBOUND_DB, OUTBOUND_DB}) | COMMIT_ENDS
NAMES_KEPT = 4096  # raw names remembered decoded (an agent's many names: decoded each time)
# an event without a name to report: the queue overflowed, a watched folder itself went
_NOT_NAMED = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
# a folder leaving its parent (a retiring session's, dropped: ``FolderWatch._parse``)
_DEPARTURE = IN_DELETE | IN_MOVED_FROM
# an event that is more than a write to a file already there (``FolderWatch._parse``)
_NOT_A_WRITE = (IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF
                | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW)
_READ = 64 * 1024
_DRAINED = _READ - _HEADER.size - 256  # a read this short emptied the queue (NAME_MAX 255)
# While nothing has changed, how often ``watch`` wakes up to ask its stop event (the
# first change ends the wait at once, so this costs no latency, only wake-ups).
IDLE_WAKE_MS = 100


class StopEvent(Protocol):
    def is_set(self) -> bool: ...


def change_of(mask: int) -> Change | None:
    """An inotify event as a ``Change`` (None: not a change)."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        return ADDED
    if mask & (IN_DELETE | IN_MOVED_FROM):
        return DELETED
    if mask & (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE):
        return MODIFIED
    return None


def read_pause(gap_ms: int, step_ms: int, debounce_ms: int, first: float | None,
               read_at: float, now: float) -> float | None:
    """Seconds to sleep before the next read of the queue, or None: wait for an event
    (``poll``). While a batch is open (``first``: when it began) the next read comes a
    step after the last one (``read_at``), never past the batch's ``debounce_ms``;
    outside one (events read, all of them dropped: muted heartbeats), ``gap_ms`` after
    it. So a burst costs a wake-up per step instead of one per event, and after a quiet
    ``gap_ms`` the first event is read at once."""
    if first is None:
        wait = read_at + gap_ms / 1000 - now
        return wait if wait > 0 else None
    until = min(read_at + step_ms / 1000, first + debounce_ms / 1000)
    return max(0.0, until - now)


class FolderWatch(WatchTable):
    """inotify on the sessions root, its groups, sessions and their ``outbox/``."""

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None,
                 poll_rate: float = POLL_RATE, poll_interval: float = POLL_INTERVAL,
                 muted: Container[str] = frozenset(), read_gap_ms: int = 3,
                 keep_seen: bool = False, retiring: Container[str] = frozenset()) -> None:
        self.read_gap_ms = read_gap_ms  # reads at most this often outside a batch
        # session ids retention is taking away (the supervisor's ``retiring``, read
        # here, changed by the loop): their folders' events are dropped as they are
        # read and do not hold a batch open. A prune's removals are a stream of them,
        # and mixed into a live session's batch they kept it open until its debounce
        # (bench/prune.py: such batches were held 19 ms at p50, 50 ms at p99, against
        # 3 ms for the others; issue 26)
        self.retiring = retiring
        self.kept = False  # the last reads kept an event (``_parse``): a batch goes on
        # session ids whose ``.heartbeat`` events are dropped as they are read (owned by
        # the session worker, see ``watcher``): such a touch never opens a batch, so it
        # costs one wake-up and no step of waiting for more
        self.muted = muted
        # heartbeats not even asked for while muted: needs to hear of unmutes (``Muted``)
        self._mutes = muted if isinstance(muted, Muted) else None
        self._unmuted_at = 0.0
        self._unmuted_since: dict[str, float] = {}  # quiet sessions seen unmuted, since
        self.lost: str | None = None
        self._read_at = -1e9  # when events were last read (``read_pause``)
        self._written: set[tuple[int, bytes]] = set()  # writes seen in this batch (``_parse``)
        self._activated: set[str] = set()  # sessions marked active in this batch (``_record``)
        self._names: dict[bytes, str] = {}  # an event's raw name → the name (``_parse``)
        super().__init__(root, limit, poll_rate, poll_interval, keep_seen)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def hear(self, muted: Container[str], retiring: Container[str] = frozenset()) -> None:
        """Take ``muted`` and ``retiring`` now (a watch built before the worker and the
        supervisor that own them: ``head_start``; nothing is muted before the first pass,
        nothing retires before the first sweep)."""
        self.muted = muted
        self.retiring = retiring
        self._mutes = muted if isinstance(muted, Muted) else None

    # --- events -------------------------------------------------------------------------

    def _read(self, changes: set[tuple[Change, str]]) -> bool:
        """Read what is queued into ``changes``; True if anything was read."""
        got = False
        while True:
            try:
                buf = os.read(self.fd, _READ)
            except BlockingIOError:
                return got
            except InterruptedError:
                continue
            if not buf:
                return got
            got = True
            self._read_at = time.monotonic()
            self._parse(buf, changes)
            if len(buf) < _DRAINED:  # the next event would have fitted: none was queued
                return got

    def _parse(self, buf: bytes, changes: set[tuple[Change, str]]) -> None:
        """The events of one read into ``changes``, as cheaply as a busy session allows
        (a commit is a run of ~8 events):

        - in a session folder only the entries the host reads are reported (its
          databases, heartbeat, ``outbox/``, ``inbox/``, and the databases' journals
          for ``commits``: ``SESSION_ENTRIES``); the rest (an agent's scratch files)
          classify as nothing (``layout.classify``) and are skipped here;
        - a muted session's heartbeat is dropped (``_muted_beat``), and so are the
          database writes no pass needs (``DB_WRITES``, ``_needless``);
        - a write is reported once per ``(watch, name)`` and batch (``_written``);
          creations, removals and renames always go the whole way (a folder created
          again is another folder to watch);
        - names are decoded once (``_names``, bounded);
        - a retiring session's events are dropped (``_retiring``).

        ``kept`` says whether anything was read that may hold a batch open: not a
        retiring session's event, nor a watch's own end (``IN_IGNORED``,
        ``IN_DELETE_SELF``: its parent reports the folder by name)."""
        offset = 0
        written, names, paths, retiring = self._written, self._names, self.paths, self.retiring
        size = _HEADER.size
        while offset + size <= len(buf):
            wd, mask, _cookie, length = _HEADER.unpack_from(buf, offset)
            offset += size
            raw = buf[offset:offset + length]
            offset += length
            plain = not mask & _NOT_A_WRITE
            if plain and (wd, raw) in written:
                continue  # (first: most events of a busy session are these)
            if mask & _NOT_NAMED:
                self._unnamed(wd, mask, changes)
                continue
            where = paths.get(wd)
            if where is None or not length:
                continue
            name = names.get(raw) or self._name(raw)
            path, depth = where
            if retiring and self._retiring(path, depth, name, mask):
                continue
            self.kept = True
            if depth == 2 and (name not in SESSION_ENTRIES
                               or name == HEARTBEAT and self._muted_beat(path, wd)
                               or name in DB_WRITES and (plain or name in COMMIT_ENDS)
                               and self._needless(path, name)):
                continue
            if plain:
                written.add((wd, raw))
            self._record(changes, mask, wd, path, depth, name)

    def _retiring(self, path: str, depth: int, name: str, mask: int) -> bool:
        """An event of a session retention is taking away: its folder leaving its
        group (moved out, removed), or anything in its folder or its ``outbox/`` (the
        folder's watch follows it out of the tree and reports its removal file by
        file). Its arrival in a group is kept: a session retention keeps after all is
        moved back, and that folder needs its watch again (``_record``)."""
        if depth == 1:
            return bool(mask & _DEPARTURE) and name in self.retiring
        if depth == 2:
            return path[path.rfind("/") + 1:] in self.retiring
        if depth == 3:
            session = path[:path.rfind("/")]
            return session[session.rfind("/") + 1:] in self.retiring
        return False

    def _unnamed(self, wd: int, mask: int, changes: set[tuple[Change, str]]) -> None:
        """An event about the queue or a watched folder itself."""
        if mask & IN_Q_OVERFLOW:  # a new folder's event may be among the lost: walk again
            self.kept = True
            self.lost = "the kernel's inotify queue overflowed"
            self._rewalk(changes)
        elif mask & IN_IGNORED:  # the folder is gone (or unmounted): so is its watch
            self._forget(wd)
        # (IN_DELETE_SELF, IN_MOVE_SELF: its parent reports it, deleted or renamed, by name)

    def _name(self, raw: bytes) -> str:
        name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if len(self._names) < NAMES_KEPT:
            self._names[raw] = name
        return name

    def _muted_beat(self, session: str, wd: int) -> bool:
        """A heartbeat of a muted session: dropped, but still activity (its outbox/ gets
        a watch); and the next ones are not even asked for (``_quiet``)."""
        sid = session[session.rfind("/") + 1:]
        if sid not in self.muted:
            return False
        if session in self.sessions:
            self._active(session, wd)
            if self._mutes is not None and sid not in self._quieted \
                    and self._set_mask(session, wd, QUIET_MASK):
                self._quieted[sid] = session
        return True

    def _needless(self, session: str, name: str) -> bool:
        """A write to a session's database (or its journal) that no pass needs
        (``DB_WRITES``): inbound.db's of a muted session, outbound.db's of one whose
        queued pass will read it."""
        sid = session[session.rfind("/") + 1:]
        if name[0] == "i":  # inbound.db, inbound.db-journal
            return sid in self.muted
        return self._mutes is not None and sid in self._mutes.reading

    def _unmuted(self, changes: set[tuple[Change, str]]) -> bool:
        """Quiet sessions unmuted for ``UNMUTED_FOR`` s and still unmuted: their
        folder's watch asks for heartbeats again, and a heartbeat is reported for each
        (a touch made while the watch did not ask for it is not lost: the pass it
        causes reads the file). One muted again by then stays quiet (its pass read the
        heartbeat after the unmute). Whether anything was reported."""
        mutes = self._mutes
        if mutes is None or not (self._unmuted_since or mutes.has_left()):
            return False
        now = time.monotonic()
        if now < self._unmuted_at:
            return False
        self._unmuted_at = now + UNMUTED_EVERY
        since = self._unmuted_since
        for sid in mutes.take_left():
            if sid in self._quieted:
                since.setdefault(sid, now)
        found = False
        for sid in [sid for sid, at in since.items() if now - at >= UNMUTED_FOR]:
            del since[sid]
            if sid in mutes:
                continue
            session = self._quieted.pop(sid, None)
            if session is None:
                continue
            wd = self.sessions.get(session)
            if wd is not None:
                self._set_mask(session, wd, MASK)
            changes.add((MODIFIED, f"{session}/{HEARTBEAT}"))
            found = True
        return found

    def _record(self, changes: set[tuple[Change, str]], mask: int, wd: int, path: str,
                depth: int, name: str) -> None:
        change = change_of(mask)
        if change is None or not name:
            return
        changes.add((change, f"{path}/{name}"))
        if change == ADDED and mask & IN_ISDIR and watched_level(depth + 1, name):
            for sub in self._appeared(path, depth, name):
                changes.add((ADDED, sub))
        elif depth == 2 and path not in self._activated and path in self.sessions:
            self._activated.add(path)  # once per batch: a commit is several events
            self._active(path, wd)

    def take_lost(self) -> str | None:
        """Why events were lost since the last call (a queue overflow), or None."""
        lost, self.lost = self.lost, None
        return lost

    def watch(self, *, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: StopEvent | None) -> set[tuple[Change, str]] | str:
        """Wait for changes: a batch ends ``step_ms`` after the
        last change and at most ``debounce_ms`` after the first (one session's batch:
        at once when a commit ends, not before a commit under way ends: ``commits``);
        "timeout" after
        ``timeout_ms`` (0: never) without any; "stop" once ``stop_event`` is set
        (asked once per step, which is what ``watch_health.Gate`` relies on).

        One read per step at most (``read_pause``): a commit is ~8 events (the
        journal's create, writes, close and delete, the database's writes, the
        heartbeat's touch), and a wake-up per event was most of the watch's cost under
        load (each takes the GIL from the loop). What arrives during the pause is read
        at its end in one ``read``; the first event after a quiet step still wakes the
        thread at once. A big batch that keeps growing (a busy host) reads less often
        (``commits.stretch_after``: the step doubles, twice at most)."""
        changes: set[tuple[Change, str]] = set()
        self._written.clear()
        self._activated.clear()
        start = time.monotonic()
        first: float | None = None
        looked = start  # the last look at the queue in this batch
        stretch = 0  # the step's doublings in this batch (``commits.stretch_after``)
        while True:
            if stop_event is not None and stop_event.is_set():
                return "stop"
            pause = read_pause(self.read_gap_ms, step_ms << stretch, debounce_ms, first,
                               self._read_at if first is None else looked, time.monotonic())
            if pause is not None:
                time.sleep(pause)
                ready = True  # (a read of an empty queue is one EAGAIN)
            else:
                wait = max(step_ms, IDLE_WAKE_MS)
                if timeout_ms:
                    wait = min(wait, max(0, timeout_ms - int((time.monotonic() - start) * 1000)))
                try:
                    ready = bool(self._poll.poll(wait))
                except InterruptedError:
                    ready = False
            # a step without anything new ends the batch (only new changes extend it)
            fresh = self._poll_due(changes)
            fresh = self._unmuted(changes) or fresh
            self.kept = False
            fresh = ready and self._read(changes) and self.kept or fresh
            now = looked = time.monotonic()
            if changes:
                first = first if first is not None else now
                if (now - first) * 1000 < debounce_ms:
                    state = commit_state(self.root, changes)
                    stretch = stretch_after(stretch, len(changes), fresh)
                    if (fresh and state != COMMITTED) or state == OPEN:
                        continue  # more may follow within a step, or an open commit's end
            if changes:
                return changes
            if self.lost is not None:
                return set()  # nothing to report but the loss (``take_lost``)
            if timeout_ms and (now - start) * 1000 >= timeout_ms:
                return "timeout"

    # --- lifetime (``close``: ``WatchTable``) -------------------------------------------

    def __enter__(self) -> FolderWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
