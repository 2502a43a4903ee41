"""host.retention: archive, delete, restore and crash recovery on real files and SQLite."""

from __future__ import annotations

import os
import sqlite3
import tarfile
from pathlib import Path

import pytest

from orchestrator.config.sections import RetentionConfig
from orchestrator.contract import schema
from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB, session_dir, session_paths
from orchestrator.host import removals, session_archive
from orchestrator.host.registry import Registry
from orchestrator.host.retention import (
    Item,
    Retention,
    RetentionError,
    prune_delivered,
    read_facts,
    remove_files,
)
from orchestrator.host.sessions import MessagingGroup, Sessions
from orchestrator.rules.retention import Action
from tests.support.retention import settled_session


@pytest.fixture
def env(tmp_path: Path):
    data = tmp_path / "data"
    reg = Registry(data / "orchestrator.db")
    yield Sessions(data, reg, max_attachment_bytes=1024), reg, data
    reg.close()


def test_archive_then_restore_brings_back_folder_and_rows(env) -> None:
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    folder = session_dir(data, "g", sid)
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("kept")
    os.symlink("/etc/passwd", folder / "link")  # kept as a link, never followed
    os.mkfifo(folder / "fifo")  # left out
    ret = Retention(data, reg, RetentionConfig())
    out = ret.remove(sid, Action.ARCHIVE)
    assert out.action == "archived" and out.archive
    assert not folder.exists() and reg.session(sid) is None
    assert removals.pending(reg) == []
    with tarfile.open(out.archive) as tar:
        names = tar.getnames()
        link = tar.getmember("session/link")
    assert "registry.json" in names and "session/notes/a.txt" in names
    assert "session/fifo" not in names and link.issym() and link.linkname == "/etc/passwd"
    back = ret.restore(sid)
    assert back.action == "restored" and not Path(out.archive).exists()
    assert (folder / "notes" / "a.txt").read_text() == "kept"
    assert not os.path.lexists(folder / "link")  # a link out of the folder is refused
    row = reg.session(sid)
    assert row is not None and row.container_status == "stopped"
    # the chat finds its session again
    again = sessions.resolve("g", MessagingGroup("cli", "p"), None, "shared")
    assert again.id == sid


def test_delete_removes_folder_and_rows_without_an_archive(env) -> None:
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    ret = Retention(data, reg, RetentionConfig())
    assert ret.remove(sid, Action.DELETE).action == "deleted"
    assert not session_dir(data, "g", sid).exists() and reg.session(sid) is None
    assert not (data / "archive").exists()
    with pytest.raises(RetentionError, match="no archive"):
        ret.restore(sid)


@pytest.mark.parametrize("force, expected", [(False, "kept"), (True, "archived")])
def test_pending_work_keeps_a_session_unless_forced(env, force: bool, expected: str) -> None:
    sessions, reg, data = env
    s = sessions.resolve("g", MessagingGroup("cli", "q"), None, "shared")
    sessions.write_message(s, {"text": "still pending"})
    out = Retention(data, reg, RetentionConfig()).remove(s.id, Action.ARCHIVE, force=force)
    assert out.action == expected
    if expected == "kept":
        assert "1 pending message" in (out.reason or "")
        assert session_dir(data, "g", s.id).is_dir() and reg.session(s.id) is not None
        assert removals.pending(reg) == []


def test_an_undelivered_reply_keeps_it(env) -> None:
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    with sqlite3.connect(session_paths(data, "g", sid).outbound_db) as c:
        c.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content)"
                  " VALUES ('out-2', 5, '2026-01-01 00:00:00', 'chat', '{}')")
    out = Retention(data, reg, RetentionConfig()).remove(sid, Action.DELETE)
    assert out.action == "kept" and "1 undelivered reply" in (out.reason or "")


def test_recover_undoes_a_removal_cut_before_its_archive(env) -> None:
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    ret = Retention(data, reg, RetentionConfig())
    p = removals.begin(reg, sid, "archive")  # what a crash mid-archive leaves
    assert p is not None
    moved = ret._move_out(p)
    part = ret._archive(moved, session_archive.archive_path(ret.archives, "g", sid), p.rows)
    assert part.name.endswith(".tar.gz.part") and reg.session(sid) is None
    assert ret.recover() == (0, 1)
    assert not part.exists()
    assert session_dir(data, "g", sid).is_dir() and reg.session(sid) is not None


def test_recover_finishes_a_removal_whose_archive_is_complete(env) -> None:
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    ret = Retention(data, reg, RetentionConfig())
    p = removals.begin(reg, sid, "archive")
    assert p is not None
    moved = ret._move_out(p)
    dest = session_archive.archive_path(ret.archives, "g", sid)
    session_archive.commit([(ret._archive(moved, dest, p.rows), dest)])
    assert ret.recover() == (1, 0)
    assert not moved.exists() and reg.session(sid) is None and removals.pending(reg) == []
    ret.restore(sid)
    assert reg.session(sid) is not None


def test_old_delivered_files_are_pruned(tmp_path: Path) -> None:
    root = tmp_path / "delivered"
    for name, age in (("old", 1000), ("new", 10)):
        (root / name).mkdir(parents=True)
        (root / name / "f.txt").write_text("x")
        t = 1_000_000 - age
        os.utime(root / name, (t, t))
    assert prune_delivered(tmp_path, 100, now=1_000_000) == 1
    assert sorted(os.listdir(root)) == ["new"]
    assert prune_delivered(tmp_path, 0, now=1_000_000) == 0



def test_a_batch_archives_deletes_and_keeps_each_as_its_facts_say(env) -> None:
    sessions, reg, data = env
    a = settled_session(sessions, reg, data, platform="a")
    b = settled_session(sessions, reg, data, platform="b")
    busy = sessions.resolve("g", MessagingGroup("cli", "busy"), None, "shared")
    sessions.write_message(busy, {"text": "pending"})
    ret = Retention(data, reg, RetentionConfig())
    out = ret.remove_many([Item(a, Action.ARCHIVE), Item(busy.id, Action.ARCHIVE),
                           Item(b, Action.DELETE), Item("sess-none", Action.DELETE)])
    assert [o.action for o in out] == ["archived", "kept", "deleted", "missing"]
    assert reg.session(busy.id) is not None and session_dir(data, "g", busy.id).is_dir()
    assert removals.pending(reg) == [] and not list(ret.archives.rglob("*.part"))


def test_the_file_steps_never_touch_the_registry_and_end_settles_the_journal(env) -> None:
    """The engine runs ``begin``/``end`` in its own process and ``remove_files`` in its
    worker process: the journal holds the batch from ``begin`` until ``end``, and the
    file steps work with the registry write-locked by someone else."""
    sessions, reg, data = env
    a = settled_session(sessions, reg, data, platform="a")
    busy = sessions.resolve("g", MessagingGroup("cli", "busy"), None, "shared")
    sessions.write_message(busy, {"text": "pending"})
    ret = Retention(data, reg, RetentionConfig())
    items = [Item(a, Action.ARCHIVE), Item(busy.id, Action.ARCHIVE),
             Item("sess-none", Action.DELETE)]
    work, out = ret.begin(items)
    assert [w.item.session_id for w in work] == [a, busy.id]
    assert {p.session_id for p in removals.pending(reg)} == {a, busy.id}
    assert reg.session(a) is None and reg.session(busy.id) is None  # out in one commit
    with reg.transaction():  # another writer holds the registry throughout
        kept = remove_files(data, RetentionConfig(), work)
    assert kept[0] is None and kept[1] is not None  # the pending message keeps it
    assert session_dir(data, "g", busy.id).is_dir()  # its folder is back already
    outcomes = ret.end(items, work, kept, out)
    assert [o.action for o in outcomes] == ["archived", "kept", "missing"]
    assert removals.pending(reg) == [] and reg.session(busy.id) is not None


def test_a_crash_between_the_file_steps_and_end_is_finished_or_undone(env) -> None:
    """SIGKILL after the worker's file steps, before ``end``: ``recover`` finishes the
    done removal and puts the kept session's rows back."""
    sessions, reg, data = env
    a = settled_session(sessions, reg, data, platform="a")
    busy = sessions.resolve("g", MessagingGroup("cli", "busy"), None, "shared")
    sessions.write_message(busy, {"text": "pending"})
    ret = Retention(data, reg, RetentionConfig())
    work, _ = ret.begin([Item(a, Action.ARCHIVE), Item(busy.id, Action.ARCHIVE)])
    remove_files(data, RetentionConfig(), work)
    assert ret.recover() == (1, 1)
    assert reg.session(a) is None and ret.find_archive(a) is not None
    assert reg.session(busy.id) is not None and session_dir(data, "g", busy.id).is_dir()
    assert removals.pending(reg) == []


def test_begin_many_journals_a_batch_in_one_transaction(env) -> None:
    sessions, reg, data = env
    a = settled_session(sessions, reg, data, platform="a")
    b = settled_session(sessions, reg, data, platform="b")
    commits = []
    reg._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    begun = removals.begin_many(reg, [(a, "archive"), ("sess-none", "delete"), (b, "delete"),
                                      (a, "delete")])
    reg._conn.set_trace_callback(None)
    assert [p.session_id if p else None for p in begun] == [a, None, b, None]
    assert len(commits) == 1
    first = begun[0]
    assert first is not None and first.rows["sessions"][0]["id"] == a
    assert first.rows["messaging_group"] == ["cli", "a"]  # the chat, for a restore
    assert {p.session_id: p.action for p in removals.pending(reg)} == {a: "archive",
                                                                       b: "delete"}


def test_a_removed_sessions_idempotency_keys_go_with_it(env) -> None:
    """The API's table (``api.idempotency``) lives in the registry file."""
    sessions, reg, data = env
    sid = settled_session(sessions, reg, data)
    with reg.transaction() as c:
        c.execute("CREATE TABLE api_idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT"
                  " NULL, message_id TEXT NOT NULL, session_id TEXT, done INTEGER NOT NULL"
                  " DEFAULT 0, created_at TEXT NOT NULL)")
        c.execute("INSERT INTO api_idempotency (key, fingerprint, message_id, session_id,"
                  " done, created_at) VALUES ('k1', 'f', 'm', ?, 1, 'now'), ('k2', 'f', 'm',"
                  " 'other', 1, 'now')", (sid,))
    Retention(data, reg, RetentionConfig()).remove(sid, Action.DELETE)
    with reg.transaction() as c:
        assert [r[0] for r in c.execute("SELECT key FROM api_idempotency")] == ["k2"]


# --- what an agent left in the folder: the facts a removal reads ----------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a database " * 100)


def _undelivered_reply(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                     "VALUES ('x', 1, '2026-01-01 00:00:00', 'chat', '{}')")
    conn.close()


def _symlink_to_outside(path: Path) -> None:
    outside = path.parent.parent / "outside.db"
    schema.init_outbound(outside)
    _undelivered_reply(outside)  # counted if the link were followed (the row above)
    path.unlink()
    os.symlink(outside, path)


@pytest.mark.parametrize("which,spoil,facts", [
    ("inbound", _garbage, (1, 0)),  # unreadable counts as work: never removed unforced
    ("outbound", _garbage, (1, 0)),
    ("inbound", Path.unlink, (0, 0)),  # missing: nothing pending in it
    ("outbound", Path.unlink, (0, 0)),
    ("outbound", _undelivered_reply, (0, 1)),  # the real thing, for contrast
    ("outbound", _symlink_to_outside, (0, 0)),  # a link is never opened
])
def test_facts_of_a_spoiled_folder(tmp_path: Path, which: str, spoil, facts) -> None:
    folder = tmp_path / "s" / "sess"
    folder.mkdir(parents=True)
    schema.init_inbound(folder / INBOUND_DB)
    schema.init_outbound(folder / OUTBOUND_DB)
    spoil(folder / (INBOUND_DB if which == "inbound" else OUTBOUND_DB))
    got = read_facts(folder, False, 0.0)
    assert (got.pending_inbound, got.undelivered) == facts


def test_facts_of_a_locked_database_count_as_work(tmp_path: Path) -> None:
    folder = tmp_path / "sess"
    folder.mkdir()
    schema.init_inbound(folder / INBOUND_DB)
    schema.init_outbound(folder / OUTBOUND_DB)
    holder = sqlite3.connect(folder / INBOUND_DB, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # an agent holding its database
    try:
        assert read_facts(folder, False, 0.0).pending_inbound >= 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert read_facts(folder, False, 0.0).pending_inbound == 0
