"""Issue #21, class 5: an agent's outbox tree is removed iteratively, by descriptor, a
bounded step at a time, and whatever a pass cannot remove at once goes to the
background janitor (``OutboxJanitor``) instead of stalling the loop.

Real folders throughout; the deliverer's tests drive ``Deliverer.run_pass`` on a real
session folder (``World`` from test_delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.engine.delivery import remove_outboxes
from orchestrator.host import outbound
from orchestrator.host.treeremove import MAX_DEPTH, remove_tree
from tests.engine.test_delivery import NOW, World
from tests.support.bounds import LoopWatch
from tests.support.e2e import run
from tests.support.fakes import FakeChannel


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def deep_tree(parent: Path, depth: int, files_per_level: int = 1) -> None:
    """``a/a/a/...`` ``depth`` folders deep (deeper than PATH_MAX: made by descriptor)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            for i in range(files_per_level):
                os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            nxt = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def remove_all(parent: Path, name: str, budget: int) -> int:
    """Steps until gone; returns how many it took."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for step in range(1, 100_000):
            r = remove_tree(fd, name, budget)
            assert r.stuck is None and r.ops <= max(budget, MAX_DEPTH + 2) + 1
            if r.done:
                return step
    finally:
        os.close(fd)
    raise AssertionError("never finished")


def test_a_3000_deep_tree_is_removed_without_recursion(tmp_path: Path) -> None:
    top = tmp_path / "outbox" / "r1"
    top.mkdir(parents=True)
    deep_tree(top, 3000)
    fds = open_fds()
    fd = os.open(tmp_path / "outbox", os.O_RDONLY | os.O_DIRECTORY)
    r = remove_tree(fd, "r1", 10**9)  # one call, no budget limit
    os.close(fd)
    assert r.done and r.stuck is None and r.hoisted > 0
    assert not top.exists() and open_fds() == fds  # nothing left open


@pytest.mark.parametrize("shape", ["deep", "wide", "both"])
def test_a_tree_is_removed_a_bounded_step_at_a_time(tmp_path: Path, shape: str) -> None:
    top = tmp_path / "r1"
    top.mkdir()
    if shape in ("deep", "both"):
        deep_tree(top, 500, files_per_level=3)
    if shape in ("wide", "both"):
        for i in range(3000):
            (top / f"w{i}").touch()
    steps = remove_all(tmp_path, "r1", 200)
    assert not top.exists() and steps > 5


def test_links_in_the_tree_are_removed_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    (outside / "sub" / "keep2.txt").write_text("keep")
    top = tmp_path / "r1"
    (top / "d").mkdir(parents=True)
    os.symlink(outside, top / "link-dir")
    os.symlink(outside / "keep.txt", top / "d" / "link-file")
    os.link(outside / "keep.txt", top / "hard")  # a hard link: only this name goes
    os.mkfifo(top / "fifo")
    deep_tree(top / "d", MAX_DEPTH + 5)  # moved up past the bound, still never through a link
    os.symlink(outside / "sub", top / "d" / "a" / "a" / "sub-link")
    assert remove_all(tmp_path, "r1", MAX_DEPTH + 2) > 1
    assert not os.path.lexists(top)
    assert (outside / "keep.txt").read_text() == "keep"
    assert (outside / "sub" / "keep2.txt").read_text() == "keep"


def test_a_link_or_file_in_place_of_the_folder_is_unlinked(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").touch()
    os.symlink(tmp_path / "target", tmp_path / "r1")
    (tmp_path / "r2").write_text("file")
    assert remove_all(tmp_path, "r1", 5) == 1 and remove_all(tmp_path, "r2", 5) == 1
    assert (tmp_path / "target" / "x").exists()
    assert remove_all(tmp_path, "absent", 5) == 1


@contextlib.contextmanager
def unremovable(folder: Path) -> Iterator[None]:
    """``folder``'s entries cannot be removed: a read-only bind mount of it as root (root
    ignores permission bits), its write bit off otherwise."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o500)
        try:
            yield
        finally:
            os.chmod(folder, 0o700)
        return
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_folder_that_cannot_be_emptied_is_stuck_not_rescanned_forever(tmp_path: Path) -> None:
    (tmp_path / "r1" / "ro").mkdir(parents=True)
    (tmp_path / "r1" / "ro" / "x").touch()
    with unremovable(tmp_path / "r1" / "ro"):
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            r = remove_tree(fd, "r1", 10**6)
        finally:
            os.close(fd)
        assert not r.done and r.stuck and r.ops < 10


# --- the deliverer and its janitor ----------------------------------------------------


def test_a_pass_removes_small_folders_itself_and_hands_big_ones_on(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel())
    world.reply("r-small", files={"a.txt": b"A"})
    (world.paths.outbox / "r-small" / "junk").touch()
    world.reply("r-deep", files={"b.txt": b"B"})
    deep_tree(world.paths.outbox / "r-deep", 3000)  # was: RecursionError, never cleaned

    async def go() -> None:
        async with LoopWatch() as watch:
            started = time.monotonic()
            with world.folder() as folder:
                messages = outbound.read(folder.db("outbound.db"), after_seq=0,
                                         max_content_bytes=1 << 20).messages
                result = await world.deliverer.run_pass(
                    folder=folder, agent_group="grp", session_id=world.row.id,
                    state=world.state, messages=messages, routing=("chat", "room-1", None),
                    now=NOW)
            assert time.monotonic() - started < 0.2
            assert sorted(result.delivered) == ["r-deep", "r-small"]
            assert not (world.paths.outbox / "r-small").exists()  # in the pass itself
            assert world.deliverer.janitor.pending == 1
            deadline = time.monotonic() + 60
            while (world.paths.outbox / "r-deep").exists():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        await world.deliverer.aclose()
        assert watch.max_lag < 0.1, watch.max_lag

    run(go())
    assert world.settled() == {"r-small": "delivered", "r-deep": "delivered"}


def test_remove_outboxes_shares_one_budget_over_many_replies(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel())
    ids = [f"r{i}" for i in range(100)]
    for out_id in ids:
        (world.paths.outbox / out_id).mkdir(parents=True)
        (world.paths.outbox / out_id / "x").touch()
    with world.folder() as folder:
        left = remove_outboxes(folder, ids, budget=50)
    gone = [i for i in ids if not (world.paths.outbox / i).exists()]
    assert len(gone) == 25 and left == [i for i in ids if i not in gone]


def test_a_reply_listing_thousands_of_files_moves_them_off_the_loop(tmp_path: Path) -> None:
    world = World(tmp_path, FakeChannel())
    world.reply("r-many", files={f"f{i}": b"" for i in range(20_000)})

    async def go() -> list[str]:
        async with LoopWatch() as watch:
            with world.folder() as folder:
                messages = outbound.read(folder.db("outbound.db"), after_seq=0,
                                         max_content_bytes=1 << 20).messages
                result = await world.deliverer.run_pass(
                    folder=folder, agent_group="grp", session_id=world.row.id,
                    state=world.state, messages=messages, routing=("chat", "room-1", None),
                    now=NOW)
        # on the loop the 20 000 moves held it 0.94 s; off it, the worst tick is a few
        # ms on a quiet machine and stayed under 0.2 s on a loaded one (load ~5 on 2
        # cores): 0.4 s tells the two apart without failing on a busy CI host
        assert watch.max_lag < 0.4, watch.max_lag
        return result.delivered

    assert run(go()) == ["r-many"]
    assert len(os.listdir(world.data_dir / "delivered" / "r-many")) == 20_000
