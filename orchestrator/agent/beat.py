"""The heartbeat touch, with nothing but ``os``: the agent's very first act.

``python -m orchestrator.agent`` touches ``.heartbeat`` before it imports
anything else (sqlite3, argparse, dataclasses … are ~100 ms of CPU, seconds on a
loaded host): the host counts an agent with no heartbeat yet as "starting" and
one whose start-up outlasts ``idle_after`` as idle, so the sooner the better.
"""

from __future__ import annotations

# not ``signal``: that one builds its enums (``enum``: ~3 ms of a start)
import _signal  # type: ignore[import-not-found]
import os

HEARTBEAT = ".heartbeat"


def touch(path: str | os.PathLike[str]) -> None:
    """Create ``path`` if missing and bump its mtime, never through a symlink
    (a planted one is ours to replace, not to follow)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if not os.path.islink(path):
            raise
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def workspace_of(argv: list[str]) -> str:
    """``--workspace DIR`` / ``--workspace=DIR`` from the command line, else ".";
    argparse proper runs later and reports bad arguments."""
    for i, arg in enumerate(argv):
        if arg == "--workspace" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--workspace="):
            return arg.split("=", 1)[1]
    return "."


def early(argv: list[str]) -> None:
    """Touch the workspace's ``.heartbeat`` if the workspace is a real folder;
    any problem is left for the agent's own start-up to report."""
    folder = workspace_of(argv)
    try:
        if os.path.isdir(folder) and not os.path.islink(folder):
            touch(os.path.join(folder, HEARTBEAT))
    except OSError:
        pass


def hold_signals() -> list[int]:
    """Record SIGTERM/SIGINT until the agent installs its own handlers (it then
    stops politely if one came): without this, a stop sent right after the early
    heartbeat would kill the agent by the default action instead."""
    held: list[int] = []
    for signum in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(signum, lambda n, _frame: held.append(n))
    return held
