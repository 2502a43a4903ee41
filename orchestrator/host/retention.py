"""Archiving, deleting and restoring one session, crash-safe (issue 26.1).

A removal is a journal row first (``host.removals.begin``: the session's registry rows
move into it in one transaction), then idempotent steps on the files:

1. ``sessions/<group>/<id>`` is renamed to ``<data_dir>/.removing/<id>`` (one atomic
   rename: the folder leaves the live tree whole, no watcher or pass sees half of it);
2. (archive) the moved folder and the rows are written to
   ``<archive_dir>/<group>/<id>.tar.gz`` (``host.session_archive``: complete or absent);
3. the moved folder is removed a bounded step at a time (``treeremove``: never follows
   a link, any depth);
4. the journal row goes (``removals.finish``), with the session's idempotency keys.

The registry steps (``Retention.begin``: the journal rows of a batch in one
transaction; ``Retention.end``: rows back for the kept, journal rows of the done gone,
one transaction) and the file steps (``FileSteps.run``: never opens the registry) are
apart, so the engine runs the file steps in its niced worker process and keeps every
registry write in its own process (``engine.retention``).

``recover`` (at every start, and before a CLI removal) looks at each journal row left by
a crash: a delete whose folder was moved, or an archive whose file is complete, is
finished; anything earlier is undone (folder moved back, rows put back). So a SIGKILL
at any point loses nothing and leaves no half-removed session.

What may be removed is decided by ``rules.retention`` on facts read here
(``read_facts``: pending inbound messages, replies not settled) from the *moved*
folder, i.e. after the session stopped being visible: a message cannot slip in between
the check and the removal. If the check says keep, the removal is undone at once.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from orchestrator.config.sections import RetentionConfig
from orchestrator.contract.layout import (
    INBOUND_DB,
    OUTBOUND_DB,
    delivered_root,
    session_dir,
    validate_id,
)
from orchestrator.contract.schema import parse_ts
from orchestrator.host import removals, session_archive
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import open_dir
from orchestrator.host.sessions import STAGING_PREFIX
from orchestrator.host.treeremove import remove_tree
from orchestrator.rules import retention as rules
from orchestrator.support.errors import UserError

REMOVING = ".removing"  # <data_dir>/.removing/<id>: folders on their way out
STEP_BUDGET = 2000  # tree-removal operations per step (treeremove)


class RetentionError(UserError):
    """One line, exit code 2 (CLI) or 409/404 (API)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    session_id: str
    action: str  # "archived" | "deleted" | "kept" | "missing"
    reason: str | None = None
    archive: str | None = None


def archive_dir(data_dir: Path, cfg: RetentionConfig) -> Path:
    return data_dir / (cfg.archive_dir or "archive")


@dataclass(frozen=True, slots=True)
class Item:
    """One removal asked for: by the sweep (``periodic``, with its group's ``settings``:
    (archive_after, delete_after)) or by hand (``force``)."""

    session_id: str
    action: rules.Action
    running: bool = False
    force: bool = False
    periodic: bool = False
    settings: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Work:
    """One begun removal handed to the file steps (``FileSteps.run``): picklable, so
    the engine's worker process can take it."""

    item: Item
    pending: removals.Pending


def remove_files(data_dir: Path, cfg: RetentionConfig, work: list[Work]) -> list[str | None]:
    """``FileSteps.run``: what the engine's retention worker process runs
    (``engine.retention``), so that the sweep's CPU work never competes with the event
    loop for the interpreter lock. It never opens the registry: the journal's
    transactions stay in the orchestrator's process (see ``Retention.remove_many``)."""
    return FileSteps(data_dir, cfg).run(work)


class FileSteps:
    """The removal steps on files only (move out, facts, archive, tree removal): no
    registry, so they can run in a process of their own."""

    def __init__(self, data_dir: Path, cfg: RetentionConfig) -> None:
        self.data_dir = data_dir
        self.archives = archive_dir(data_dir, cfg)
        self.removing = data_dir / REMOVING

    def run(self, work: list[Work]) -> list[str | None]:
        """The file steps of begun removals, their slow steps shared: the archives of
        the batch are written, then synced (the file system's journal commits them
        together), then renamed to their final names; the moved folders are removed.
        Per removal: None (done: its journal row may go) or why it was kept (its folder
        is back in place: its rows must go back, ``removals.undo``)."""
        out: list[str | None] = []
        started: list[tuple[Item, removals.Pending, Path]] = []
        for w in work:
            moved = self._move_out(w.pending)
            refusal = self._refusal(w.item, w.pending, moved)
            if refusal is not None:
                self._undo_files(w.pending)
                out.append(refusal.reason)
                continue
            out.append(None)
            started.append((w.item, w.pending, moved))
        parts = []
        for item, p, moved in started:
            if item.action is rules.Action.ARCHIVE:
                dest = session_archive.archive_path(self.archives, p.agent_group_id,
                                                    p.session_id)
                parts.append((self._archive(moved, dest, p.rows), dest))
        session_archive.commit(parts)  # synced, then renamed: complete or absent
        for _, p, _ in started:
            self._remove_moved(p.session_id)
        return out

    @staticmethod
    def _refusal(item: Item, p: removals.Pending, moved: Path) -> rules.Refusal | None:
        facts = read_facts(moved, item.running, idle_seconds(p.rows, time.time()))
        if item.periodic:
            keep = rules.due(facts, *item.settings) is rules.Action.KEEP
            return rules.Refusal("not due any more") if keep else None
        return rules.by_hand(facts, force=item.force)

    def _move_out(self, p: removals.Pending) -> Path:
        src = session_dir(self.data_dir, p.agent_group_id, p.session_id)
        dest = self.removing / p.session_id
        self.removing.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            pass  # moved already (a resumed removal), or a session without a folder
        return dest

    def _archive(self, moved: Path, dest: Path, rows: dict) -> Path:
        """The archive written as ``<dest>.part`` (not synced yet); returns that path."""
        try:
            fd = open_dir(str(moved), None, str(moved))  # never through a link
        except FileNotFoundError:  # no folder: the archive holds the rows only
            fd = os.open(_empty_dir(self.removing), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return session_archive.write_part(fd, dest, rows)[0]
        finally:
            os.close(fd)

    def _remove_moved(self, session_id: str) -> None:
        if not self.removing.exists():
            return
        fd = os.open(self.removing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                r = remove_tree(fd, session_id, STEP_BUDGET)
                if r.done:
                    return
                if r.stuck:
                    raise OSError(f"{self.removing / session_id}: cannot remove ({r.stuck})")
        finally:
            os.close(fd)

    def _undo_files(self, p: removals.Pending) -> None:
        """The folder back in place, a half-written archive gone (the rows: the
        caller's, ``removals.undo``)."""
        moved = self.removing / p.session_id
        final = session_dir(self.data_dir, p.agent_group_id, p.session_id)
        if moved.exists() and not os.path.lexists(final):
            os.rename(moved, final)
        part = session_archive.archive_path(self.archives, p.agent_group_id, p.session_id)
        part = part.with_name(part.name + ".part")
        if part.exists():
            part.unlink()


class Retention(FileSteps):
    """The removal steps over one data dir with its registry; thread-safe as the
    registry is (each step is its own transaction), so the engine runs the journal's
    steps in a thread and the file steps in its worker process."""

    def __init__(self, data_dir: Path, registry: Registry, cfg: RetentionConfig) -> None:
        super().__init__(data_dir, cfg)
        self.registry = registry

    # --- removals ---------------------------------------------------------------------

    def remove(self, session_id: str, action: rules.Action, *, running: bool = False,
               force: bool = False, periodic: bool = False, settings: tuple[float, float]
               = (0.0, 0.0)) -> Outcome:
        """Archive or delete one session, or keep it (the rules say why). ``periodic``:
        the sweep's decision (``rules.due`` with ``settings`` = (archive_after,
        delete_after)); otherwise a removal by hand (``rules.by_hand``)."""
        return self.remove_many([Item(session_id, action, running, force, periodic,
                                      settings)])[0]

    def remove_many(self, items: list[Item]) -> list[Outcome]:
        """Several removals in three steps, which the engine runs apart: ``begin``
        (the journal rows, one transaction), the file steps (``FileSteps.run``; the
        engine's worker process), ``end`` (rows back for the kept ones, the journal
        rows of the done ones gone: one transaction)."""
        work, out = self.begin(items)
        return self.end(items, work, self.run(work), out)

    def begin(self, items: list[Item]) -> tuple[list[Work], dict[str, Outcome]]:
        """The journal rows of a batch in one registry transaction: the removals to
        carry out, and the outcome of those that cannot start (no such session)."""
        for item in items:
            validate_id(item.session_id, "session id")
        begun = removals.begin_many(self.registry, [(i.session_id, i.action.value)
                                                    for i in items])
        work, out = [], {}
        for item, p in zip(items, begun, strict=True):
            if p is None:
                out[item.session_id] = Outcome(item.session_id, "missing", "no such session")
            else:
                work.append(Work(item, p))
        return work, out

    def end(self, items: list[Item], work: list[Work], kept: list[str | None],
            out: dict[str, Outcome]) -> list[Outcome]:
        """After the file steps: a kept session's rows go back, the done ones' journal
        rows go (the last step of a removal); the outcomes in ``items``' order."""
        for w, reason in zip(work, kept, strict=True):
            if reason is not None:
                removals.undo(self.registry, w.pending)
                out[w.item.session_id] = Outcome(w.item.session_id, "kept", reason)
        done = [w for w, reason in zip(work, kept, strict=True) if reason is None]
        if done:  # (an empty one would still take the registry's write lock)
            removals.finish(self.registry, [w.pending.session_id for w in done])
        for w in done:
            archived = w.item.action is rules.Action.ARCHIVE
            where = session_archive.archive_path(self.archives, w.pending.agent_group_id,
                                                 w.pending.session_id) if archived else None
            out[w.item.session_id] = Outcome(w.item.session_id,
                                             "archived" if archived else "deleted",
                                             archive=str(where) if where else None)
        return [out[item.session_id] for item in items]

    def _undo(self, p: removals.Pending) -> None:
        self._undo_files(p)
        removals.undo(self.registry, p)

    # --- after a crash ---------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Finish or undo every removal a crash cut short: (finished, undone)."""
        finished = undone = 0
        for p in removals.pending(self.registry):
            final = session_dir(self.data_dir, p.agent_group_id, p.session_id)
            archive = session_archive.archive_path(self.archives, p.agent_group_id,
                                                   p.session_id)
            moved_away = not os.path.lexists(final)
            if (p.action == "archive" and archive.exists()) or (
                    p.action == "delete" and moved_away):
                self._remove_moved(p.session_id)
                removals.finish(self.registry, [p.session_id])
                finished += 1
            else:
                self._undo(p)
                undone += 1
        if finished or undone:
            logger.info("retention: {} removals cut short finished, {} undone", finished,
                        undone)
        return finished, undone

    # --- restore -----------------------------------------------------------------------

    def find_archive(self, session_id: str) -> Path | None:
        validate_id(session_id, "session id")
        if not self.archives.is_dir():
            return None
        for group in sorted(os.scandir(self.archives), key=lambda e: e.name):
            if group.is_dir(follow_symlinks=False):
                path = Path(group.path) / f"{session_id}{session_archive.SUFFIX}"
                if path.is_file():
                    return path
        return None

    def restore(self, session_id: str) -> Outcome:
        """Put an archived session back: folder and registry rows; the archive goes last.
        Idempotent: a restore cut short is run again."""
        archive = self.find_archive(session_id)
        if archive is None:
            raise RetentionError(f"no archive of session {session_id!r} under "
                                 f"{self.archives}")
        rows = session_archive.read_rows(archive)
        group = rows["sessions"][0]["agent_group_id"]
        final = session_dir(self.data_dir, group, session_id)
        if os.path.lexists(final):
            raise RetentionError(f"session {session_id!r} already has a folder ({final}); "
                                 "it was restored already")
        staging = final.with_name(f"{STAGING_PREFIX}{session_id}-{uuid.uuid4().hex[:8]}")
        try:
            folder, refused = session_archive.extract_folder(archive, staging)
            if not folder.is_dir():
                folder.mkdir(mode=0o700)
            removals.restore_rows(self.registry, rows)  # rows first: the watcher then
            os.rename(folder, final)  # finds a folder it knows
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        archive.unlink()
        if refused:
            logger.warning("restore {}: {} archive entries refused (links out of the "
                           "folder)", session_id, refused)
        return Outcome(session_id, "restored", archive=str(archive))


def _empty_dir(parent: Path) -> Path:
    empty = parent / ".empty"
    empty.mkdir(mode=0o700, exist_ok=True)
    return empty


def idle_seconds(rows: dict, now: float) -> float:
    """Seconds since the session's last activity: the newest of last_active,
    last_heartbeat and created_at of its registry row."""
    s = rows["sessions"][0] if rows.get("sessions") else {}
    times = [t for t in (parse_ts(s.get(k)) for k in ("last_active", "last_heartbeat",
                                                        "created_at")) if t is not None]
    return now - max(t.timestamp() for t in times) if times else float("inf")


def read_facts(folder: Path, running: bool, idle: float) -> rules.Facts:
    """Pending inbound messages and unsettled replies, read from a folder no agent can
    reach (moved out, or the orchestrator holds it). A database that cannot be read
    counts as work (never removed without --force)."""
    pending = undelivered = 0
    inbound_db, outbound_db = folder / INBOUND_DB, folder / OUTBOUND_DB
    delivered: set[str] = set()
    try:
        if _regular(inbound_db):
            with _ro(inbound_db) as conn:
                pending = conn.execute(
                    "SELECT COUNT(*) FROM messages_in WHERE status IN ('pending', 'paused')"
                    " AND kind != 'system'").fetchone()[0]
                delivered = {r[0] for r in conn.execute(
                    "SELECT message_out_id FROM delivered")}
        if _regular(outbound_db):
            with _ro(outbound_db) as conn:
                out = {r[0] for r in conn.execute("SELECT id FROM messages_out")}
            undelivered = len(out - delivered)
    except sqlite3.Error:
        pending = max(pending, 1)
    return rules.Facts(running, pending, undelivered, idle)


def _regular(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode)


class _ro:
    """A read-only connection, closed on exit (``with sqlite3.connect`` only commits)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


# --- delivered reply files -----------------------------------------------------------

def prune_delivered(data_dir: Path, max_age: float, now: float | None = None,
                    limit: int = 1000) -> int:
    """Remove ``delivered/<id>/`` folders older than ``max_age`` seconds (by mtime), at
    most ``limit`` per call; returns how many went."""
    if max_age <= 0:
        return 0
    root = delivered_root(data_dir)
    cutoff = (now if now is not None else time.time()) - max_age
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    try:
        with os.scandir(fd) as it:
            old = [e.name for e in it
                   if e.stat(follow_symlinks=False).st_mtime < cutoff]
        for name in old[:limit]:
            while not (r := remove_tree(fd, name, STEP_BUDGET)).done:
                if r.stuck:
                    logger.warning("delivered/{}: cannot remove ({})", name, r.stuck)
                    break
            removed += r.done
    finally:
        os.close(fd)
    return removed
