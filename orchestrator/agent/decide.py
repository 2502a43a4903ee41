"""The agent's decisions as pure functions: which rows to work on, which seq to
use, what an inbound message says and what the reply says.

Kept free of I/O so every rule of the contract the agent depends on can be
tested with plain tables (see tests/test_agent.py) instead of processes and
sleeps. Stdlib-only: this runs inside a container that has nothing but python3.
"""

from __future__ import annotations

import os
from collections import namedtuple

from orchestrator.agent import jsontext
from orchestrator.contract import schema

TYPE_CHECKING = False  # no typing / dataclasses at run time: they are ~8 ms of a cold start
if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import PurePosixPath
    from typing import Any, Iterable, Mapping


class MalformedContent(ValueError):
    """Inbound ``content`` the agent cannot understand; the message is acked 'failed'."""


class Attachment(namedtuple("Attachment", "name path")):
    """One file the host decoded into ``inbox/``: ``path`` is workspace-relative."""

    __slots__ = ()
    name: str
    path: str


class Inbound(namedtuple("Inbound", "text attachments", defaults=((),))):
    """What the agent understood of an inbound message's content."""

    __slots__ = ()
    text: str
    attachments: tuple[Attachment, ...]


# --- which rows -------------------------------------------------------------


def is_due(process_after: str | None, now: datetime) -> bool:
    """True when a row may be processed at ``now`` (an aware UTC datetime).

    ``process_after`` is parsed as UTC even without a zone marker (SQLite's
    ``datetime('now')`` shape). A value that cannot be parsed counts as due:
    an unreadable timestamp must not block the session's queue forever, and the
    host would otherwise keep waking an agent that never does anything.
    """
    try:
        when = schema.parse_ts(process_after)
    except (ValueError, TypeError):
        return True
    return when is None or when <= now


def select_work(
    rows: Iterable[Mapping[str, Any]], acked: set[str] | frozenset[str], now: datetime
) -> list[Mapping[str, Any]]:
    """The rows to handle now, in ``seq`` order.

    Pending, not ``system``, due, and not already in ``processing_ack`` with
    any status (an ack means this agent or a predecessor already owns it; the
    host turns acks into ``messages_in.status`` in its own time).
    """
    picked = [
        row
        for row in rows
        if row["status"] == "pending"
        and row["kind"] != "system"
        and row["id"] not in acked
        and is_due(row["process_after"], now)
    ]
    return sorted(picked, key=lambda row: (row["seq"] is None, row["seq"] or 0))


def next_due(rows: Iterable[Mapping[str, Any]], acked: set[str] | frozenset[str],
             now: datetime) -> datetime | None:
    """The soonest ``process_after`` still in the future among pending, unacked rows:
    when an agent that sleeps on inotify must look again by itself (no write wakes it)."""
    soonest = None
    for row in rows:
        if row["id"] in acked or row["status"] != "pending" or row["kind"] == "system":
            continue
        try:
            when = schema.parse_ts(row["process_after"])
        except (ValueError, TypeError):
            continue
        if when is not None and when > now and (soonest is None or when < soonest):
            soonest = when
    return soonest


def next_odd_seq(*maxima: int | None) -> int:
    """The next odd seq above every given maximum (None = empty table).

    The host numbers ``messages_in`` with even seqs, the agent ``messages_out``
    with odd ones, so seq stays unique across both tables of a session.
    """
    top = max((m for m in maxima if m is not None), default=0)
    top = max(top, 0)
    return top + 1 if top % 2 == 0 else top + 2


def new_out_id() -> str:
    """A fresh outbound message id; it names ``outbox/<id>/`` so it must be a safe id."""
    return "out-" + os.urandom(16).hex()  # uuid4().hex's shape, without importing uuid
    # (and platform) at every agent start; a safe id (layout.validate_id: test_agent)


# --- when to look -------------------------------------------------------------

# inotify masks (``contract.inotify``'s values; not imported from there: it imports
# ``select`` and ``struct``, which a cold start defers until its reply is written)
IN_MODIFY = 0x00000002
IN_DELETE = 0x00000200
_LOST = 0x00004000 | 0x00008000 | 0x00000400 | 0x00000800  # overflow, ignored, self gone
INBOUND_DB = "inbound.db"
INBOUND_JOURNAL = INBOUND_DB + "-journal"


def commit_ended(mask: int, name: str) -> bool:
    """Whether one inotify event of the session folder says a write of inbound.db is
    over, so a look now finds whatever it committed.

    The host writes with ``journal_mode=DELETE`` and open-write-close (contract §2):
    a commit creates ``inbound.db-journal``, writes it, modifies ``inbound.db`` and
    deletes the journal, then the host closes the file. A look at the journal's
    creation or at a modification of the database comes too early: it finds the old
    rows, or the host's exclusive lock, and SQLite's busy handler sleeps 1 ms and up
    before it reads (issue 28: the warm round trip). So those events are slept
    through; the journal's deletion, the database's close after writing, its
    creation or replacement, and losing track (an overflow, the folder gone) wake.
    """
    if mask & _LOST:
        return True
    if name == INBOUND_JOURNAL:
        return bool(mask & IN_DELETE)
    if name == INBOUND_DB:
        return not mask & IN_MODIFY
    return False


# --- what the message says --------------------------------------------------


def safe_file_name(name: object) -> str | None:
    """``name`` if it can be one file name inside ``outbox/<id>/``, else None.

    Refuses separators, NUL, ``.``/``..``, hidden names and overlong names: the
    name comes from inbound content, i.e. from outside.
    """
    if not isinstance(name, str) or not name or len(name) > 255:
        return None
    if "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        return None
    return name


def check_relative_path(path: object) -> PurePosixPath | None:
    """``path`` as a workspace-relative path if it stays inside the workspace
    by its spelling alone (not absolute, no ``..``, no NUL), else None.

    The filesystem checks (symlinks, file type) happen when copying.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        return None
    from pathlib import PurePosixPath  # only for attachments: not on the cold start path

    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or pure.parts == (".",):
        return None
    return pure


def parse_content(raw: object) -> Inbound:
    """Understand an inbound ``content`` column.

    Accepts a JSON object (``text`` optional, ``attachments`` optional) or a
    plain JSON string. Anything else raises MalformedContent.
    """
    if not isinstance(raw, (str, bytes)):
        raise MalformedContent(f"content is {type(raw).__name__}, not JSON text")
    try:
        data = jsontext.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedContent(f"content is not JSON: {exc}") from None
    if isinstance(data, str):
        return Inbound(text=data)
    if not isinstance(data, dict):
        raise MalformedContent(f"content is a JSON {type(data).__name__}, not an object")
    text = data.get("text")
    if text is None:
        text = ""
    elif not isinstance(text, str):
        raise MalformedContent("content.text is not a string")
    raw_attachments = data.get("attachments") or []
    if not isinstance(raw_attachments, list):
        raise MalformedContent("content.attachments is not a list")
    attachments = []
    for item in raw_attachments:
        if not isinstance(item, dict):
            raise MalformedContent("an attachment is not an object")
        path = item.get("path") or item.get("localPath")  # NanoClaw's name for it
        name = item.get("name")
        if name is None and isinstance(path, str):
            from pathlib import PurePosixPath

            name = PurePosixPath(path).name
        attachments.append(
            Attachment(
                name=name if isinstance(name, str) else "",
                path=path if isinstance(path, str) else "",
            )
        )
    return Inbound(text=text, attachments=tuple(attachments))


def reply_text(text: str) -> str:
    return f"echo: {text}"


def reply_body(text: str, files: list[str] | None = None,
               refused: list[str] | None = None) -> dict[str, Any]:
    """The outbound content as an object: ``{"text": ..., "files": [...], "refused": [...]}``.

    ``files`` (names inside ``outbox/<out_id>/``) and ``refused`` (attachments
    not copied, with the reason) are present only when non-empty.
    """
    body: dict[str, Any] = {"text": text}
    if files:
        body["files"] = list(files)
    if refused:
        body["refused"] = list(refused)
    return body


def reply_content(text: str, files: list[str] | None = None,
                  refused: list[str] | None = None) -> str:
    """``reply_body`` as the JSON text of the ``content`` column."""
    return jsontext.dumps(reply_body(text, files, refused))

