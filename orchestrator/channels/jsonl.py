"""The ``jsonl`` channel: one JSON object per reply, appended to a file.

The file doubles as the channel's own record of what it has taken: the ids in it
are loaded at open, so a reply written just before the orchestrator was killed
(and not yet recorded in inbound.db) is recognised, not written twice.

A line is written whole or not at all: one ``os.write`` of the whole line on an
``O_APPEND`` descriptor, and on any error (a full disk can also mean a short
write) the file is cut back to its size before the write. A buffered file object
would keep the failed bytes and write them again with every retry — a full disk
once turned 39 replies into 54 lines that way.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from loguru import logger

from orchestrator.channels.base import ChannelBase, DeliveryError, Failure, Reply, StorageFull
from orchestrator.host.private import FILE_MODE, make_dirs
from orchestrator.support.errors import host_storage_failure

_CHUNK = 1 << 16


class JsonlChannel(ChannelBase):
    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[str] = set()
        self._failures: set[tuple[str, str]] = set()  # (kind, id) already reported
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            fd = None
            try:
                make_dirs(self.path.parent)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             FILE_MODE)  # private (with the umask: 0600 or less)
                self._seen = set(read_ids(self.path))
                self._failures = set(read_failures(self.path))
                _repair_tail(fd, self.path)
            except OSError as exc:
                if fd is not None:
                    os.close(fd)
                error = StorageFull if host_storage_failure(exc) else DeliveryError
                raise error(f"{self.path}: cannot open ({exc.strerror})") from None
            except BaseException:  # e.g. the torn line's newline did not fit
                if fd is not None:
                    os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def already_delivered(self, message_id: str) -> bool:
        self._open()
        return message_id in self._seen

    async def deliver(self, reply: Reply) -> str | None:
        line = json_line(reply.as_record())
        fd = self._open()
        append_whole(fd, line, self.path)
        self._seen.add(reply.message_id)
        return None

    async def report_failure(self, failure: Failure) -> None:
        """A ``{"type": "failure", ...}`` line, once per (kind, id) even across restarts."""
        key = (failure.kind, failure.id)
        fd = self._open()  # loads what the file already holds
        if key in self._failures:
            return
        append_whole(fd, json_line(failure.as_record()), self.path)
        self._failures.add(key)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def json_line(record: dict) -> bytes:
    """One record, one line, whatever the agent put in it: ``json.dumps`` escapes
    control characters (so no newline or terminal escape is ever written raw) and this
    also escapes the three characters that are not controls in JSON's eyes but end a
    line for ``str.splitlines`` and some readers (U+2028, U+2029, NEL). The line is
    as big as the reply's content (``[delivery] max_content_bytes``) and file paths:
    files are named, never inlined."""
    text = json.dumps(record, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS.items():
        if raw in text:  # only ever inside a JSON string: escaping keeps it valid JSON
            text = text.replace(raw, escaped)
    return (text + "\n").encode("utf-8")


def append_whole(fd: int, data: bytes, path: Path) -> None:
    """Append ``data`` in one write, or leave the file as it was and raise DeliveryError."""
    size = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"no space left on device (wrote {written} of "
                          f"{len(data)} bytes)")
    except OSError as exc:
        try:
            os.ftruncate(fd, size)  # shrinking needs no space
        except OSError as cut:
            logger.error("{}: could not cut a failed write back ({}); the next open "
                         "repairs the last line", path, cut.strerror)
        error = StorageFull if host_storage_failure(exc) else DeliveryError
        raise error(f"{path}: cannot append ({exc.strerror or exc})") from None


def _repair_tail(fd: int, path: Path) -> None:
    """After a crash mid-line: a complete record that only lacks its newline gets one
    (its id was read, so the reply is not written again); anything else is cut off,
    so the next reply never glues onto a fragment."""
    size = os.fstat(fd).st_size
    tail_at = _last_line_start(path, size)
    if tail_at == size:
        return
    with open(path, "rb") as fh:
        fh.seek(tail_at)
        tail = fh.read()
    if _record_id(tail) is not None or _failure_key(tail) is not None:
        append_whole(fd, b"\n", path)
    else:
        logger.warning("{}: cutting off a torn last line ({} bytes)", path, size - tail_at)
        os.ftruncate(fd, tail_at)


def _last_line_start(path: Path, size: int) -> int:
    """Offset just after the last newline (0 if none), read backwards in chunks."""
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            end = start
    return 0


def _record_id(line: bytes | str) -> str | None:
    try:
        mid = json.loads(line)["message_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return mid if isinstance(mid, str) else None


def read_ids(path: Path) -> list[str]:
    """Reply ids already in the file; a torn last line (crash mid-write) is skipped,
    failure records (``"type": "failure"``) are not replies."""
    if not path.exists():
        return []
    ids = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            mid = _record_id(line)
            if mid is None:
                if _failure_key(line) is None:  # a failure record is not a reply
                    logger.warning("{}:{}: skipping unreadable line", path, n)
            else:
                ids.append(mid)
    return ids


def _failure_key(line: bytes | str) -> tuple[str, str] | None:
    """(kind, id) of a failure record line (``"type": "failure"``), else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("type") != "failure":
        return None
    return (str(record.get("kind")), str(record.get("id")))


def read_failures(path: Path) -> list[tuple[str, str]]:
    """(kind, id) of the failure records already in the file."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [key for key in map(_failure_key, fh) if key is not None]


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
