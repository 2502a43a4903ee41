"""The ``jsonl`` channel: one JSON object per reply, appended to a file.

The file doubles as the channel's own record of what it has taken: the ids in it
are loaded at open, so a reply written just before the orchestrator was killed
(and not yet recorded in inbound.db) is recognised, not written twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from orchestrator.channels.base import DeliveryError, Failure, Reply


class JsonlChannel:
    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[str] = set()
        self._failures: set[tuple[str, str]] = set()  # (kind, id) already reported
        self._fh = None

    def _open(self):
        if self._fh is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._seen = set(read_ids(self.path))
                self._failures = set(read_failures(self.path))
                torn = _ends_without_newline(self.path)
                self._fh = open(self.path, "a", encoding="utf-8")
                if torn:  # a crash mid-write: do not glue the next reply onto that line
                    self._fh.write("\n")
                    self._fh.flush()
            except OSError as exc:
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                raise DeliveryError(f"{self.path}: cannot open ({exc.strerror})") from None
        return self._fh

    def already_delivered(self, message_id: str) -> bool:
        self._open()
        return message_id in self._seen

    def _append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        try:
            fh = self._open()
            fh.write(line + "\n")
            fh.flush()
        except OSError as exc:
            raise DeliveryError(f"{self.path}: cannot append ({exc.strerror})") from None

    async def deliver(self, reply: Reply) -> str | None:
        self._append(reply.as_record())
        self._seen.add(reply.message_id)
        return None

    async def report_failure(self, failure: Failure) -> None:
        """A ``{"type": "failure", ...}`` line, once per (kind, id) even across restarts."""
        key = (failure.kind, failure.id)
        self._open()  # loads what the file already holds
        if key in self._failures:
            return
        self._append(failure.as_record())
        self._failures.add(key)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                return False
            fh.seek(-1, 2)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_ids(path: Path) -> list[str]:
    """Reply ids already in the file; a torn last line (crash mid-write) is skipped,
    failure records (``"type": "failure"``) are not replies."""
    if not path.exists():
        return []
    ids = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
                if record.get("type") != "failure":
                    ids.append(record["message_id"])
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("{}:{}: skipping unreadable line", path, n)
    return ids


def read_failures(path: Path) -> list[tuple[str, str]]:
    """(kind, id) of the failure records already in the file."""
    return [(r.get("kind"), r.get("id")) for r in read_lines(path)
            if isinstance(r, dict) and r.get("type") == "failure"]


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
