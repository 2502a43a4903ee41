"""Kept connections (``kept_dbs``) on real files: reused while the folder and its files
stay the same, dropped the moment the agent replaces, removes or links anything, never
holding a lock between uses, bounded in number and in idle time."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import sessions_root
from orchestrator.host import inbound, outbound
from orchestrator.host.kept_dbs import KeptDbs, keeps
from orchestrator.host.safefs import KEPT_CACHE_KIB, Refused, SessionDir


def folder_of(data: Path, sid: str = "s1") -> Path:
    return sessions_root(data) / "grp" / sid


def make_session(data: Path, sid: str = "s1") -> Path:
    folder = folder_of(data, sid)
    folder.mkdir(parents=True)
    schema.init_inbound(folder / "inbound.db")
    schema.init_outbound(folder / "outbound.db")
    return folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_session(tmp_path / "data")
    return tmp_path / "data"


def reply(db: Path, mid: str, seq: int) -> None:
    """The agent's write: its own connection, one commit."""
    with schema.opened(db) as conn, schema.transaction(conn):
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                     " VALUES (?, ?, 't', 'chat', '{}')", (mid, seq))


def read_ids(data: Path, kept: KeptDbs, sid: str = "s1") -> list[str]:
    """One pass's read of outbound.db."""
    with SessionDir(data, "grp", sid, kept=kept) as folder:
        return [m.id for m in outbound.read(folder.db("outbound.db")).messages]


@pytest.mark.parametrize("name, readonly, busy_ms, create, kept", [
    ("outbound.db", True, 0, False, True),
    ("outbound.db", False, 0, False, False),  # a write to the agent's file: never kept
    ("inbound.db", True, 0, False, True),
    ("inbound.db", False, 0, False, False),  # a write: opened afresh (see the test below)
    ("inbound.db", False, 0, True, False),  # a create
    ("inbound.db", False, 50, False, False),  # a wait of the caller's choice
    (".heartbeat", True, 0, False, False),
])
def test_which_opens_are_kept(name: str, readonly: bool, busy_ms: int, create: bool,
                              kept: bool) -> None:
    assert keeps(name, readonly, busy_ms, create) is kept


def test_a_kept_connection_is_reused_and_sees_every_commit(data: Path) -> None:
    kept = KeptDbs()
    db = folder_of(data) / "outbound.db"
    assert read_ids(data, kept) == []
    for seq in (1, 3, 5):
        reply(db, f"r{seq}", seq)
        assert read_ids(data, kept)[-1] == f"r{seq}"
    with SessionDir(data, "grp", "s1", kept=kept) as folder:  # inbound: one rw for all
        inbound.settle(folder.db("inbound.db"), [("r1", "delivered", None)], {})
        assert inbound.delivered_ids(folder.db("inbound.db"), ["r1", "r3"]) == {"r1"}
    assert kept.opened == 2 and len(kept) == 1
    with SessionDir(data, "grp", "s1", kept=kept) as folder:  # a small page cache each
        with schema.opened(folder.db("outbound.db"), readonly=True) as conn:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -KEPT_CACHE_KIB
    kept.close()


def test_no_lock_is_held_between_uses(data: Path) -> None:
    """The agent (another connection) can take an exclusive lock right after a kept
    read and a kept write: a kept connection never blocks it."""
    kept = KeptDbs()
    read_ids(data, kept)
    with SessionDir(data, "grp", "s1", kept=kept) as folder:
        inbound.settle(folder.db("inbound.db"), [("x", "delivered", None)], {})
    for name in ("outbound.db", "inbound.db"):
        other = sqlite3.connect(folder_of(data) / name, timeout=0, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        other.execute("ROLLBACK")
        other.close()
    kept.close()


def test_a_replaced_file_drops_the_kept_connection(tmp_path: Path, data: Path) -> None:
    kept = KeptDbs()
    db = folder_of(data) / "outbound.db"
    reply(db, "old", 1)
    assert read_ids(data, kept) == ["old"]
    fresh = tmp_path / "fresh.db"
    schema.init_outbound(fresh)
    reply(fresh, "new", 1)
    os.replace(fresh, db)  # the agent renames another database over it
    assert read_ids(data, kept) == ["new"]
    assert kept.opened == 2
    db.unlink()  # gone: nothing read, nothing kept for it
    assert read_ids(data, kept) == []
    kept.close()


def test_a_link_in_place_of_a_kept_file_is_refused_never_followed(tmp_path: Path,
                                                                  data: Path) -> None:
    kept = KeptDbs()
    db = folder_of(data) / "outbound.db"
    assert read_ids(data, kept) == []
    outside = tmp_path / "outside.db"
    schema.init_outbound(outside)
    reply(outside, "secret", 1)
    db.unlink()
    db.symlink_to(outside)
    with pytest.raises(Refused, match="symlink"):
        read_ids(data, kept)
    assert len(kept) == 0  # the folder's connections are closed, not waiting to be used
    os.unlink(db)
    os.link(outside, db)  # a hard link to a file outside: refused too
    with pytest.raises(Refused, match="hard links"):
        read_ids(data, kept)
    kept.close()


def test_a_fifo_beside_a_kept_file_is_refused(data: Path) -> None:
    kept = KeptDbs()
    read_ids(data, kept)
    os.mkfifo(folder_of(data) / "outbound.db-journal")  # SQLite's open would block on it
    with pytest.raises(Refused, match="FIFO"):
        read_ids(data, kept)
    assert len(kept) == 0
    kept.close()


def test_a_replaced_folder_drops_the_kept_connections(tmp_path: Path, data: Path) -> None:
    """The folder moved away and another put under its name: the kept connection
    (named through the old folder's descriptor) is never used for the new one."""
    kept = KeptDbs()
    reply(folder_of(data) / "outbound.db", "old", 1)
    assert read_ids(data, kept) == ["old"]
    os.rename(folder_of(data), tmp_path / "moved")
    make_session(data)
    reply(folder_of(data) / "outbound.db", "new", 1)
    assert read_ids(data, kept) == ["new"]
    assert kept.opened == 2 and len(kept) == 1
    shutil.rmtree(folder_of(data))
    folder_of(data).symlink_to(tmp_path / "moved")  # a linked folder: refused on open
    with pytest.raises(Refused):
        read_ids(data, kept)
    kept.close()


def test_a_failed_use_drops_the_connection(data: Path) -> None:
    kept = KeptDbs()
    read_ids(data, kept)
    with SessionDir(data, "grp", "s1", kept=kept) as folder:
        with pytest.raises(sqlite3.OperationalError):
            with schema.opened(folder.db("outbound.db"), readonly=True) as conn:
                conn.execute("BEGIN")
                conn.execute("SELECT * FROM no_such_table")
        with schema.opened(folder.db("outbound.db"), readonly=True) as conn:
            conn.execute("BEGIN")  # left open by its user: not kept either
    read_ids(data, kept)
    assert kept.opened == 3
    kept.close()


def test_idle_folders_are_closed_and_the_number_is_bounded(data: Path) -> None:
    now = [0.0]
    kept = KeptDbs(sessions=2, idle=10.0, clock=lambda: now[0])
    for sid in ("s2", "s3"):
        make_session(data, sid)
    before = len(os.listdir("/proc/self/fd"))
    for sid in ("s1", "s2", "s3"):
        read_ids(data, kept, sid)
        now[0] += 1.0
    assert len(kept) == 2  # s1, the least recently used, was closed
    assert len(os.listdir("/proc/self/fd")) == before + 4  # 2 × (folder, outbound.db)
    now[0] = 11.5
    assert kept.close_idle() == 1  # s2 (used at 1.0); s3 (at 2.0) stays
    now[0] = 13.0
    assert kept.close_idle() == 1 and len(kept) == 0
    assert len(os.listdir("/proc/self/fd")) == before
    read_ids(data, kept, "s1")
    kept.drop_session("s1")
    assert len(kept) == 0 and len(os.listdir("/proc/self/fd")) == before


def test_kept_connections_closing_raise_no_event_in_the_folder(data: Path) -> None:
    """Both files are kept read-only: closing them (an eviction, an idle close) raises
    no ``IN_CLOSE_WRITE`` or ``IN_MODIFY``, which the host's watch would take for a
    change of an idle session. With ``inbound.db`` kept read-write each close was one:
    its pass kept the session again and evicted another, for ever (a first start of
    1 000 sessions: 60 s at 100 % of a core, never idle)."""
    import ctypes

    from orchestrator.contract.inotify import (
        IN_CLOSE_WRITE,
        IN_MODIFY,
        IN_NONBLOCK,
        _libc,
        parse_events,
    )

    libc = _libc()
    assert libc is not None
    fd = libc.inotify_init1(IN_NONBLOCK)
    try:
        assert libc.inotify_add_watch(fd, str(folder_of(data)).encode(),
                                      IN_CLOSE_WRITE | IN_MODIFY) >= 0, ctypes.get_errno()
        kept = KeptDbs()
        with SessionDir(data, "grp", "s1", kept=kept) as folder:
            outbound.read(folder.db("outbound.db"))
            inbound.due_state(folder.db("inbound.db"), schema.utcnow())
        assert kept.opened == 2
        kept.close()  # what an eviction or an idle close does
        try:
            events = parse_events(os.read(fd, 65536))
        except BlockingIOError:
            events = []
        assert events == []
    finally:
        os.close(fd)
