"""The watch and retention (issue 26): a *retiring* session's folder events (its move
out of the tree, the removal of its files by the retention worker) are dropped in the
watch thread (``FolderWatch.retiring``) and hold no batch open, while a live session's
changes beside them are reported; a retiring folder moved back (kept after all) is
reported and watched again. Real inotify on real folders."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from orchestrator.contract.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
)
from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import IN_ISDIR, FolderWatch
from tests.support.helpers import wait_for


def _tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(root, a retiring session's folder, a live one's, where folders are moved out)."""
    root = tmp_path / "data" / "sessions"
    old, live = root / "grp" / "old-1", root / "grp" / "act-1"
    for folder in (old, live):
        (folder / "outbox").mkdir(parents=True)
        for name in ("inbound.db", "outbound.db", ".heartbeat"):
            (folder / name).write_bytes(b"x")
    removing = tmp_path / "data" / ".removing"
    removing.mkdir()
    return root, old, live, removing


def _batch(watch: FolderWatch, timeout_ms: int = 60) -> set[tuple[Change, str]]:
    raw = watch.watch(debounce_ms=50, step_ms=5, timeout_ms=timeout_ms, stop_event=None)
    return raw if isinstance(raw, set) else set()


def _remove(folder: Path) -> None:
    """What the retention worker does to a moved folder (``treeremove``)."""
    for name in ("inbound.db", "outbound.db", ".heartbeat"):
        (folder / name).unlink()
    (folder / "outbox").rmdir()
    folder.rmdir()


@pytest.mark.parametrize("depth,path,name,mask,dropped", [
    (1, "/r/grp", "old-1", IN_MOVED_FROM, True),  # leaving its group: moved out
    (1, "/r/grp", "old-1", IN_DELETE, True),
    (1, "/r/grp", "old-1", IN_MOVED_TO, False),  # back in its group: kept after all
    (1, "/r/grp", "old-1", IN_CREATE, False),
    (1, "/r/grp", "act-1", IN_MOVED_FROM, False),  # another session's
    (2, "/r/grp/old-1", "inbound.db", IN_DELETE, True),  # its files, removed
    (2, "/r/grp/old-1", "outbound.db", IN_MODIFY, True),
    (2, "/r/grp/act-1", "outbound.db", IN_MODIFY, False),
    (3, "/r/grp/old-1/outbox", "r-1", IN_DELETE, True),
    (3, "/r/grp/act-1/outbox", "r-1", IN_CREATE, False),
    (0, "/r", "grp", IN_DELETE, False),  # the root's: never a session's
])
def test_which_events_are_a_retiring_sessions(tmp_path: Path, depth: int, path: str,
                                              name: str, mask: int, dropped: bool) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    with FolderWatch(root, retiring={"old-1"}) as watch:
        assert watch._retiring(path, depth, name, mask) is dropped


def test_a_retiring_sessions_removal_is_dropped_and_a_live_write_reported(
        tmp_path: Path) -> None:
    root, old, live, removing = _tree(tmp_path)
    retiring: set[str] = set()
    with FolderWatch(root, retiring=retiring) as watch:
        wait_for(lambda: not _batch(watch), timeout=5, interval=0, message="a quiet watch")
        watch._active(str(old), watch.sessions[str(old)])  # its outbox/ watched too
        retiring.add("old-1")  # what ``Supervisor.detach_session`` does
        moved = removing / "old-1"
        os.rename(old, moved)
        _remove(moved)
        (live / "outbound.db").write_bytes(b"reply")
        got: set[tuple[Change, str]] = set()
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.modified, f"{live}/outbound.db") in got),
                 timeout=5, interval=0, message="the live session's write")
        got |= _batch(watch)
        assert not [p for _, p in got if "old-1" in p], got
        wait_for(lambda: str(old) not in watch.sessions and not _batch(watch), timeout=5,
                 interval=0, message="the removed folder's watch forgotten")
        assert str(old) not in watch.outboxes


def test_only_a_retiring_sessions_events_end_no_wait(tmp_path: Path) -> None:
    """Nothing but a retiring session's events: no batch at all (a wait times out),
    and a batch open for a live write is not held open by them (``_read``)."""
    root, old, _live, removing = _tree(tmp_path)
    with FolderWatch(root, retiring={"old-1"}) as watch:
        wait_for(lambda: not _batch(watch), timeout=5, interval=0, message="a quiet watch")
        moved = removing / "old-1"
        os.rename(old, moved)
        _remove(moved)
        assert watch.watch(debounce_ms=50, step_ms=5, timeout_ms=200,
                           stop_event=None) == "timeout"
        assert watch._read_at > 0  # (they were read: dropped, not left queued)


def test_a_retiring_folder_moved_back_is_reported_and_watched(tmp_path: Path) -> None:
    """Retention kept it after all (``FileSteps._undo_files``): its arrival is not a
    departure, so it is reported, and its writes are seen once it is not retiring."""
    root, old, _live, removing = _tree(tmp_path)
    retiring = {"old-1"}
    with FolderWatch(root, retiring=retiring) as watch:
        wait_for(lambda: not _batch(watch), timeout=5, interval=0, message="a quiet watch")
        moved = removing / "old-1"
        os.rename(old, moved)
        os.rename(moved, old)
        got: set[tuple[Change, str]] = set()
        wait_for(lambda: got.update(_batch(watch)) or (Change.added, str(old)) in got,
                 timeout=5, interval=0, message="the folder back")
        retiring.discard("old-1")  # ``reattach_session``
        (old / "outbound.db").write_bytes(b"later")
        wait_for(lambda: (got.update(_batch(watch)) or
                          (Change.modified, f"{old}/outbound.db") in got),
                 timeout=5, interval=0, message="its write")


def _event(wd: int, mask: int, name: str = "") -> bytes:
    raw = name.encode() + b"\0" * (16 - len(name)) if name else b""
    return struct.pack("iIII", wd, mask, 0, len(raw)) + raw


def test_a_retiring_sessions_events_do_not_hold_a_batch_open(tmp_path: Path) -> None:
    """``_parse`` says whether what it read may hold an open batch (``kept``): a live
    session's write does; a retiring session's events, and a watch's own end, do not
    (a prune's stream of them held live replies' batches to the debounce)."""
    root, old, live, _removing = _tree(tmp_path)
    with FolderWatch(root, retiring={"old-1"}) as watch:
        old_wd, live_wd = watch.sessions[str(old)], watch.sessions[str(live)]
        group_wd = next(wd for wd, (p, d) in watch.paths.items() if d == 1)
        changes: set[tuple[Change, str]] = set()
        gone = (_event(group_wd, IN_MOVED_FROM | IN_ISDIR, "old-1")
                + _event(old_wd, IN_DELETE, "inbound.db")
                + _event(old_wd, IN_DELETE_SELF) + _event(old_wd, IN_IGNORED))
        watch.kept = False
        watch._parse(gone, changes)
        assert watch.kept is False
        assert changes == set() and old_wd not in watch.paths
        watch._parse(_event(live_wd, IN_MODIFY, "outbound.db"), changes)
        assert watch.kept is True
        assert changes == {(Change.modified, f"{live}/outbound.db")}
