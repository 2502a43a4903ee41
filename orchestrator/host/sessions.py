"""Sessions: resolve one for an incoming message, create its folder, write to it.

The three resolution modes decide how conversations share an agent's memory:
``shared`` — one session per messaging group (a chat), ``per-thread`` — one per
chat thread, ``agent-shared`` — one per agent group, whatever the chat.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from loguru import logger

from orchestrator.contract import schema
from orchestrator.contract.layout import (
    INBOUND_DB,
    INBOX,
    OUTBOUND_DB,
    OUTBOX,
    SessionPaths,
    registry_path,
    session_paths,
    sessions_root,
    validate_id,
)
from orchestrator.host import attachments, destinations, inbound
from orchestrator.host.private import DIR_MODE, FILE_MODE, make_dirs
from orchestrator.host.registry import Registry, SessionRow
from orchestrator.host.safefs import SafeDb, SessionDir
from orchestrator.support.errors import StorageError, UserError, storage, storage_error

if TYPE_CHECKING:
    from orchestrator.contract.schema import DbFile

MODES = ("shared", "per-thread", "agent-shared")

# A write from outside the supervisor (``send``, ``answer``, ``POST /v1/messages``)
# waits this long at most for the supervisor's or an agent's lock on inbound.db.
WRITE_BUSY_MS = schema.BUSY_TIMEOUT_MS


class MessageError(UserError, ValueError):
    """A message refused as a whole; one line naming what is wrong and the fix."""


@dataclass(frozen=True, slots=True)
class MessagingGroup:
    channel_type: str
    platform_id: str


def resolution_key(mode: str, agent_group: str, mg_id: str | None, thread: str | None) -> str:
    """The identity of a session under a mode (unique in the registry)."""
    if mode == "agent-shared":
        return f"agent-shared:{agent_group}"
    if mg_id is None:
        raise MessageError(f"mode {mode!r} needs a messaging group "
                           "(a chat: --channel and --platform)")
    if mode == "shared":
        return f"shared:{agent_group}:{mg_id}"
    if mode == "per-thread":
        return f"per-thread:{agent_group}:{mg_id}:{thread or ''}"
    raise MessageError(f"unknown session mode {mode!r}; use one of {', '.join(MODES)}")


def compact_json(value: Any) -> str:
    """Message content as stored: compact (no spaces after ``,`` and ``:``), the shape
    NanoClaw's host writes and its runner's ``LIKE`` patterns expect."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


STAGING_PREFIX = ".new-"  # a dot: layout.classify and the supervisor ignore it


def staging_dir(final: Path) -> Path:
    """Where a session folder is built, beside its final place, under a hidden name."""
    return final.with_name(f"{STAGING_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")


Routing = tuple[str | None, str | None, str | None]  # (channel_type, platform_id, thread_id)


def build_folder(final: Path, routing: Routing | None = None) -> Path:
    """Build a complete session folder (both DBs, ``inbox/``, ``outbox/``) under a
    hidden temporary name beside ``final``; returns that name. Nothing is left
    behind on failure: the one-line StorageError names the folder and the cause.
    ``routing``: the session's default reply route, written with the schema (the
    first wake's ``write_routing`` then finds it there and writes nothing)."""
    with storage(final.parent, "create the agent group folder"):
        make_dirs(final.parent)
    tmp = staging_dir(final)
    try:
        with storage(final.parent, "create a session folder in it"):
            tmp.mkdir(DIR_MODE)
            staged = SessionPaths(tmp)
            staged.inbox.mkdir(DIR_MODE)
            staged.outbox.mkdir(DIR_MODE)
            _new_db(staged.inbound_db, schema.INBOUND_TABLES, schema.INBOUND_EXTRA,
                    None if routing is None else lambda conn: inbound.set_routing(conn, routing))
            _new_db(staged.outbound_db, schema.OUTBOUND_TABLES, schema.OUTBOUND_EXTRA)
            # explicit: mkdir's and SQLite's modes are masked by the umask (0755/0644)
            for path, mode in ((tmp, DIR_MODE), (staged.inbox, DIR_MODE),
                               (staged.outbox, DIR_MODE), (staged.inbound_db, FILE_MODE),
                               (staged.outbound_db, FILE_MODE)):
                os.chmod(path, mode)
            _fsync(tmp)  # its entries, before the rename publishes it
    except BaseException:
        discard(tmp)
        raise
    return tmp


def _new_db(path: Path, tables: dict[str, list[tuple[str, str]]], extra: list[str],
            fill: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """A new DB in a staging folder, written without a rollback journal and synced once.

    Why: nobody can open it before the folder is renamed into place, and a failure
    discards the whole folder, so the journal protects nothing here; with it, each
    DB was a journaled commit of 4 fsyncs (measured: a folder's creation 7.5 → 4.8 ms
    p50 without, on this host's disk). ``journal_mode`` other than WAL is not stored
    in the file: every later connection writes with ``journal_mode=DELETE`` as the
    contract says (``schema.connect``)."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        schema.ensure_schema(conn, tables, extra)
        if fill is not None:
            fill(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


STALE_STAGING = 3600.0  # s: no `send` builds a folder for this long


def remove_stale_staging(entry: os.DirEntry, now: float | None = None) -> bool:
    """Remove a staging folder a killed ``send`` left behind, once surely abandoned.
    Never through a link (``rmtree`` does not follow them; a link itself is unlinked)."""
    try:
        st = entry.stat(follow_symlinks=False)
        if (now if now is not None else time.time()) - st.st_mtime < STALE_STAGING:
            return False
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    except OSError:
        return False
    logger.info("removed {}, a session folder a killed send left half-built", entry.path)
    return True


def create_folder(data_dir: Path, agent_group: str, session_id: str) -> SessionPaths:
    """Make sure a session's folder exists whole; idempotent (upgrades inbound.db).

    A missing folder is built aside and renamed into place, so no reader (the
    supervisor's watcher, an agent) ever sees it half-made. An existing
    outbound.db is left alone: its agent may be running and writing it (one
    writer per file), and every ``send`` comes through here. It is upgraded
    only when no agent runs, just before a wake (``SessionWorker._start``).
    """
    paths = session_paths(data_dir, agent_group, session_id)
    if not os.path.lexists(paths.root):
        tmp = build_folder(paths.root)
        try:
            with storage(paths.root, "create the session folder"):
                os.rename(tmp, paths.root)
        except StorageError:
            discard(tmp)
            if not paths.root.is_dir():  # not a concurrent creation of the same folder
                raise
        return paths
    # the folder is the agent's: reached without following a link, by descriptor
    with storage(paths.root, "open the session folder"), \
            SessionDir(data_dir, agent_group, session_id) as folder:
        for name in (INBOX, OUTBOX):
            try:
                os.mkdir(name, DIR_MODE, dir_fd=folder.fd)
            except FileExistsError:
                pass  # (a link or a file there is refused where it is used)
        inbound.init(folder.db(INBOUND_DB, busy_ms=WRITE_BUSY_MS, create=True))
        if folder.lstat(OUTBOUND_DB) is None:
            schema.init_outbound(folder.db(OUTBOUND_DB, busy_ms=WRITE_BUSY_MS, create=True))
    return paths


@contextmanager
def inbound_of(data_dir: Path, agent_group: str, session_id: str) -> Iterator[SafeDb]:
    """A session's inbound.db for a writer that is not the supervisor: its folder opened
    with ``safefs.SessionDir`` (no link followed, no FIFO opened), waits bounded."""
    with SessionDir(data_dir, agent_group, session_id) as folder:
        yield folder.db(INBOUND_DB, busy_ms=WRITE_BUSY_MS)


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message that passed every check: content as a dict, attachments decoded."""

    content: dict[str, Any]
    files: list[attachments.Decoded]


def prepare_message(content: str | dict[str, Any], max_attachment_bytes: int) -> PreparedMessage:
    """Parse and check a message without touching disk, so that a refused message
    (bad JSON, bad base64, a file too big) leaves nothing behind, not even a session."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except json.JSONDecodeError as exc:
            raise MessageError(f"message content is not valid JSON ({exc.msg} at line "
                               f"{exc.lineno} column {exc.colno}); send a JSON object") from None
    if not isinstance(content, dict):
        raise MessageError("message content must be a JSON object, e.g. {\"text\": \"hi\"}")
    try:  # Python reads NaN and Infinity, JSON has no way to write them: no reader could
        json.dumps(content, allow_nan=False)
    except ValueError:
        raise MessageError("message content holds NaN or Infinity, which JSON cannot "
                           "carry; send finite numbers") from None
    try:
        files = attachments.decode(content.get("attachments", []), max_attachment_bytes)
    except attachments.AttachmentError as exc:
        raise MessageError(str(exc)) from None
    return PreparedMessage(content, files)


class Sessions:
    """Session operations over one data dir and its registry."""

    def __init__(self, data_dir: Path, registry: Registry, max_attachment_bytes: int) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.max_attachment_bytes = max_attachment_bytes
        with storage(sessions_root(data_dir), "create the sessions folder"):
            make_dirs(sessions_root(data_dir))

    def paths(self, session: SessionRow) -> SessionPaths:
        return session_paths(self.data_dir, session.agent_group_id, session.id)

    def resolve(self, agent_group: str, messaging_group: MessagingGroup | None,
                thread: str | None, mode: str) -> SessionRow:
        """The session for a chat under ``mode``, created (row and folder as one) if new.

        The session remembers its chat as its default reply route: ``shared`` the
        chat, ``per-thread`` the chat and thread, ``agent-shared`` none — it serves
        every chat, and a default would send one chat's answers to another. Each
        message keeps its own chat (``write_message``), and replies go back there.
        """
        validate_id(agent_group, "agent group")
        if mode not in MODES:
            raise MessageError(f"unknown session mode {mode!r}; use one of {', '.join(MODES)}")
        if messaging_group is None and mode != "agent-shared":
            raise MessageError(f"mode {mode!r} needs a messaging group "
                           "(a chat: --channel and --platform)")
        chat = (messaging_group.channel_type, messaging_group.platform_id) \
            if messaging_group and mode != "agent-shared" else None
        mg_id = self.registry.find_messaging_group(*chat) if chat else None
        if mg_id is not None or mode == "agent-shared":
            found = self.registry.find_session(resolution_key(mode, agent_group, mg_id, thread))
            if found is not None:
                create_folder(self.data_dir, agent_group, found.id)
                return found
        sid = new_id("sess")
        final = session_paths(self.data_dir, agent_group, sid).root
        # its default route as ``routing_of`` will read it back (no chat: none)
        thread_id = thread if mode == "per-thread" else None
        tmp = build_folder(final, (*chat, thread_id) if chat else (None, None, thread_id))
        try:
            with storage(registry_path(self.data_dir), "record the new session"):
                session, created = self.registry.create_session(
                    agent_group_id=agent_group, chat=chat,
                    thread_id=thread_id,
                    key=lambda mg: resolution_key(mode, agent_group, mg, thread), new_id=sid,
                    place=lambda: os.rename(tmp, final), unplace=lambda: os.rename(final, tmp))
        finally:
            discard(tmp)  # nothing there once renamed into place
        if not created:  # another process made it first
            create_folder(self.data_dir, agent_group, session.id)
        return session

    def prepare(self, content: str | dict[str, Any]) -> PreparedMessage:
        """Check a message before anything is created for it (see ``prepare_message``)."""
        return prepare_message(content, self.max_attachment_bytes)

    def write_message(self, session: SessionRow, content: str | dict[str, Any] | PreparedMessage,
                      *, kind: str = "chat", process_after: datetime | None = None,
                      trigger: int = 1, routing: tuple[str | None, str | None, str | None] = (
                          None, None, None), message_id: str | None = None,
                      recurrence: str | None = None, series_id: str | None = None
                      ) -> tuple[str, int]:
        """Decode attachments into the inbox, then insert the row; all or nothing.

        ``process_after`` is stored in whole seconds, rounded up (see
        ``schema.format_due``). Returns (message id, seq).
        """
        prepared = content if isinstance(content, PreparedMessage) else self.prepare(content)
        mid = validate_id(message_id, "message id") if message_id else new_id("msg")
        paths = self.paths(session)
        files = prepared.files
        stored = dict(prepared.content)
        if files:
            try:
                stored["attachments"] = attachments.write_inbox(paths, mid, files)
            except attachments.AttachmentError as exc:
                raise MessageError(str(exc)) from None
        channel_type, platform_id, thread_id = routing
        try:
            with inbound_of(self.data_dir, session.agent_group_id, session.id) as db:
                # a chat new to the group: its destination is there before the message
                # (in its transaction), so a running agent can answer it (``from`` names it)
                new_chat = bool(channel_type and platform_id and self.registry.record_chat(
                    session.agent_group_id, channel_type, platform_id,
                    thread_id if session.thread_id is not None else None))
                seq = inbound.insert_message(db, inbound.NewMessage(
                    id=mid, kind=kind, content=compact_json(stored),
                    process_after=schema.format_due(process_after) if process_after else None,
                    trigger=trigger, channel_type=channel_type, platform_id=platform_id,
                    thread_id=thread_id, recurrence=recurrence, series_id=series_id),
                    destinations=self._destinations(session, self.routing_of(session))
                    if new_chat else None)
        except sqlite3.IntegrityError:
            if files:  # only what this call wrote: never another message's inbox
                attachments.remove_inbox(paths, mid)
            raise MessageError(f"message id {mid} already exists in session {session.id}; "
                               "use a new id") from None
        except (sqlite3.Error, OSError) as exc:
            if files:
                attachments.remove_inbox(paths, mid)
            raise storage_error(exc, paths.inbound_db, "write the message") from exc
        except BaseException:
            if files:
                attachments.remove_inbox(paths, mid)
            raise
        return mid, seq

    def write_system_response(self, session: SessionRow, question_id: str,
                              selected_option: str, user_id: str = "") -> tuple[str, int]:
        """An answer to an agent's question, in NanoClaw's shape: ``kind='system'``,
        never wakes an agent, compact JSON so that its runner's
        ``content LIKE '%"questionId":"<id>"%'`` finds it."""
        if not isinstance(selected_option, str):
            raise MessageError("a question's answer (selectedOption) must be a string")
        return self.write_message(
            session, {"type": "question_response", "questionId": question_id,
                      "selectedOption": selected_option, "userId": user_id},
            kind="system", trigger=0, routing=self.routing_of(session))

    def write_routing(self, session: SessionRow, inbound_db: DbFile | None = None) -> None:
        """Default reply route + destinations, written before every wake.

        ``inbound_db``: the supervisor passes its ``safefs.SafeDb`` (no link followed,
        no wait on a lock the agent holds)."""
        if inbound_db is None:
            with inbound_of(self.data_dir, session.agent_group_id, session.id) as db:
                self.write_routing(session, db)
            return
        routing = self.routing_of(session)
        inbound.sync_routing(inbound_db, routing, self._destinations(session, routing))

    def write_destinations(self, session: SessionRow, inbound_db: DbFile | None = None) -> None:
        """Every chat of the group plus the hand-set destinations (``destinations``)."""
        if inbound_db is None:
            with inbound_of(self.data_dir, session.agent_group_id, session.id) as db:
                self.write_destinations(session, db)
            return
        inbound.replace_destinations(inbound_db,
                                     self._destinations(session, self.routing_of(session)))

    def _destinations(self, session: SessionRow, routing: tuple[str | None, str | None,
                                                                  str | None]) -> list:
        channel_type, platform_id, thread_id = routing
        own = (destinations.Chat(channel_type, platform_id, thread_id)
               if channel_type and platform_id else None)
        return [d for d, _ in destinations.projected(self.registry, session.agent_group_id, own)]

    def routing_of(self, session: SessionRow) -> tuple[str | None, str | None, str | None]:
        mg = (self.registry.messaging_group(session.messaging_group_id)
              if session.messaging_group_id else None)
        return (mg[0], mg[1], session.thread_id) if mg else (None, None, session.thread_id)

    def mark_container(self, session_id: str, status: str, reason: str,
                       now: datetime | None = None) -> str | None:
        return self.registry.set_container_status(session_id, status, reason, now)
