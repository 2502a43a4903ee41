"""safefs on real files: links are refused, SQLite is held to the file in the folder,
and a locked database answers "busy" at once instead of waiting."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import sessions_root
from orchestrator.host import outbound, safefs
from orchestrator.host.safefs import Refused, SessionDir
from tests.support.helpers import wait_for


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = sessions_root(tmp_path / "data") / "grp" / "s1"
    folder.mkdir(parents=True)
    schema.init_inbound(folder / "inbound.db")
    schema.init_outbound(folder / "outbound.db")
    return tmp_path / "data"


def outside_db(tmp_path: Path) -> Path:
    """A real outbound DB outside data_dir, with a reply that must never be read."""
    path = tmp_path / "outside.db"
    schema.init_outbound(path)
    with schema.opened(path) as conn:
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                     " VALUES ('secret', 1, 't', 'chat', '{}')")
    return path


def test_a_real_session_folder_opens(data: Path) -> None:
    with SessionDir(data, "grp", "s1") as folder:
        st = os.stat(sessions_root(data) / "grp" / "s1")
        assert folder.identity == (st.st_dev, st.st_ino)
        assert folder.inode("outbound.db") == os.stat(folder_path(data) / "outbound.db").st_ino
        assert outbound.read(folder.db("outbound.db")).messages == []
    assert folder.fd == -1


def folder_path(data: Path) -> Path:
    return sessions_root(data) / "grp" / "s1"


def test_folder_stat_sees_what_a_session_dir_sees_without_opening_it(data: Path) -> None:
    group = safefs.open_group(data, "grp")
    try:
        seen = safefs.FolderStat(group, "grp", "s1")
        with SessionDir(data, "grp", "s1") as folder:
            assert seen.identity == folder.identity
            for name in ("inbound.db", "outbound.db", ".heartbeat"):
                assert seen.signature(name) == folder.signature(name)
        assert seen.signature(".heartbeat") is None
    finally:
        os.close(group)


@pytest.mark.parametrize("planted", ["link", "file"])
def test_folder_stat_refuses_a_link_or_a_file_for_the_folder(tmp_path: Path, data: Path,
                                                             planted: str) -> None:
    real = folder_path(data)
    os.rename(real, tmp_path / "moved")
    if planted == "link":
        os.symlink(tmp_path / "moved", real)
    else:
        real.write_bytes(b"not a folder")
    group = safefs.open_group(data, "grp")
    try:
        with pytest.raises(Refused, match="not a folder"):
            safefs.FolderStat(group, "grp", "s1")
    finally:
        os.close(group)
    if planted == "link":  # a linked group is refused when it is opened
        os.rename(real.parent, tmp_path / "group")
        os.symlink(tmp_path / "group", real.parent)
        with pytest.raises(Refused, match="is a symlink or not a directory"):
            safefs.open_group(data, "grp")


@pytest.mark.parametrize("which", ["session", "group"])
def test_linked_folders_are_refused(tmp_path: Path, data: Path, which: str) -> None:
    real = folder_path(data)
    if which == "session":
        os.rename(real, tmp_path / "moved")
        os.symlink(tmp_path / "moved", real)
    else:
        os.rename(real.parent, tmp_path / "moved")
        os.symlink(tmp_path / "moved", real.parent)
    with pytest.raises(Refused, match="is a symlink or not a directory"):
        SessionDir(data, "grp", "s1")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "hardlink"])
def test_a_database_that_is_not_a_plain_file_is_refused(tmp_path: Path, data: Path,
                                                        kind: str) -> None:
    target = outside_db(tmp_path)
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    db = folder_path(data) / "outbound.db"
    db.unlink()
    if kind == "symlink":
        os.symlink(target, db)
    elif kind == "fifo":
        os.mkfifo(db)  # opening it for reading would block: it is never opened
    elif kind == "directory":
        db.mkdir()
    else:
        os.link(target, db)
    t0 = time.monotonic()
    with SessionDir(data, "grp", "s1") as folder, pytest.raises(Refused):
        outbound.read(folder.db("outbound.db"))
    assert time.monotonic() - t0 < 1.0
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before


def test_verify_rejects_a_connection_to_another_file(tmp_path: Path, data: Path) -> None:
    """What a swap between the check and SQLite's open would give: SQLite holding a
    file that is not the one named in the folder. Found out before any use."""
    assert safefs.VERIFIED_OPEN  # CPython + the unix VFS here: the check is in force
    conn = sqlite3.connect(outside_db(tmp_path))
    try:
        with SessionDir(data, "grp", "s1") as folder:
            with pytest.raises(Refused, match="swapped while being opened"):
                safefs.verify(conn, folder.fd, "outbound.db", "x")
            same = sqlite3.connect(folder_path(data) / "outbound.db")
            safefs.verify(same, folder.fd, "outbound.db", "x")  # the right file passes
            same.close()
    finally:
        conn.close()


def test_a_folder_moved_after_opening_is_still_the_one_read(tmp_path: Path, data: Path) -> None:
    """The descriptor names the folder we opened, wherever it goes; a link put in its
    place later is not followed for that pass."""
    with schema.opened(folder_path(data) / "outbound.db") as conn:
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                     " VALUES ('inside', 1, 't', 'chat', '{}')")
    outside = tmp_path / "evil"
    outside.mkdir()
    os.rename(outside_db(tmp_path), outside / "outbound.db")
    with SessionDir(data, "grp", "s1") as folder:
        os.rename(folder_path(data), tmp_path / "moved")
        os.symlink(outside, folder_path(data))
        assert [m.id for m in outbound.read(folder.db("outbound.db")).messages] == ["inside"]
    with pytest.raises(Refused):
        SessionDir(data, "grp", "s1")  # the next pass refuses the link


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_locked_database_is_busy_at_once_not_unreadable(data: Path) -> None:
    db = folder_path(data) / "outbound.db"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with SessionDir(data, "grp", "s1") as folder:
            t0 = time.monotonic()
            with pytest.raises(sqlite3.OperationalError) as info:
                outbound.read(folder.db("outbound.db"))
            waited = time.monotonic() - t0
        assert schema.is_busy(info.value)
        assert waited < 0.2, f"waited {waited:.3f}s on a lock the agent holds"
    finally:
        locker.stdin.close()
        locker.wait(10)
        locker.stdout.close()
    with SessionDir(data, "grp", "s1") as folder:
        wait_for(lambda: outbound.read(folder.db("outbound.db")).messages == [], timeout=5)


HALF_WRITE = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=1")  # spill changed pages into the file before commit
conn.execute("BEGIN IMMEDIATE")
conn.execute("CREATE TABLE IF NOT EXISTS filler (x BLOB)")
for _ in range(200):
    conn.execute("INSERT INTO filler VALUES (randomblob(4000))")
os.kill(os.getpid(), signal.SIGKILL)  # the host dies mid-write
"""


def test_a_hot_inbound_journal_is_rolled_back_by_the_host(data: Path) -> None:
    """A host write cut short by SIGKILL leaves a hot journal: read-only readers fail
    until it is rolled back, so the host's own read-only open rolls it back first."""
    db = folder_path(data) / "inbound.db"
    schema.init_inbound(db)
    before = sorted(r[0] for r in sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE type='table'"))
    proc = subprocess.run([sys.executable, "-c", HALF_WRITE, str(db)])
    assert proc.returncode == -9
    journal = db.with_name("inbound.db-journal")
    assert journal.stat().st_size > 0
    ro = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("SELECT count(*) FROM messages_in").fetchone()
    ro.close()
    with SessionDir(data, "grp", "s1") as folder:
        with schema.opened(folder.db("inbound.db"), readonly=True) as conn:
            assert conn.execute("SELECT count(*) FROM messages_in").fetchone()[0] == 0
            tables = sorted(r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'"))
    assert tables == before  # the half-made table is gone: rolled back, not committed
    assert not journal.exists()
