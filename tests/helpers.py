"""Small generic test helpers, shared by any test module (``from helpers import wait_for``).

Nothing here knows about the orchestrator's internals beyond plain SQLite, so
any test can use it. Waiting is always "poll until true, with a deadline" —
never a bare sleep that hopes the other side was fast enough.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.01,
             message: str | None = None) -> T:
    """Call ``condition`` until it returns something truthy; return that value.

    Raises AssertionError (with ``message`` and the last value seen) when
    ``timeout`` seconds pass first. ``condition`` is always called at least
    once, and once more at the deadline, so a slow machine gets its full time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{message or 'condition'} not met within {timeout:g}s (last value {value!r})")
        time.sleep(interval)


def table_columns(db: Path, table: str) -> list[str]:
    """Column names of ``table`` in declaration order (read-only open)."""
    with _ro(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def tables(db: Path) -> set[str]:
    """Names of the user tables in ``db`` (read-only open)."""
    with _ro(db) as conn:
        return {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def journal_mode(db: Path) -> str:
    """The journal mode stored in the file (read-only open, so nothing is changed)."""
    with _ro(db) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0].lower()


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query, as plain tuples."""
    with _ro(db) as conn:
        return [tuple(r) for r in conn.execute(sql, params)]


def open_fds_to(path: Path) -> list[str]:
    """This process's open file descriptors that point at ``path`` (Linux /proc)."""
    target = str(Path(path).resolve())
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                found.append(fd)
        except OSError:
            continue
    return found


class _ro:
    def __init__(self, db: Path) -> None:
        self.uri = Path(db).resolve().as_uri() + "?mode=ro"

    def __enter__(self) -> sqlite3.Connection:
        self.conn = sqlite3.connect(self.uri, uri=True)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
