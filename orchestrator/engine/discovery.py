"""Which sessions the supervisor tracks, as a part of ``Supervisor``.

- the registry's rows and the session folders found on disk (a ``send`` in another
  process, a folder mounted in): tracked, or kept as dormant rows when the last run
  saved them settled (``startup_state``); linked folders refused, said once;
- the start-up reconcile: surviving agents adopted, statuses that outlived the last
  run fixed, the dormant rows checked against the disk, a full pass queued for each
  of the others.

A mixin only to keep ``supervisor.py`` about the loop, the events and the shutdown;
it has no state of its own (``Supervisor.__post_init__`` makes ``rows``, ``retiring``,
``_unreconciled``, ``_index_version``, ``_checked``, ``_refused``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import stat
import sys
import time
from datetime import datetime
from typing import Callable

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.contract.layout import INBOUND_DB, InvalidId, sessions_root, validate_id
from orchestrator.contract.session_status import Status
from orchestrator.engine.ports import Dirty, StatusBook
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.startup_state import StateBook, unchanged
from orchestrator.engine.tracked import Flag, LazyPaths, Tracked, TrackedMap
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import Refused, SessionDir
from orchestrator.host.sessions import STAGING_PREFIX, remove_stale_staging
from orchestrator.runtime.base import Runtime, RuntimeUnavailable
from orchestrator.support.logonce import LogOnce
from orchestrator.watch.head_start import HeadStart

PROGRESS_EVERY = 5.0  # seconds between two progress lines of a long start-up step

FREEZE_FROM = 10_000  # tracked sessions: below it a full collection is a few ms


def settle_heap(sessions: int) -> None:
    """What start-up built (100 000 tracked sessions: ~1 M objects) lives as long as
    the process: moved out of the cyclic garbage collector's reach (``gc.freeze``), so
    that no full collection walks it again (~250 ms each, a pause in every reply that
    meets one). No collection first: that would be the very pause, at start-up; what
    start-up left for garbage is freed by reference counting, not by cycles.

    Then the collector is on again: ``orchestrator run`` turns it off at entry, as
    the collections while 100 000 sessions' rows are read and checked were ~0.18 s
    of a restart's critical path (three full ones of ~35 ms each, ~60 younger ones),
    looking for cycles start-up does not make."""
    if sessions >= FREEZE_FROM:
        gc.freeze()
    gc.enable()


class DiscoveryMixin:
    # Supervisor's, used here (see supervisor.py)
    cfg: Config
    tracked: dict[str, Tracked]
    rows: TrackedMap
    registry: Registry
    runtime: Runtime
    dirty: Dirty
    statuses: StatusBook
    worker: SessionWorker
    book: StateBook
    head_start: HeadStart | None
    clock: Callable[[], datetime]
    ready: asyncio.Event
    retiring: set[str]
    _unreconciled: set[str]
    _index_version: int | None
    _checked: bool
    _refused: LogOnce

    def _track(self, agent_group: str, session_id: str) -> Tracked:
        t = self.tracked.get(session_id)
        if t is None:
            agent_group = sys.intern(agent_group)  # one string per group, not per session
            t = Tracked(agent_group, session_id,
                        LazyPaths(self.cfg.data_dir, agent_group, session_id))
            self.tracked[session_id] = t
        return t

    def _track_from_disk(self, agent_group: str, session_id: str,
                         found: list[str] | None = None) -> bool:
        """A session folder we have not seen: created by ``send`` in another process,
        or mounted in by someone else. Register it if it looks like a session. With
        ``found`` (``_discover``), the registration is appended there and logged at
        DEBUG: the caller says it once with a count."""
        try:
            validate_id(agent_group, "agent group")
            validate_id(session_id, "session id")
        except InvalidId:
            return False
        if session_id in self.retiring:
            return False
        row = self.registry.session(session_id)
        if row is None:
            if not self._real_session_folder(agent_group, session_id):
                return False
            row, created = self.registry.adopt_folder(agent_group, session_id)
            if created:  # not a `send` that was committing it just then
                where = f"{agent_group}/{session_id}"
                if found is None:
                    logger.info("registered session folder {} found on disk", where)
                else:
                    found.append(where)
                    logger.debug("registered session folder {} found on disk", where)
        if row.agent_group_id != agent_group:
            return False
        t = self._track(agent_group, session_id)
        t.status = Status(row.container_status)
        self.dirty.mark(session_id, Flag.FULL)
        return True

    def _real_session_folder(self, agent_group: str, session_id: str) -> bool:
        """A folder reached without following a link, holding a regular inbound.db.
        A linked one is refused, logged once, and never registered."""
        try:
            with SessionDir(self.cfg.data_dir, agent_group, session_id) as folder:
                st = folder.lstat(INBOUND_DB)
                return st is not None and stat.S_ISREG(st.st_mode)
        except Refused as exc:
            self._refuse(agent_group, session_id, exc.strerror or str(exc))
            return False
        except OSError:
            return False

    def _refuse(self, agent_group: str, session_id: str | None, why: str) -> None:
        if self._refused.say((agent_group, session_id), "refused"):
            logger.warning("{}; leaving it alone", why)

    def _discover(self, at_start: bool = False, folders: bool = True) -> None:
        """Track the registry's sessions and the folders found on disk (``folders``)
        that are not tracked yet. ``at_start``: a session the last run saved as settled
        (``startup_state``) is kept as a dormant row, unchecked and unmarked, for
        ``_reconcile_at_start`` to check against the disk; and the registry is read
        again only if another process wrote it since the last read (its
        ``data_version``: 100 000 rows are ~0.2 s; this process's own new sessions
        are tracked as they are made, or found by their folders)."""
        version = self.registry.data_version()
        if not (at_start and version == self._index_version):
            self._index_version = version
            self._track_index(self.book.saved if at_start else {})
        if folders:
            listed = self.head_start.listed() if at_start and self.head_start else {}
            self._register_found(self._unseen_folders(listed))

    def _track_index(self, saved: dict[str, str]) -> None:
        """(100 000 rows: no call per row but what is needed; one string per group. A
        saved row is checked against the disk later: here it stands for the disk, and
        ``start_pass_reason(row, row, False, status)`` is None exactly when the status
        is ``stopped``, compared inline.)"""
        live, dormant, retiring = self.tracked.keys(), self.rows.dormant, self.retiring
        groups: dict[str, str] = {}
        stopped = Status.STOPPED.value
        for session_id, agent_group, container_status in self.registry.session_index():
            if session_id in live or session_id in dormant or session_id in retiring:
                continue
            row = saved.get(session_id)
            if row is not None and container_status == stopped:
                group = groups.get(agent_group)
                if group is None:
                    group = groups[agent_group] = sys.intern(agent_group)
                dormant[session_id] = (group, row)  # (``TrackedMap.rest``)
                continue
            t = self._track(agent_group, session_id)
            t.status = Status(container_status)
            self.dirty.mark(session_id, Flag.FULL)

    def _unseen_folders(self, listed: dict[str, list[str]] | None = None
                        ) -> list[tuple[str, str]]:
        """(group, session) of the folders on disk not tracked yet; listed before any is
        registered, so that progress can say "of how many". ``listed``: a group's names
        as the start-up walk's child listed them once the group was watched
        (``HeadStart.listed``), used instead of listing it again (100 000 sessions:
        ~0.15 s of a restart's critical path); not where a ``send`` left a staging
        folder (removed here, which needs the listing's entry)."""
        root = sessions_root(self.cfg.data_dir)
        try:
            groups = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
                      or e.is_symlink()]
        except OSError:
            return []
        unseen: list[tuple[str, str]] = []
        live, dormant = self.tracked.keys(), self.rows.dormant  # (no call per name)
        for g in groups:
            if g.is_symlink():  # never listed through: refused, said once
                self._refuse(g.name, None, f"sessions/{g.name} is a symlink")
                continue
            names = (listed or {}).get(g.name)
            if names is not None and not any(n.startswith(STAGING_PREFIX) for n in names):
                group = g.name
                unseen += [(group, n) for n in names if n not in dormant and n not in live]
                continue
            try:
                for s in os.scandir(g.path):
                    if s.name.startswith(STAGING_PREFIX):
                        remove_stale_staging(s)  # left by a `send` killed mid-build
                    elif s.name not in dormant and s.name not in live and (
                            s.is_dir(follow_symlinks=False) or s.is_symlink()):
                        unseen.append((g.name, s.name))
            except OSError:
                continue
        return unseen

    def _register_found(self, unseen: list[tuple[str, str]]) -> None:
        """Register each as found on disk: one INFO line with the count (each one at
        DEBUG), and progress every few seconds on a long start-up."""
        found: list[str] = []
        said = time.monotonic()
        for n, (group, sid) in enumerate(unseen, 1):
            if sid not in self.tracked:
                self._track_from_disk(group, sid, found)
            if time.monotonic() - said >= PROGRESS_EVERY and n < len(unseen):
                said = time.monotonic()
                logger.info("checking session folders found on disk: {} of {}", n, len(unseen))
        if len(found) == 1:
            logger.info("registered session folder {} found on disk", found[0])
        elif found:
            logger.info("registered {} session folders found on disk (each at DEBUG)",
                        len(found))

    async def _reconcile_at_start(self) -> None:
        """Adopt surviving agents, fix statuses that outlived us, queue a full pass each."""
        try:
            adopted = {h.session_id: h for h in await self.runtime.recover()}
            self.worker.egress.keep_only(set(adopted))  # tokens of agents gone meanwhile
            unknown = None
        except Exception as exc:  # noqa: BLE001 - e.g. Docker down: adopt when it is back
            if not (isinstance(exc, RuntimeUnavailable) and exc.reported):  # said once already
                logger.error("could not list existing agents: {}", exc)
            logger.info("agents from before the restart are adopted once the runtime "
                        "answers; their claims are kept until then")
            adopted, unknown = {}, "runtime unavailable at start-up"
        self._discover(at_start=True)
        now = self.clock()
        for sid in adopted.keys() & self.rows.dormant.keys():
            self._wake_unrestored(sid)  # its agent survived: a full pass, as a new one
        for sid, t in list(self.tracked.items()):  # the awake ones: no dormant row is
            if sid in adopted:  # adopted or other than stopped (``_discover``)
                t.started_at = now
                self.statuses.set(t, Status.RUNNING, "adopted after restart", now)
            elif t.status != Status.STOPPED:
                self.statuses.set(t, Status.STOPPED, unknown or "no agent found at start-up",
                                       now)
        skipped = self._skip_unchanged()
        self._unreconciled = set(self.tracked.keys())
        for sid in self._unreconciled:
            # (``_discover``'s FULL mark goes into it: an event from now on comes first)
            self.dirty.queue_backlog(sid, self.dirty.flags.pop(sid, Flag.NONE)
                                     | Flag.FULL | Flag.FORCE)
        if not self._unreconciled:
            self.ready.set()
        settle_heap(len(self.tracked))
        logger.info("orchestrator up: {} sessions ({} unchanged since the last run), {} adopted "
                    "agents, runtime {}, data {}", len(self.tracked), len(skipped), len(adopted),
                    self.runtime.name, self.cfg.data_dir)

    def _skip_unchanged(self) -> set[str]:
        """The sessions whose start-up pass can be skipped (``startup_state``): settled
        when the last run saved them (dormant rows), and nothing on disk changed since;
        the others wake for their full pass. Runs after the watch is up, with no
        ``await`` from the check to the end: a later change has its event. An earlier
        event's mark goes: its change was seen by the check. Except where the check
        used the ``lstat`` the watch built ahead took after adding the folder's watch
        (``head_start``): there a mark may be a later change's, and it stays (a pass)."""
        dormant = self.rows.dormant
        seen = self.head_start.seen() if self.head_start is not None else {}
        moved, fresh = unchanged(self.cfg.data_dir, dormant, seen)
        for sid in moved:
            self._wake_unrestored(sid)
        for sid, row in fresh.items():  # unchanged; saved with the stamp seen now
            dormant[sid] = (dormant[sid][0], row)
            self.book.refresh(sid, row)
        for sid in dormant.keys() & self.dirty.flags.keys():
            group = seen.get(dormant[sid][0])
            if group is None or sid not in group[1]:
                self.dirty.drop(sid)
        self._checked = True
        return set(dormant)

    def _wake_unrestored(self, session_id: str) -> Tracked:
        """A dormant session as a new ``Tracked`` (nothing read yet, stopped): one that
        changed on disk or whose agent was adopted gets its full pass from scratch."""
        group, _ = self.rows.dormant.pop(session_id)
        return self._track(group, session_id)
