"""Small generic test helpers, shared by any test module
(``from tests.support.helpers import wait_for``).

Nothing here knows about the orchestrator's internals beyond plain SQLite, so
any test can use it. Waiting is always "poll until true, with a deadline" —
never a bare sleep that hopes the other side was fast enough: ``wait_for`` is
the one way to wait in plain code, ``until`` the one way on an event loop
(where whatever is observed keeps running meanwhile), ``holds`` the negative
observation.
``needs_root`` marks a test that only runs as root: skipped otherwise, but FAILED
when ``CI`` is set (CI must never silently skip, like Docker tests).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# the repository root (tests/support/helpers.py is two folders below it)
REPO = Path(__file__).resolve().parents[2]


def in_ci() -> bool:
    """CI is set the way CI services set it (``true``/``1``); ``false``/``0`` is not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_root(reason: str) -> None:
    """Inside a test: go on as root; otherwise skip, or FAIL when ``CI`` is set."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(f"{reason}: needs root (CI is set: root-only tests must run; run the "
                    "suite as root, e.g. in the CI container)")
    pytest.skip(f"{reason}: needs root")


def needs_root(reason: str) -> Callable[[F], F]:
    """Decorator form of ``require_root`` (sync and async tests; fixtures unchanged)."""
    def wrap(test: F) -> F:
        if inspect.iscoroutinefunction(test):
            @functools.wraps(test)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                require_root(reason)
                return await test(*args, **kwargs)
            return run_async  # type: ignore[return-value]

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            require_root(reason)
            return test(*args, **kwargs)
        return run  # type: ignore[return-value]
    return wrap


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


async def until(condition: Callable[[], Any], timeout: float = 15.0, message: str | None = None,
                *, interval: float = 0.02) -> Any:
    """Await ``condition()`` becoming truthy, letting the event loop run meanwhile.

    ``condition`` may return an awaitable (a check that must do blocking work,
    such as a docker call, in a thread): it is awaited and its result judged.
    Same deadline rule and failure message as ``wait_for``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{message or 'condition'} not met within {timeout:g}s (last value {value!r})")
        await asyncio.sleep(interval)


async def holds(condition: Callable[[], Any], seconds: float, message: str | None = None,
                *, interval: float = 0.02) -> None:
    """Assert ``condition()`` stays truthy for a whole window (a negative observation)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{message or 'condition'} stopped holding"
        await asyncio.sleep(interval)


def table_columns(db: Path, table: str) -> list[str]:
    """Column names of ``table`` in declaration order (read-only open)."""
    with ro_db(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def tables(db: Path) -> set[str]:
    """Names of the user tables in ``db`` (read-only open)."""
    with ro_db(db) as conn:
        return {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def journal_mode(db: Path) -> str:
    """The journal mode stored in the file (read-only open, so nothing is changed)."""
    with ro_db(db) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0].lower()


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query, as plain tuples."""
    with ro_db(db) as conn:
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


class ro_db:
    """``with ro_db(path) as conn``: a read-only SQLite connection, closed at the end."""

    def __init__(self, db: Path) -> None:
        self.uri = Path(db).resolve().as_uri() + "?mode=ro"

    def __enter__(self) -> sqlite3.Connection:
        self.conn = sqlite3.connect(self.uri, uri=True)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def killed_run(code: str, args: list[str], log: Path, cwd: Path, timeout: float = 60) -> None:
    """Run ``python -c code ARGS`` until it SIGKILLs itself: a crash at the very point
    a test chose (the code patches that point, then runs the orchestrator)."""
    import signal
    import subprocess
    import sys

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd)
        try:
            assert proc.wait(timeout=timeout) == -signal.SIGKILL, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
