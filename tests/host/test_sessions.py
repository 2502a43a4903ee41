"""sessions: resolution modes, session folders and writing messages, on real files."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.contract import schema
from orchestrator.contract.layout import session_paths, validate_id
from orchestrator.host import destinations, inbound
from orchestrator.host import sessions as sessions_mod
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessageError, MessagingGroup, Sessions, resolution_key
from tests.support.helpers import journal_mode, query, table_columns

UTC = timezone.utc


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    reg = Registry(data / "orchestrator.db")
    yield Sessions(data, reg, max_attachment_bytes=1024), reg, data
    reg.close()


# --- resolution_key (pure) ------------------------------------------------------------------

@pytest.mark.parametrize("mode, group, mg, thread, expected", [
    ("shared", "g", "mg1", None, "shared:g:mg1"),
    ("shared", "g", "mg1", "t1", "shared:g:mg1"),  # threads share the chat's session
    ("per-thread", "g", "mg1", "t1", "per-thread:g:mg1:t1"),
    ("per-thread", "g", "mg1", None, "per-thread:g:mg1:"),
    ("agent-shared", "g", "mg1", "t1", "agent-shared:g"),
    ("agent-shared", "g", None, None, "agent-shared:g"),
])
def test_resolution_key(mode, group, mg, thread, expected):
    assert resolution_key(mode, group, mg, thread) == expected


@pytest.mark.parametrize("mode, mg, fragment", [
    ("shared", None, "needs a messaging group"),
    ("per-thread", None, "needs a messaging group"),
    ("bogus", "mg1", "unknown session mode 'bogus'"),
])
def test_resolution_key_refuses(mode, mg, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolution_key(mode, "g", mg, None)


def test_resolution_keys_do_not_collide_across_modes_or_groups():
    keys = {resolution_key(m, g, "mg", t) for m in sessions_mod.MODES for g in ("g", "h")
            for t in (None, "t")}
    # shared: 2 groups, per-thread: 2 groups x 2 threads, agent-shared: 2 groups
    assert len(keys) == 2 + 4 + 2


# --- modes against a mix of chats and threads -----------------------------------------------

TRAFFIC = [  # (agent group, (channel, platform), thread)
    ("g1", ("cli", "A"), None),
    ("g1", ("cli", "A"), "t1"),
    ("g1", ("cli", "A"), "t2"),
    ("g1", ("cli", "A"), "t1"),
    ("g1", ("cli", "B"), "t1"),
    ("g1", ("slack", "A"), None),
    ("g2", ("cli", "A"), "t1"),
    ("g2", ("cli", "A"), None),
    ("g2", ("cli", "A"), None),
]
IDENTITY = {  # what makes two messages land in the same session, per mode
    "shared": lambda g, mg, t: (g, mg),
    "per-thread": lambda g, mg, t: (g, mg, t),
    "agent-shared": lambda g, mg, t: (g,),
}


@pytest.mark.parametrize("mode, expected_sessions", [
    ("shared", 4), ("per-thread", 7), ("agent-shared", 2)])
def test_mode_creates_the_right_sessions(env, mode, expected_sessions):
    s, reg, data = env
    ids = [s.resolve(g, MessagingGroup(*mg), t, mode).id for g, mg, t in TRAFFIC]
    assert len(set(ids)) == expected_sessions
    assert len(reg.sessions()) == expected_sessions
    # same identity ⇔ same session
    ident = IDENTITY[mode]
    for i, (g, mg, t) in enumerate(TRAFFIC):
        for j, (g2, mg2, t2) in enumerate(TRAFFIC):
            assert (ids[i] == ids[j]) == (ident(g, mg, t) == ident(g2, mg2, t2)), (i, j)
    # one folder per session, under its agent group
    folders = sorted(p.relative_to(data / "sessions").as_posix()
                     for p in (data / "sessions").glob("*/*"))
    assert folders == sorted(f"{r.agent_group_id}/{r.id}" for r in reg.sessions())


def test_modes_are_independent_for_the_same_chat(env):
    s, _, _ = env
    mg = MessagingGroup("cli", "A")
    ids = {m: s.resolve("g", mg, "t", m).id for m in sessions_mod.MODES}
    assert len(set(ids.values())) == 3


def test_resolve_records_routing_fields_per_mode(env):
    s, reg, _ = env
    mg = MessagingGroup("slack", "C9")
    shared = s.resolve("g", mg, "t1", "shared")
    thread = s.resolve("g", mg, "t1", "per-thread")
    agent = s.resolve("g", mg, "t1", "agent-shared")
    assert shared.thread_id is None and shared.messaging_group_id is not None
    assert thread.thread_id == "t1" and thread.messaging_group_id == shared.messaging_group_id
    assert agent.messaging_group_id is None and agent.thread_id is None
    assert s.routing_of(shared) == ("slack", "C9", None)
    assert s.routing_of(thread) == ("slack", "C9", "t1")
    assert s.routing_of(agent) == (None, None, None)


def test_resolve_refuses_unsafe_agent_group(env):
    s, reg, data = env
    with pytest.raises(ValueError, match="invalid agent group"):
        s.resolve("../evil", MessagingGroup("cli", "local"), None, "shared")
    assert reg.sessions() == []
    assert not (data / "evil").exists()


def test_session_ids_are_safe_folder_names():
    for _ in range(20):
        sid = sessions_mod.new_id("sess")
        assert sid.startswith("sess-") and len(sid) == 21
        assert validate_id(sid) == sid


# --- folders --------------------------------------------------------------------------------

def test_create_folder_makes_the_contract_files(tmp_path):
    paths = sessions_mod.create_folder(tmp_path, "g", "s1")
    assert paths.root == tmp_path / "sessions" / "g" / "s1"
    assert paths.inbox.is_dir() and paths.outbox.is_dir()
    assert journal_mode(paths.inbound_db) == journal_mode(paths.outbound_db) == "delete"
    assert "on_wake" in table_columns(paths.inbound_db, "messages_in")
    assert "in_reply_to" in table_columns(paths.outbound_db, "messages_out")
    sessions_mod.create_folder(tmp_path, "g", "s1")  # idempotent
    assert query(paths.inbound_db, "SELECT COUNT(*) FROM messages_in") == [(0,)]


def test_resolve_never_writes_an_existing_outbound_db(env):
    """Every ``send`` resolves its session; the agent may be mid-write on outbound.db.
    Holding its write lock must not block (or be broken by) the host: the host only
    creates outbound.db when it is missing, and upgrades it just before a wake."""
    s, reg, data = env
    first = s.resolve("g", None, None, "agent-shared")
    out = session_paths(data, "g", first.id).outbound_db
    before = out.stat()
    agent = sqlite3.connect(out, isolation_level=None, timeout=0)
    try:
        agent.execute("BEGIN IMMEDIATE")  # the agent's writer holds the lock
        again = s.resolve("g", None, None, "agent-shared")
        s.write_message(again, {"text": "while the agent writes"})
        agent.execute("ROLLBACK")
    finally:
        agent.close()
    assert again.id == first.id
    after = out.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns, before.st_size, before.st_ino)


def test_outbound_is_upgraded_only_on_request(tmp_path):
    paths = session_paths(tmp_path, "g", "old")
    paths.root.mkdir(parents=True)
    with closing(sqlite3.connect(paths.outbound_db)) as conn, conn:
        conn.execute("CREATE TABLE messages_out (id TEXT PRIMARY KEY, seq INTEGER UNIQUE, "
                     "timestamp TEXT NOT NULL, kind TEXT NOT NULL, content TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_out VALUES ('o1', 1, 't', 'chat', '{}')")
    sessions_mod.create_folder(tmp_path, "g", "old")  # leaves the agent's file alone
    assert "in_reply_to" not in table_columns(paths.outbound_db, "messages_out")
    added = schema.init_outbound(paths.outbound_db)  # what a wake does, no agent running
    assert "messages_out.in_reply_to" in added and "messages_out.deliver_after" in added
    assert query(paths.outbound_db, "SELECT id, seq FROM messages_out") == [("o1", 1)]
    assert journal_mode(paths.outbound_db) == "delete"


def test_resolve_upgrades_an_old_inbound_db_keeping_rows(env):
    s, reg, data = env
    reg.ensure_agent_group("g")
    row, _ = reg.get_or_create_session(resolution_key="agent-shared:g", agent_group_id="g",
                                       messaging_group_id=None, thread_id=None, new_id="old-1")
    paths = session_paths(data, "g", "old-1")
    paths.root.mkdir(parents=True)
    with closing(sqlite3.connect(paths.inbound_db)) as conn, conn:
        conn.execute("CREATE TABLE messages_in (id TEXT PRIMARY KEY, seq INTEGER UNIQUE, "
                     "kind TEXT NOT NULL, timestamp TEXT NOT NULL, status TEXT DEFAULT 'pending',"
                     " process_after TEXT, recurrence TEXT, tries INTEGER DEFAULT 0, "
                     "platform_id TEXT, channel_type TEXT, thread_id TEXT, content TEXT NOT NULL)")
        conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) "
                     "VALUES ('legacy', 2, 'chat', '2024-01-01 00:00:00', '{\"text\":\"old\"}')")
    again = s.resolve("g", None, None, "agent-shared")
    assert again.id == "old-1"
    mid, seq = s.write_message(again, {"text": "new"})
    assert seq == 4
    rows = query(paths.inbound_db, 'SELECT id, seq, "trigger", on_wake FROM messages_in '
                                   "ORDER BY seq")
    assert rows == [("legacy", 2, 1, 0), (mid, 4, 1, 0)]
    assert inbound.count_due(paths.inbound_db, datetime.now(UTC)) == 2


# --- writing messages ---------------------------------------------------------------------

def test_write_message_row(env):
    s, _, _ = env
    row = s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    when = datetime(2030, 1, 1, 9, 30, tzinfo=UTC)
    mid, seq = s.write_message(row, '{"text": "hi"}', kind="task", process_after=when,
                               routing=s.routing_of(row), message_id="m-1")
    assert (mid, seq) == ("m-1", 2)
    (msg,) = inbound.read_messages(s.paths(row).inbound_db)
    # process_after in the shape of SQLite's datetime('now'): agents compare it as text
    assert (msg["id"], msg["kind"], msg["status"], msg["trigger"], msg["process_after"],
            msg["channel_type"], msg["platform_id"], msg["thread_id"]) == (
        "m-1", "task", "pending", 1, "2030-01-01 09:30:00", "cli", "local", None)
    assert json.loads(msg["content"]) == {"text": "hi"}
    assert inbound.count_due(s.paths(row).inbound_db, when - timedelta(seconds=1)) == 0
    assert inbound.count_due(s.paths(row).inbound_db, when) == 1


def test_write_message_keeps_unicode_readable(env):
    s, _, _ = env
    row = s.resolve("g", None, None, "agent-shared")
    s.write_message(row, {"text": "grüße 👋"})
    (content,) = query(s.paths(row).inbound_db, "SELECT content FROM messages_in")[0]
    assert "grüße 👋" in content


def test_write_message_generates_distinct_ids_and_seqs(env):
    s, _, _ = env
    row = s.resolve("g", None, None, "agent-shared")
    results = [s.write_message(row, {"text": str(i)}) for i in range(4)]
    assert len({mid for mid, _ in results}) == 4
    assert [seq for _, seq in results] == [2, 4, 6, 8]


@pytest.mark.parametrize("message_id", ["../x", "a/b", "..", ".hidden"])
def test_write_message_refuses_unsafe_message_ids(env, message_id):
    s, _, _ = env
    row = s.resolve("g", None, None, "agent-shared")
    with pytest.raises(ValueError, match="invalid message id"):
        s.write_message(row, {"text": "x", "attachments": [{"name": "a", "data": "eA=="}]},
                        message_id=message_id)
    assert query(s.paths(row).inbound_db, "SELECT COUNT(*) FROM messages_in") == [(0,)]


def test_system_response_never_wakes(env):
    s, _, _ = env
    row = s.resolve("g", None, None, "agent-shared")
    mid, seq = s.write_system_response(row, "q-1", "yes", "u-7")
    (msg,) = inbound.read_messages(s.paths(row).inbound_db)
    assert (msg["kind"], msg["trigger"], msg["seq"]) == ("system", 0, seq)
    # NanoClaw's keys, compact: its runner finds the answer with this LIKE pattern
    assert msg["content"] == ('{"type":"question_response","questionId":"q-1",'
                              '"selectedOption":"yes","userId":"u-7"}')
    assert query(s.paths(row).inbound_db, "SELECT COUNT(*) FROM messages_in WHERE content"
                 " LIKE ?", ('%"questionId":"q-1"%',)) == [(1,)]
    assert inbound.count_due(s.paths(row).inbound_db, datetime.now(UTC)) == 0
    with pytest.raises(MessageError, match="must be a string"):
        s.write_system_response(row, "q-1", {"choice": "yes"})  # type: ignore[arg-type]


def test_content_is_stored_as_compact_json(env):
    s, _, _ = env
    row = s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    s.write_message(row, {"text": "hi", "sender": "Ann"}, routing=s.routing_of(row))
    (msg,) = inbound.read_messages(s.paths(row).inbound_db)
    assert msg["content"] == '{"text":"hi","sender":"Ann"}'


def test_every_chat_of_the_group_is_a_destination(env):
    """Chats that write to a group become its destinations, projected at once into the
    session a new chat writes to (a running agent can answer it) and at every wake."""
    s, _, _ = env
    a = s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    s.write_message(a, {"text": "one"}, routing=s.routing_of(a))
    b = s.resolve("g", MessagingGroup("chat", "room 9"), None, "shared")
    s.write_message(b, {"text": "two"}, routing=s.routing_of(b))
    names = lambda row: query(s.paths(row).inbound_db,  # noqa: E731
                              "SELECT name, type, channel_type, platform_id FROM destinations")
    room = ("chat:room_9~" + destinations.chat_name(destinations.Chat("chat", "room 9"))[-8:])
    assert names(b) == [(room, "channel", "chat", "room 9"), ("cli:local", "channel", "cli", "local")]
    assert names(a) == [("cli:local", "channel", "cli", "local")]  # until its next wake
    s.write_routing(a)
    assert names(a) == [("cli:local", "channel", "cli", "local"), (room, "channel", "chat", "room 9")]


def test_write_routing_copies_route_and_destinations(env):
    s, reg, _ = env
    row = s.resolve("g", MessagingGroup("slack", "C1"), "t7", "per-thread")
    reg.set_destinations("g", [
        {"name": "main", "type": "channel", "display_name": "Main", "channel_type": "slack",
         "platform_id": "C1"},
        {"name": "helper", "type": "agent", "agent_group_id": "g2"}])
    s.write_routing(row)
    db = s.paths(row).inbound_db
    assert inbound.read_routing(db) == {"id": 1, "channel_type": "slack", "platform_id": "C1",
                                        "thread_id": "t7"}
    # the chat has a hand-set destination: no automatic one beside it, and it comes first
    assert query(db, "SELECT * FROM destinations") == [
        ("main", "Main", "channel", "slack", "C1", None), ("helper", None, "agent", None, None, "g2")]
    reg.set_destinations("g", [])
    s.write_routing(row)
    assert query(db, "SELECT * FROM destinations") == [
        ("slack:C1:t7", "slack chat C1, thread t7", "channel", "slack", "C1", None)]


def test_mark_container_goes_to_the_registry(env):
    s, reg, _ = env
    row = s.resolve("g", None, None, "agent-shared")
    assert s.mark_container(row.id, "running", "started") == "stopped"
    assert reg.session(row.id).container_status == "running"
    assert reg.status_changes(row.id)[-1]["reason"] == "started"


def test_message_error_is_a_value_error():
    assert issubclass(MessageError, ValueError)


def test_duplicate_message_id_is_refused_and_keeps_the_first_messages_files(tmp_path):
    import base64

    with Registry(tmp_path / "orchestrator.db") as reg:
        s = Sessions(tmp_path, reg, 1024)
        sess = s.resolve("g", MessagingGroup("cli", "x"), None, "shared")
        data = base64.b64encode(b"first").decode()
        s.write_message(sess, {"text": "a", "attachments": [{"name": "f.txt", "data": data}]},
                        message_id="msg-dup")
        with pytest.raises(MessageError, match="already exists"):
            s.write_message(sess, {"text": "b"}, message_id="msg-dup")
        kept = s.paths(sess).inbox / "msg-dup" / "f.txt"
        assert kept.read_bytes() == b"first"


def test_symlinked_inbound_db_is_refused(tmp_path):
    outside = tmp_path / "outside.db"
    schema.init_inbound(outside)
    link = tmp_path / "inbound.db"
    link.symlink_to(outside)
    with pytest.raises(sqlite3.DatabaseError, match="symlink"):
        schema.connect(link)
    with pytest.raises(sqlite3.DatabaseError, match="symlink"):
        schema.connect(link, readonly=True)


# --- a new folder appears whole, together with its registry row ----------------------------

def test_a_folder_is_built_under_a_hidden_name_the_watcher_ignores(tmp_path):
    from orchestrator.contract.layout import classify, sessions_root

    final = session_paths(tmp_path, "g", "s1").root
    tmp = sessions_mod.build_folder(final)
    assert tmp.parent == final.parent and tmp.name.startswith(".")
    assert classify(sessions_root(tmp_path), tmp) is None
    assert classify(sessions_root(tmp_path), tmp / "inbound.db") is None
    assert sorted(p.name for p in tmp.iterdir()) == ["inbound.db", "inbox", "outbound.db",
                                                      "outbox"]
    assert not final.exists()
    sessions_mod.discard(tmp)
    assert list(final.parent.iterdir()) == []


def test_resolve_renames_a_complete_folder_into_place(env, monkeypatch):
    s, reg, data = env
    seen = []
    real_rename = sessions_mod.os.rename

    def watching_rename(src, dst):  # what a reader sees the instant the name appears
        real_rename(src, dst)
        seen.append(sorted(p.name for p in Path(dst).iterdir()))
        seen.append(table_columns(Path(dst) / "inbound.db", "messages_in"))
        seen.append(table_columns(Path(dst) / "outbound.db", "processing_ack"))

    monkeypatch.setattr(sessions_mod.os, "rename", watching_rename)
    row = s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    assert seen[0] == ["inbound.db", "inbox", "outbound.db", "outbox"]
    assert "on_wake" in seen[1] and "status_changed" in seen[2]
    assert [p.name for p in (data / "sessions" / "g").iterdir()] == [row.id]


def test_a_failed_rename_leaves_no_row_and_no_folder(env, monkeypatch):
    s, reg, data = env
    monkeypatch.setattr(sessions_mod, "new_id", lambda prefix: "sess-fixed")
    blocker = session_paths(data, "g", "sess-fixed").root
    blocker.mkdir(parents=True)
    (blocker / "something").write_text("in the way")  # rename onto a non-empty folder fails
    with pytest.raises(sessions_mod.UserError, match="cannot record the new session"):
        s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    assert reg.sessions() == []
    assert reg.find_messaging_group("cli", "local") is None  # the same transaction
    assert sorted(p.name for p in (data / "sessions" / "g").iterdir()) == ["sess-fixed"]


def test_two_senders_creating_one_session_agree_on_it(env, tmp_path):
    s, reg, data = env
    other_reg = Registry(data / "orchestrator.db")
    other = Sessions(data, other_reg, max_attachment_bytes=1024)
    first = s.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    other_reg.find_session = lambda key: None  # looked before the first one committed
    second = other.resolve("g", MessagingGroup("cli", "local"), None, "shared")
    other_reg.close()
    assert second.id == first.id
    assert [p.name for p in (data / "sessions" / "g").iterdir()] == [first.id]


def test_every_message_keeps_its_own_chat(env):
    s, reg, data = env
    row = s.resolve("g", MessagingGroup("chat", "p4"), "tx", "agent-shared")
    s.write_message(row, {"text": "a"}, routing=("chat", "p4", "tx"))
    s.write_message(row, {"text": "b"}, routing=("slack", "C1", None))
    rows = query(session_paths(data, "g", row.id).inbound_db,
                 "SELECT channel_type, platform_id, thread_id FROM messages_in ORDER BY seq")
    assert rows == [("chat", "p4", "tx"), ("slack", "C1", None)]
    assert s.routing_of(row) == (None, None, None)  # agent-shared: no default chat


def test_a_stale_staging_folder_is_removed_a_fresh_one_kept(tmp_path):
    import os
    import time

    group = tmp_path / "sessions" / "g"
    old = sessions_mod.build_folder(group / "sess-old")
    fresh = sessions_mod.build_folder(group / "sess-new")
    long_ago = time.time() - sessions_mod.STALE_STAGING - 10
    os.utime(old, (long_ago, long_ago))
    removed = {e.name: sessions_mod.remove_stale_staging(e) for e in os.scandir(group)}
    assert removed == {old.name: True, fresh.name: False}
    assert [p.name for p in group.iterdir()] == [fresh.name]


@pytest.mark.parametrize("content", ['{"x": NaN}', '{"x": [1, Infinity]}', {"x": float("-inf")}])
def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path: Path,
                                                                    content) -> None:
    """Every way in (CLI ``--json``, the API, a library caller) ends here: NaN stored
    would make the row unreadable JSON for every agent."""
    with pytest.raises(MessageError, match="NaN or Infinity"):
        sessions_mod.prepare_message(content, 1 << 20)


@pytest.mark.parametrize("mode, chat, thread", [
    ("shared", MessagingGroup("slack", "C1"), "t1"),
    ("per-thread", MessagingGroup("slack", "C1"), "t1"),
    ("agent-shared", None, None),
])
def test_a_new_sessions_first_wake_finds_its_route_written(env, mode, chat, thread):
    """The folder is built with its default route, and the first message brings the
    chat's destination: the wake that follows (``write_routing``) has nothing to write
    (each write there was a journaled commit on a new session's way to its answer)."""
    s, _, _ = env
    row = s.resolve("g", chat, thread, mode)
    db = s.paths(row).inbound_db
    route = inbound.read_routing(db)
    assert route is not None
    assert (route["channel_type"], route["platform_id"], route["thread_id"]) == s.routing_of(row)
    s.write_message(row, {"text": "hi"}, routing=s.routing_of(row))
    routing = s.routing_of(row)
    assert inbound.sync_routing(db, routing, s._destinations(row, routing)) is False
    assert query(db, "SELECT COUNT(*) FROM messages_in") == [(1,)]


def test_a_new_folders_databases_are_whole_and_journal_free(tmp_path):
    """Built without a rollback journal (nobody sees them before the rename): whole,
    no journal file left, and every later connection writes with ``DELETE``."""
    paths = sessions_mod.create_folder(tmp_path, "g", "s1")
    for db in (paths.inbound_db, paths.outbound_db):
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
        assert not db.with_name(db.name + "-journal").exists()
        with closing(schema.connect(db)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sorted(p.name for p in paths.root.iterdir()) == [
        "inbound.db", "inbox", "outbound.db", "outbox"]
