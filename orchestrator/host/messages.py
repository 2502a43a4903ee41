"""A session's messages in and out, newest first, for ``GET /v1/sessions/{id}/messages``.

Both databases sit in the session folder, so every byte is the agent's: they are
opened through ``SessionDir.reader`` (no link followed, no lock waited on, every
query interrupted at ``READ_DEADLINE``), every column is read as bytes and decoded
here, and a content over ``max_bytes`` is never loaded (its size is asked of SQLite
first): the row comes back with ``content: null`` and its ``problem``.

Paging: the two tables are merged on one total order, (timestamp, direction, id)
descending. A cursor is that key of the last row of a page, base64url-encoded JSON,
opaque to clients; the next page is everything strictly below it, so rows written
meanwhile never shift a page (new ones are newer than any cursor).

Reply files are read from ``<data_dir>/delivered/<reply id>/`` (the host moved them
there out of the outbox, design: docs/contract.md §10), opened with ``O_NOFOLLOW``
at each step by descriptor: a link there is refused, never followed.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from orchestrator.contract import schema
from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB, delivered_root, validate_id
from orchestrator.host.safefs import DIR_FLAGS, FILE_FLAGS, Refused, SessionDir

MAX_LIMIT = 200
MAX_NAME = 255
CHUNK = 64 * 1024


class CursorError(ValueError):
    """A cursor this server did not hand out (or one mangled on the way)."""


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(key: tuple[str, str, str]) -> str:
    raw = json.dumps(list(key), ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> tuple[str, str, str]:
    """The key a cursor holds; CursorError for anything this server did not write."""
    if len(text) > 2048:
        raise CursorError("cursor is too long: pass next_cursor from the previous page as is")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorError("cursor is not one this server handed out: pass next_cursor from "
                          "the previous page as is") from None
    if (not isinstance(key, list) or len(key) != 3 or not all(isinstance(k, str) for k in key)
            or key[1] not in ("in", "out")):
        raise CursorError("cursor is not one this server handed out: pass next_cursor from "
                          "the previous page as is")
    return key[0], key[1], key[2]


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _content(raw: object, size: object, max_bytes: int) -> tuple[Any, str | None]:
    """(parsed content, problem)."""
    if isinstance(size, int) and size > max_bytes:
        return None, f"content is {size} bytes, over the {max_bytes}-byte limit"
    text = _text(raw)
    if text is None:
        return None, "content is missing"
    try:
        return json.loads(text), None
    except ValueError:
        return None, "content is not valid JSON"


def file_names(direction: str, content: Any) -> list[str]:
    """Names of a message's files: a reply's ``content.files``, an inbound message's
    ``content.attachments[].name``."""
    if not isinstance(content, dict):
        return []
    if direction == "out":
        items = content.get("files")
        return [f for f in items if isinstance(f, str)][:1000] if isinstance(items, list) else []
    items = content.get("attachments")
    if not isinstance(items, list):
        return []
    return [a["name"] for a in items if isinstance(a, dict) and isinstance(a.get("name"), str)
            ][:1000]


_BELOW = ("(CAST(timestamp AS TEXT) < :ts OR (CAST(timestamp AS TEXT) = :ts AND "
          "(:dir < :cdir OR (:dir = :cdir AND CAST(id AS TEXT) < :cid))))")


def _rows(db: Any, table: str, direction: str, extra: str, below: tuple[str, str, str] | None,
          limit: int, max_bytes: int, ident: str | None = None) -> list[dict[str, Any]]:
    where = f"WHERE {_BELOW}" if below else ""
    args: dict[str, Any] = {"dir": direction, "limit": limit}
    if below:
        args.update(ts=below[0], cdir=below[1], cid=below[2])
    if ident is not None:
        where, args["ident"] = "WHERE id = :ident", ident
    sql = (f"SELECT CAST(id AS TEXT), CAST(timestamp AS TEXT), kind, {extra}, "
           "length(CAST(content AS BLOB)), CASE WHEN length(CAST(content AS BLOB)) <= "
           f":max THEN content END FROM {table} {where} "
           "ORDER BY CAST(timestamp AS TEXT) DESC, CAST(id AS TEXT) DESC LIMIT :limit")
    args["max"] = max_bytes
    out = []
    with schema.opened(db, readonly=True) as conn:
        conn.text_factory = bytes
        for row in conn.execute(sql, args):
            content, problem = _content(row[5], row[4], max_bytes)
            item = {"id": _text(row[0]) or "", "direction": direction,
                    "timestamp": _text(row[1]) or "", "kind": _text(row[2]) or "",
                    "content": content, "files": file_names(direction, content)}
            if direction == "in":
                item["status"] = _text(row[3])
                item["in_reply_to"] = None
            else:
                item["status"] = None
                item["in_reply_to"] = _text(row[3])
            if problem:
                item["problem"] = problem
            out.append(item)
    return out


def _delivery(db: Any, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    with schema.opened(db, readonly=True) as conn:
        conn.text_factory = bytes
        return {_text(r[0]) or "": _text(r[1]) or "" for r in conn.execute(
            f"SELECT message_out_id, status FROM delivered WHERE message_out_id IN ({marks})",
            ids)}


def _key(item: dict[str, Any]) -> tuple[str, str, str]:
    return item["timestamp"], item["direction"], item["id"]


def list_messages(data_dir: Path, agent_group: str, session_id: str, *, limit: int = 50,
                  cursor: str | None = None, max_bytes: int = 1 << 20) -> Page:
    """One page of a session's messages, newest first. Raises CursorError for a bad
    cursor, FileNotFoundError for a session folder that is not there, and whatever
    reading its files raises (the caller makes that the request's one-line error)."""
    below = decode_cursor(cursor) if cursor else None
    limit = max(1, min(limit, MAX_LIMIT))
    with SessionDir(data_dir, agent_group, session_id) as folder:
        items: list[dict[str, Any]] = []
        if folder.regular(INBOUND_DB) is not None:
            items += _rows(folder.reader(INBOUND_DB), "messages_in", "in", "status", below,
                           limit + 1, max_bytes)
        if folder.regular(OUTBOUND_DB) is not None:
            items += _rows(folder.reader(OUTBOUND_DB), "messages_out", "out", "in_reply_to",
                           below, limit + 1, max_bytes)
        items.sort(key=_key, reverse=True)
        page = items[:limit]
        outs = [m["id"] for m in page if m["direction"] == "out"]
        if outs and folder.regular(INBOUND_DB) is not None:
            states = _delivery(folder.reader(INBOUND_DB), outs)
            for m in page:
                if m["direction"] == "out":
                    m["status"] = states.get(m["id"], "pending")
    more = len(items) > limit
    return Page(page, encode_cursor(_key(page[-1])) if more and page else None)


def find_message(data_dir: Path, agent_group: str, session_id: str, message_id: str, *,
                 max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """One message of the session (in or out) by id, or None."""
    with SessionDir(data_dir, agent_group, session_id) as folder:
        for name, table, direction, extra in (
                (INBOUND_DB, "messages_in", "in", "status"),
                (OUTBOUND_DB, "messages_out", "out", "in_reply_to")):
            if folder.regular(name) is None:
                continue
            hits = _rows(folder.reader(name), table, direction, extra, None, 1, max_bytes,
                         ident=message_id)
            if not hits:
                continue
            if direction == "out" and folder.regular(INBOUND_DB) is not None:
                hits[0]["status"] = _delivery(folder.reader(INBOUND_DB),
                                              [message_id]).get(message_id, "pending")
            return hits[0]
    return None


# --- reply files ---------------------------------------------------------------------------


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a reply file's name (one path component), or None."""
    if (not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME or "/" in name
            or "\x00" in name or name in (".", "..")):
        return "file name must be one path component (no '/', not '.' or '..')"
    return None


def open_reply_file(data_dir: Path, message_id: str, name: str) -> tuple[int, int]:
    """(descriptor, size) of ``delivered/<message_id>/<name>``, opened without following
    a link at any step; FileNotFoundError if absent, Refused if not a regular file."""
    validate_id(message_id, "message id")
    problem = check_name(name)
    if problem:
        raise Refused(errno.EINVAL, problem)
    root = os.open(delivered_root(data_dir), DIR_FLAGS)
    try:
        try:
            folder = os.open(message_id, DIR_FLAGS, dir_fd=root)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file in its place
                raise Refused(errno.EINVAL, f"delivered/{message_id} is not a folder") from None
            raise
    finally:
        os.close(root)
    try:
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(errno.EINVAL,
                              f"delivered/{message_id}/{name!r} is a symlink") from None
            raise
    finally:
        os.close(folder)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(errno.EINVAL, f"delivered/{message_id}/{name!r} is not a regular file")
    return fd, st.st_size


class Chunks:
    """A file's bytes in CHUNK pieces for a streamed response; the descriptor is closed
    at the end, on ``close()``, or when the object is dropped — also when the response
    never started (a client gone before the first byte), which a generator's
    ``finally`` would not cover."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.fd < 0:
            raise StopIteration
        data = os.read(self.fd, CHUNK)
        if not data:
            self.close()
            raise StopIteration
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def reply_of(data_dir: Path, agent_group: str, session_id: str, message_id: str) -> bool:
    """Whether ``message_id`` is a reply (messages_out row) of this session."""
    with SessionDir(data_dir, agent_group, session_id) as folder:
        if folder.regular(OUTBOUND_DB) is None:
            return False
        with schema.opened(folder.reader(OUTBOUND_DB), readonly=True) as conn:
            return conn.execute("SELECT 1 FROM messages_out WHERE id=?",
                                (message_id,)).fetchone() is not None
