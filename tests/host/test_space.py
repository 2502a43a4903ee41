"""host.space: the walk counts by descriptor and is bounded; the reserve on a real
file system."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.host.space import Reserve, free_bytes, session_bytes
from tests.support.mounts import tmpfs

M = 1 << 20


def session(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "sessions" / "g" / "s1"
    (folder / "outbox").mkdir(parents=True)
    return folder


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_counts_allocated_bytes_deep_and_hardlinks_once(tmp_path: Path) -> None:
    folder = session(tmp_path)
    base = session_bytes(tmp_path / "data", "g", "s1").bytes
    write(folder / "outbox" / "a" / "b" / "c" / "f", M)
    os.link(folder / "outbox" / "a" / "b" / "c" / "f", folder / "outbox" / "twin")
    used = session_bytes(tmp_path / "data", "g", "s1")
    assert used.complete
    assert M <= used.bytes - base < M + 64 * 1024  # the file once, plus its folders


def test_a_sparse_file_costs_what_it_allocates(tmp_path: Path) -> None:
    folder = session(tmp_path)
    with open(folder / "sparse", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB apparent, nothing allocated
    assert session_bytes(tmp_path / "data", "g", "s1").bytes < M


def test_links_are_not_followed(tmp_path: Path) -> None:
    folder = session(tmp_path)
    outside = tmp_path / "outside"
    write(outside / "big", 4 * M)
    os.symlink(outside, folder / "outbox" / "link")
    os.symlink(outside / "big", folder / "file-link")
    assert session_bytes(tmp_path / "data", "g", "s1").bytes < M


def test_the_walk_stops_over_the_limit_and_at_its_entry_bound(tmp_path: Path) -> None:
    folder = session(tmp_path)
    for i in range(50):
        write(folder / "outbox" / f"f{i}", 64 * 1024)
    over = session_bytes(tmp_path / "data", "g", "s1", stop_over=M)
    assert over.bytes > M and not over.complete and over.entries < 50
    few = session_bytes(tmp_path / "data", "g", "s1", max_entries=10)
    assert few.entries == 10 and not few.complete


def test_reserve_is_taken_released_and_refused_without_room(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "8m") as disk:
        reserve = Reserve(disk, 3 * M)
        before = free_bytes(disk)
        assert reserve.take() and reserve.held() >= 3 * M
        assert free_bytes(disk) <= before - 3 * M
        reserve.release()
        assert reserve.held() == 0 and free_bytes(disk) >= before - 64 * 1024
        big = Reserve(disk, 64 * M)
        assert not big.take() and big.held() == 0  # no room: nothing half kept
