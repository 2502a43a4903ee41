"""Sessions: resolve one for an incoming message, create its folder, write to it.

The three resolution modes decide how conversations share an agent's memory:
``shared`` — one session per messaging group (a chat), ``per-thread`` — one per
chat thread, ``agent-shared`` — one per agent group, whatever the chat.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator import attachments, destinations
from orchestrator.layout import SessionPaths, session_paths, sessions_root, validate_id
from orchestrator.store import inbound, schema
from orchestrator.store.registry import Registry, SessionRow

MODES = ("shared", "per-thread", "agent-shared")


class MessageError(ValueError):
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
        raise ValueError(f"mode {mode!r} needs a messaging group (--channel/--platform)")
    if mode == "shared":
        return f"shared:{agent_group}:{mg_id}"
    if mode == "per-thread":
        return f"per-thread:{agent_group}:{mg_id}:{thread or ''}"
    raise ValueError(f"unknown session mode {mode!r}; use one of {', '.join(MODES)}")


def compact_json(value: Any) -> str:
    """Message content as stored: compact (no spaces after ``,`` and ``:``), the shape
    NanoClaw's host writes and its runner's ``LIKE`` patterns expect."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def create_folder(data_dir: Path, agent_group: str, session_id: str) -> SessionPaths:
    """Folder, ``inbox/``, ``outbox/`` and both DBs; idempotent (upgrades inbound.db).

    An existing outbound.db is left alone: its agent may be running and writing it
    (one writer per file), and every ``send`` comes through here. It is upgraded
    only when no agent runs, just before a wake (``SessionWorker._start``).
    """
    paths = session_paths(data_dir, agent_group, session_id)
    for d in (paths.root, paths.inbox, paths.outbox):
        d.mkdir(parents=True, exist_ok=True)
    inbound.init(paths.inbound_db)
    if not os.path.lexists(paths.outbound_db):
        schema.init_outbound(paths.outbound_db)
    return paths


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
        sessions_root(data_dir).mkdir(parents=True, exist_ok=True)

    def paths(self, session: SessionRow) -> SessionPaths:
        return session_paths(self.data_dir, session.agent_group_id, session.id)

    def resolve(self, agent_group: str, messaging_group: MessagingGroup | None,
                thread: str | None, mode: str) -> SessionRow:
        validate_id(agent_group, "agent group")
        self.registry.ensure_agent_group(agent_group)
        mg_id = (self.registry.ensure_messaging_group(messaging_group.channel_type,
                                                      messaging_group.platform_id)
                 if messaging_group else None)
        key = resolution_key(mode, agent_group, mg_id, thread)
        session, _ = self.registry.get_or_create_session(
            resolution_key=key, agent_group_id=agent_group,
            messaging_group_id=None if mode == "agent-shared" else mg_id,
            thread_id=thread if mode == "per-thread" else None, new_id=new_id("sess"))
        create_folder(self.data_dir, agent_group, session.id)
        return session

    def prepare(self, content: str | dict[str, Any]) -> PreparedMessage:
        """Check a message before anything is created for it (see ``prepare_message``)."""
        return prepare_message(content, self.max_attachment_bytes)

    def write_message(self, session: SessionRow, content: str | dict[str, Any] | PreparedMessage,
                      *, kind: str = "chat", process_after: datetime | None = None,
                      trigger: int = 1, routing: tuple[str | None, str | None, str | None] = (
                          None, None, None), message_id: str | None = None) -> tuple[str, int]:
        """Decode attachments into the inbox, then insert the row; all or nothing.

        Returns (message id, seq).
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
            if channel_type and platform_id and self.registry.record_chat(
                    session.agent_group_id, channel_type, platform_id,
                    thread_id if session.thread_id is not None else None):
                # a chat new to the group: its destination is there before the message,
                # so a running agent can answer it (``from`` names it)
                self.write_destinations(session)
            seq = inbound.insert_message(paths.inbound_db, inbound.NewMessage(
                id=mid, kind=kind, content=compact_json(stored),
                process_after=schema.format_due(process_after) if process_after else None,
                trigger=trigger, channel_type=channel_type, platform_id=platform_id,
                thread_id=thread_id))
        except sqlite3.IntegrityError:
            if files:  # only what this call wrote: never another message's inbox
                attachments.remove_inbox(paths, mid)
            raise MessageError(f"message id {mid} already exists in session {session.id}; "
                               "use a new id") from None
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

    def write_routing(self, session: SessionRow) -> None:
        """Default reply route + destinations, written before every wake."""
        paths = self.paths(session)
        inbound.write_routing(paths.inbound_db, *self.routing_of(session))
        self.write_destinations(session)

    def write_destinations(self, session: SessionRow) -> None:
        """Every chat of the group plus the hand-set destinations (``destinations``)."""
        channel_type, platform_id, thread_id = self.routing_of(session)
        own = (destinations.Chat(channel_type, platform_id, thread_id)
               if channel_type and platform_id else None)
        chats = [destinations.Chat(*c) for c in self.registry.group_chats(session.agent_group_id)]
        inbound.replace_destinations(self.paths(session).inbound_db, destinations.project(
            chats, self.registry.destinations(session.agent_group_id), own))

    def routing_of(self, session: SessionRow) -> tuple[str | None, str | None, str | None]:
        mg = (self.registry.messaging_group(session.messaging_group_id)
              if session.messaging_group_id else None)
        return (mg[0], mg[1], session.thread_id) if mg else (None, None, session.thread_id)

    def mark_container(self, session_id: str, status: str, reason: str,
                       now: datetime | None = None) -> str | None:
        return self.registry.set_container_status(session_id, status, reason, now)
