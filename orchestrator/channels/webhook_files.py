"""What a webhook body carries of a reply's files, and the memory that takes.

Pure planning (``plan_files``: which files are named, which go inline as base64,
never more than ``[delivery] max_payload_bytes``), reading exactly the planned bytes
(``read_inline``), and the two memory bounds of sending: ``ByteBudget`` across all
sessions and ``Body``, which drops a POST's bytes as soon as it is over.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from orchestrator.channels.base import DeliveryError

SEND_SLICE = 1 << 18


# A file entry's fields; ``data`` and ``sha256`` are null unless the file is inline, and
# ``omitted`` then says why: over ``max_file_bytes`` or no room left under ``max_payload_bytes``.
OMITTED_FILE = "max_file_bytes"
OMITTED_PAYLOAD = "max_payload_bytes"
_INLINE_EXTRA = 64  # an inline entry's sha256 (66) and "data" quotes, less its reason
SLACK = 32  # room for ``files_unlisted`` digits
FILES_MARK = "\u0000files\u0000"  # where the entries go in the encoded body


def b64_len(size: int) -> int:
    return 4 * ((size + 2) // 3)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _entry(name: str, size: int, omitted: str | None = OMITTED_PAYLOAD) -> dict[str, Any]:
    return {"name": name, "size": size, "sha256": None, "data": None, "omitted": omitted}


@dataclass(frozen=True, slots=True)
class FilesPlan:
    """Which files a reply's POST names and which it carries inline (pure, see plan_files)."""

    entries: list[dict[str, Any]]  # in the reply's order; data filled in by read_inline
    paths: list[str]  # the path of each entry
    inline: list[int]  # indexes of entries sent with their bytes
    unlisted: int  # files whose names did not fit under the cap either
    size: int  # an upper bound of the body's encoded size


def plan_files(files: list[tuple[str, str, int]], base: int, max_file_bytes: int,
               max_payload: int) -> FilesPlan:
    """``files``: (path, name, size) in the reply's order; ``base``: the body's size
    without files. Every file is named (name, size) while the names fit; then, in order,
    a file goes inline (base64 and sha256) if it is at most ``max_file_bytes`` and its
    encoded bytes still fit under ``max_payload``; the rest are named without content
    (``omitted`` says why). The body never exceeds ``max_payload``."""
    used = base + SLACK
    entries: list[dict[str, Any]] = []
    paths: list[str] = []
    for path, name, size in files:
        entry = _entry(name, size)
        cost = len(dumps(entry).encode("utf-8")) + 1
        if used + cost > max_payload:
            break
        used += cost
        entries.append(entry)
        paths.append(path)
    inline = []
    for i, entry in enumerate(entries):
        size = entry["size"]
        if size > max_file_bytes:
            entry["omitted"] = OMITTED_FILE
            continue
        extra = b64_len(size) + _INLINE_EXTRA
        if used + extra <= max_payload:
            used += extra
            inline.append(i)
    return FilesPlan(entries, paths, inline, len(files) - len(entries), used)


def stat_files(paths: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(path, name, size) of each reply file, opened without following a link; nothing
    is read."""
    out = []
    for p in paths:
        fd = _open_regular(Path(p))
        try:
            out.append((p, Path(p).name, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    return out


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeliveryError(f"{path}: not a regular file")
    return fd


def read_inline(plan: FilesPlan) -> list[bytes]:
    """The planned entries as encoded JSON, the inline files' bytes read: exactly the
    planned size (a file that changed size since is a failed attempt, retried), so
    memory never exceeds what the plan allowed. Built from parts (base64 needs no JSON
    escaping) rather than one ``json.dumps`` of megabytes, which would hold the GIL
    — and so the event loop — for tens of milliseconds."""
    inline = set(plan.inline)
    out = []
    for i, entry in enumerate(plan.entries):
        if i not in inline:
            out.append(dumps(entry).encode("utf-8"))
            continue
        path = Path(plan.paths[i])
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(entry["size"])
            if len(data) != entry["size"] or fh.read(1):
                raise DeliveryError(f"{path}: changed size while being sent")
        head = dumps({"name": entry["name"], "size": entry["size"],
                       "sha256": hashlib.sha256(data).hexdigest()})
        out.append(b"".join((head[:-1].encode("utf-8"), b',"data":"', base64.b64encode(data),
                             b'","omitted":null}')))
    return out


def file_entries(paths: tuple[str, ...], max_bytes: int,
                 max_payload: int = 2**62) -> list[dict[str, Any]]:
    """Reply files as they appear in a body (decoded again): see ``plan_files``."""
    return [json.loads(e) for e in read_inline(plan_files(stat_files(paths), 0, max_bytes,
                                                           max_payload))]


class ByteBudget:
    """Bytes of reply bodies being built or sent at once, across all sessions: a body
    waits until it fits (one alone always may), so many sessions with big replies at
    once hold at most ``limit`` bytes of bodies, not one cap each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond: asyncio.Condition | None = None

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            await cond.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with cond:
                self.used -= size
                cond.notify_all()


class Body:
    """One POST's bytes, sent in slices and dropped as soon as the POST is over: httpx
    keeps the request (and bytes given as ``content``) in reference cycles that only
    the cyclic GC frees, so a stream of big replies would pile up bodies meanwhile."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        offset = 0
        while offset < len(self.data):
            yield self.data[offset:offset + SEND_SLICE]
            offset += SEND_SLICE

    def drop(self) -> None:
        self.data = b""
