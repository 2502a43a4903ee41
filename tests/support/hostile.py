"""Hostile session folders for the reader tests: real FIFOs, real symlinks, real
folders (and a device node where the kernel lets us make one) planted where an
agent-writable file should be, plus a way to free any thread a FIFO caught.

``plant`` replaces one thing of one session: ``inbound.db``, ``outbound.db``,
``.heartbeat``, ``session`` (the session folder itself) or ``group`` (its group
folder) or any other name in the session folder (``outbound.db-journal``) by a
``fifo``, a ``symlink`` (to the same thing of ``other``, another session), a
``directory`` (an empty one), a ``device`` (``/dev/null``'s numbers) or a ``huge``
sparse file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from orchestrator.contract.layout import registry_path, session_paths
from orchestrator.host.registry import Registry, SessionRow
from orchestrator.host.sessions import MessagingGroup, Sessions

TARGETS = ("inbound.db", "outbound.db", ".heartbeat", "session", "group")
KINDS = ("fifo", "symlink", "directory", "device")


def table(where: Path) -> list[tuple[str, str]]:
    """Every (target, kind) the readers must survive; ``device`` where mknod works."""
    kinds = [k for k in KINDS if k != "device" or can_mknod(where)]
    return [(t, k) for t in TARGETS for k in kinds] + [
        ("outbound.db-journal", "fifo"), ("inbound.db-journal", "fifo"),
        ("outbound.db-wal", "fifo"), ("outbound.db", "huge")]


@dataclass
class World:
    """Good sessions (group ``good``: one message not yet due, a fresh .heartbeat each)
    and one bad session per planted case, each in its own group."""

    data_dir: Path
    good: list[SessionRow]
    bad: dict[tuple[str, str], SessionRow]


LATER = datetime.now(timezone.utc) + timedelta(days=1)


def build_world(data_dir: Path, cases: list[tuple[str, str]], good: int = 3) -> World:
    registry = Registry(registry_path(data_dir))
    try:
        sessions = Sessions(data_dir, registry, 1024)
        goods = []
        for i in range(good):
            row = sessions.resolve("good", MessagingGroup("cli", f"good-{i}"), None, "shared")
            sessions.write_message(row, {"text": "x"}, process_after=LATER)
            session_paths(data_dir, "good", row.id).heartbeat.touch()
            goods.append(row)
        bad = {}
        for n, (target, kind) in enumerate(cases):
            row = sessions.resolve(f"bad-{n}", MessagingGroup("cli", f"bad-{n}"), None, "shared")
            sessions.write_message(row, {"text": "x"}, process_after=LATER)
            plant(data_dir, row.agent_group_id, row.id, target, kind, ("good", goods[0].id))
            bad[(target, kind)] = row
    finally:
        registry.close()
    return World(data_dir, goods, bad)


def can_mknod(where: Path) -> bool:
    probe = where / ".mknod-probe"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:
        return False
    probe.unlink()
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def plant(data_dir: Path, group: str, session_id: str, target: str, kind: str,
          other: tuple[str, str]) -> Path:
    """Replace ``target`` of the session by ``kind``; returns the planted path."""
    mine = session_paths(data_dir, group, session_id)
    theirs = session_paths(data_dir, *other)
    path, link_to = {
        "session": (mine.root, theirs.root),
        "group": (mine.root.parent, theirs.root.parent),
    }.get(target, (mine.root / target, theirs.root / target))  # a file in the folder
    _remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(link_to, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "huge":  # 4 GiB, sparse: costs no disk, and no reader may read it all
        with open(path, "wb") as f:
            f.truncate(4 << 30)
    else:
        raise ValueError(kind)
    return path


def release_fifos(root: Path) -> None:
    """Open every FIFO under ``root`` for writing (non-blocking) and close it again:
    a reader blocked in ``open`` on one returns, so a test that failed leaves no thread
    stuck behind it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
