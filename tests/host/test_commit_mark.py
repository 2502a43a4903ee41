"""host.commit_mark: "nothing committed since the last read", from one pread of the
header — on real SQLite files, and the pure decisions as tables."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.host import commit_mark
from orchestrator.host.commit_mark import Mark, header_counter, unchanged


def _header(write: int, read: int, counter: int) -> bytes:
    """12 header bytes from offset 16: page size, format versions, …, the counter."""
    return (b"\x10\x00" + bytes([write, read]) + b"\x00\x40\x20\x20"
            + counter.to_bytes(4, "big"))


@pytest.mark.parametrize(("header", "expected"), [
    (_header(1, 1, 0), 0),
    (_header(1, 1, 7), 7),
    (_header(1, 1, 0x01020304), 0x01020304),  # big-endian
    (_header(2, 2, 7), None),  # WAL: a commit goes to the -wal file, the counter stays
    (_header(1, 2, 7), None),
    (_header(2, 1, 7), None),
    (_header(1, 1, 7)[:11], None),  # a file too short to hold a header
    (b"", None),
])
def test_header_counter(header: bytes, expected: int | None) -> None:
    assert header_counter(header) == expected


A = Mark(inode=5, size=8192, mtime_ns=1_000, counter=3)


@pytest.mark.parametrize(("before", "now", "expected"), [
    (A, A, True),
    (None, A, False),  # no complete read kept: read
    (A, None, False),  # no mark now (gone, a link, WAL): read
    (None, None, False),
    (A, A._replace(counter=4), False),  # a commit
    (A, A._replace(inode=6), False),  # another file
    (A, A._replace(size=4096), False),
    (A, A._replace(mtime_ns=2_000), False),
])
def test_unchanged(before: Mark | None, now: Mark | None, expected: bool) -> None:
    assert unchanged(before, now) is expected


def _look(folder: Path, name: str = "outbound.db") -> Mark | None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return commit_mark.mark(fd, name)
    finally:
        os.close(fd)


def _commit(path: Path, n: int) -> None:
    with schema.opened(path) as conn, schema.transaction(conn):
        conn.execute("INSERT INTO session_state (key, value, updated_at) VALUES (?, 'v', 'now')",
                     (f"k{n}",))


def test_every_commit_moves_the_mark_and_a_read_does_not(tmp_path: Path) -> None:
    db = tmp_path / "outbound.db"
    schema.init_outbound(db)
    seen = [_look(tmp_path)]
    for n in range(5):
        _commit(db, n)
        seen.append(_look(tmp_path))
        with closing(sqlite3.connect(db)) as conn:  # a reader commits nothing
            conn.execute("SELECT COUNT(*) FROM session_state").fetchone()
        assert _look(tmp_path) == seen[-1]
    assert None not in seen
    assert len({m.counter for m in seen if m}) == len(seen)  # one step per commit


def test_no_mark_for_wal_or_what_is_not_a_database_file(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    wal.mkdir()
    with closing(sqlite3.connect(wal / "outbound.db")) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        assert _look(wal) is None  # (its commits would not move the counter)
    real = tmp_path / "real.db"
    schema.init_outbound(real)
    os.symlink(real, tmp_path / "outbound.db")  # a link is never followed
    assert _look(tmp_path) is None
    os.mkfifo(tmp_path / "fifo")  # opened without blocking, never read
    assert _look(tmp_path, "fifo") is None
    (tmp_path / "short").write_bytes(b"SQLite format 3\0")
    assert _look(tmp_path, "short") is None
    (tmp_path / "dir").mkdir()
    assert _look(tmp_path, "dir") is None
    assert _look(tmp_path, "absent") is None
