"""The agent-side library (agent/sessionlib.py) and its inotify wake-up (agent/inotify.py).

Real SQLite files, real inotify on a real directory, the README's example agent as a
real subprocess. "Woken by inotify" is shown by setting every other way of noticing
(the fallback poll, the safety poll) to minutes and getting the answer in a second.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from orchestrator.agent.decide import commit_ended, next_due
from orchestrator.agent.sessionlib import SessionFolder
from orchestrator.contract import inotify, layout, schema
from tests.support.helpers import REPO, wait_for

T0 = schema.parse_ts("2026-01-01 12:00:00")


def make_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "s1"
    folder.mkdir()
    schema.init_inbound(folder / layout.INBOUND_DB)
    return folder


def insert(folder: Path, mid: str, text: str = "hi", **cols: object) -> None:
    with schema.opened(folder / layout.INBOUND_DB) as conn, schema.transaction(conn):
        top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
        row = {"id": mid, "seq": top + 2, "kind": "chat", "timestamp": schema.now_ts(),
               "content": json.dumps({"text": text}), **cols}
        names = ", ".join(f'"{k}"' for k in row)
        conn.execute(f"INSERT INTO messages_in ({names}) VALUES ({', '.join('?' * len(row))})",
                     tuple(row.values()))


def outbound_rows(folder: Path, sql: str) -> list[tuple]:
    with schema.opened(folder / layout.OUTBOUND_DB, readonly=True) as conn:
        return [tuple(row) for row in conn.execute(sql)]


# --- pure -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,name,expected", [
    (inotify.IN_MODIFY, "inbound.db", True),
    (inotify.IN_DELETE, "inbound.db-journal", True),
    (inotify.IN_MOVED_TO, "inbound.db", True),
    (inotify.IN_MODIFY, "outbound.db", False),  # the agent's own writes
    (inotify.IN_DELETE, "outbound.db-journal", False),
    (inotify.IN_ATTRIB, ".heartbeat", False),
    (inotify.IN_CREATE, "outbox", False),
    (inotify.IN_Q_OVERFLOW, "", True),  # events lost: look
    (inotify.IN_DELETE_SELF, "", True),
    (inotify.IN_IGNORED, "", True),
])
def test_which_events_wake(mask: int, name: str, expected: bool) -> None:
    names = frozenset({"inbound.db", "inbound.db-journal"})
    assert inotify.wakes(mask, name, names) is expected


@pytest.mark.parametrize("mask,name,expected", [
    (inotify.IN_DELETE, "inbound.db-journal", True),  # the host's commit is over
    (inotify.IN_CREATE, "inbound.db-journal", False),  # a commit begins: too early
    (inotify.IN_MODIFY, "inbound.db-journal", False),
    (inotify.IN_MODIFY, "inbound.db", False),  # its pages, under the host's lock
    (inotify.IN_CLOSE_WRITE, "inbound.db", True),  # the host closed it after writing
    (inotify.IN_MOVED_TO, "inbound.db", True),  # replaced
    (inotify.IN_CREATE, "inbound.db", True),
    (inotify.IN_ATTRIB, "inbound.db", True),
    (inotify.IN_MODIFY, "outbound.db", False),  # the agent's own writes
    (inotify.IN_DELETE, "outbound.db-journal", False),
    (inotify.IN_ATTRIB, ".heartbeat", False),
    (inotify.IN_Q_OVERFLOW, "", True),  # events lost: look
    (inotify.IN_DELETE_SELF, "", True),
    (inotify.IN_MOVE_SELF, "", True),
    (inotify.IN_IGNORED, "", True),
])
def test_which_events_end_a_commit(mask: int, name: str, expected: bool) -> None:
    assert commit_ended(mask, name) is expected


def test_parse_events_reads_packed_structs() -> None:
    def event(mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name)) if name else b""
        return inotify._HEADER.pack(1, mask, 0, len(padded)) + padded

    buf = event(2, b"inbound.db") + event(0x4000, b"") + event(0x200, b"inbound.db-journal"[:15])
    assert inotify.parse_events(buf) == [(2, "inbound.db"), (0x4000, ""),
                                         (0x200, "inbound.db-jour")]


@pytest.mark.parametrize("rows,acked,expected", [
    ([], set(), None),
    ([("a", "pending", "chat", None)], set(), None),  # due now: nothing to wait for
    ([("a", "pending", "chat", "2026-01-01 12:00:05")], set(), 5),
    ([("a", "pending", "chat", "2026-01-01 12:00:05"),
      ("b", "pending", "chat", "2026-01-01 12:00:02")], set(), 2),
    ([("a", "pending", "chat", "2026-01-01 12:00:02")], {"a"}, None),  # acked: not ours
    ([("a", "completed", "chat", "2026-01-01 12:00:02")], set(), None),
    ([("a", "pending", "system", "2026-01-01 12:00:02")], set(), None),
    ([("a", "pending", "chat", "2026-01-01 11:59:00")], set(), None),  # past
    ([("a", "pending", "chat", "garbage")], set(), None),  # unparsable counts as due
])
def test_next_due(rows: list[tuple], acked: set[str], expected: int | None) -> None:
    dicts = [dict(zip(("id", "status", "kind", "process_after"), r, strict=True)) for r in rows]
    want = None if expected is None else T0 + timedelta(seconds=expected)
    assert next_due(dicts, acked, T0) == want


# --- inotify on a real folder ---------------------------------------------------------------


def test_folder_watch_wakes_on_inbound_commits_only(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    schema.init_outbound(folder / layout.OUTBOUND_DB)
    watch = inotify.open_watch(folder, frozenset({"inbound.db", "inbound.db-journal"}))
    assert watch is not None
    try:
        watch.drain()
        with schema.opened(folder / layout.OUTBOUND_DB) as conn, schema.transaction(conn):
            conn.execute("INSERT INTO processing_ack VALUES ('x', 'processing', 'now')")
        (folder / ".heartbeat").touch()
        assert watch.wait(0.2) is False  # the agent's own files never wake it
        insert(folder, "m2")
        assert watch.wait(5.0) is True
        assert watch.wait(0.05) is False  # one commit = one wake-up: the burst was drained
    finally:
        watch.close()


def test_a_commit_in_progress_does_not_wake_its_end_does(tmp_path: Path) -> None:
    """The agent sleeps through a host transaction's first events (its look would find
    the old rows or the host's lock) and wakes at its commit, which it then reads."""
    folder = make_folder(tmp_path)
    with SessionFolder(folder, wake="inotify", safety_poll=600) as session:
        assert session.watching
        conn = sqlite3.connect(folder / layout.INBOUND_DB, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) "
                         "VALUES ('m2', 2, 'chat', ?, '{\"text\": \"hi\"}')",
                         (schema.now_ts(),))
            assert (folder / "inbound.db-journal").exists()  # the host is mid-commit
            assert session.wait_for_change(0.3) is False
            conn.execute("COMMIT")
        finally:
            conn.close()
        assert session.wait_for_change(5.0) is True
        assert [m.id for m in session.pending()[0]] == ["m2"]


def test_open_watch_refuses_what_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    assert inotify.open_watch(tmp_path / "file", frozenset()) is None
    assert inotify.open_watch(tmp_path / "link", frozenset()) is None
    assert inotify.open_watch(tmp_path / "missing", frozenset()) is None


# --- SessionFolder -----------------------------------------------------------------------


def blocked_in_select(thread: threading.Thread) -> bool:
    """The thread sleeps in select/poll, as the kernel reports it (its task's state and
    wait channel): an observable "it is blocked", not a pause that hopes it is."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = (task / "wchan").read_text()
    except (OSError, IndexError):
        return False
    return state == "S" and ("poll" in wchan or "select" in wchan)


def test_wait_for_work_is_woken_by_inotify_not_the_poll(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    with SessionFolder(folder, wake="inotify", poll_interval=600, safety_poll=600) as session:
        assert session.watching
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(session.wait_for_work(30)))
        waiter.start()
        # it is blocked (a row written before would be found without any wake-up)
        wait_for(lambda: blocked_in_select(waiter), message="the waiter blocked in select")
        t0 = time.monotonic()
        insert(folder, "m2")
        waiter.join(30)
        assert [m.id for m in got[0]] == ["m2"]
        assert time.monotonic() - t0 < 5  # far below the 600 s polls


def test_a_watch_started_late_misses_no_commit(tmp_path: Path) -> None:
    """recover(watch=False) (the reference agent's cold start): no watch yet, so the
    commit made now raises no event; the first wait that finds nothing to do sets up
    the watch and looks again, and later commits wake it through inotify alone."""
    folder = make_folder(tmp_path)
    with SessionFolder(folder, wake="inotify", poll_interval=600, safety_poll=600) as session:
        pass  # outbound.db and outbox/ exist now, as after any earlier agent
    session = SessionFolder(folder, wake="inotify", poll_interval=600, safety_poll=600)
    try:
        session.recover(watch=False)
        assert not session.watching
        insert(folder, "m2")
        assert [m.id for m in session.wait_for_work(30)] == ["m2"]
        assert not session.watching  # work was due: the watch waits until there is none
        session.ack("m2", "completed")
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(session.wait_for_work(30)))
        waiter.start()
        wait_for(lambda: session.watching, 10, message="the watch set up by the wait")
        insert(folder, "m4")
        t0 = time.monotonic()
        waiter.join(30)
        assert [m.id for m in got[0]] == ["m4"]
        assert time.monotonic() - t0 < 5  # inotify, not the 600 s polls
    finally:
        session.close()


def test_wait_for_work_wakes_by_itself_at_process_after(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    due = schema.after(0.4)
    insert(folder, "m2", process_after=due)
    with SessionFolder(folder, wake="inotify", safety_poll=600) as session:
        t0 = time.monotonic()
        assert [m.id for m in session.wait_for_work(30)] == ["m2"]
        # never before its time (measured from the row, not from the set-up, which a
        # loaded machine may make slow), and by itself, long before the safety poll
        assert schema.utcnow() >= schema.parse_ts(due)
        assert time.monotonic() - t0 < 5


def test_interrupt_ends_the_wait_and_poll_mode_polls(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    with SessionFolder(folder, wake="poll", poll_interval=0.05) as session:
        assert not session.watching
        threading.Timer(0.1, session.interrupt).start()
        assert session.wait_for_work(30) == []
        insert(folder, "m2")
        assert [m.id for m in session.wait_for_work(5)] == ["m2"]
    with pytest.raises(ValueError, match="wake must be one of"):
        SessionFolder(folder, wake="sometimes")


def test_recover_looks_up_only_the_folders_left_in_outbox(tmp_path: Path) -> None:
    """Reply folders still in outbox/ whose row was written stay, the others go; more
    folders than one query's parameters (chunked), among many more written rows."""
    folder = make_folder(tmp_path)
    schema.init_outbound(folder / layout.OUTBOUND_DB)
    with schema.opened(folder / layout.OUTBOUND_DB) as conn, schema.transaction(conn):
        conn.executemany("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                         "VALUES (?, ?, 'now', 'chat', '{}')",
                         [(f"out-{i}", 2 * i + 1) for i in range(0, 3000, 2)])
    for i in range(1200):
        (folder / "outbox" / f"out-{i}").mkdir(parents=True)
    (folder / "outbox" / "keep.txt").write_text("not a reply folder")
    with SessionFolder(folder, wake="poll"):
        pass
    left = sorted(int(p.name[4:]) for p in (folder / "outbox").glob("out-*"))
    assert left == list(range(0, 1200, 2))
    assert (folder / "outbox" / "keep.txt").exists()


def test_claim_reply_with_files_and_recover(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    insert(folder, "m2", "one")
    insert(folder, "m4", "two")
    session = SessionFolder(folder)
    assert session.recover() == 0
    m2, m4 = session.wait_for_work(5)
    session.claim(m2)
    session.claim(m4)
    out_id = session.reply(m2, "answer", files={"a.txt": b"A"})
    assert (folder / "outbox" / out_id / "a.txt").read_bytes() == b"A"
    assert outbound_rows(folder, "SELECT id, seq, in_reply_to, content FROM messages_out") == [
        (out_id, 5, "m2", json.dumps({"text": "answer", "files": ["a.txt"]}))]
    with pytest.raises(ValueError, match="unsafe outbox file name"):
        session.reply(m4, "x", files={"../evil": b"x"})
    assert len(outbound_rows(folder, "SELECT id FROM messages_out")) == 1  # nothing half-done
    (folder / "outbox" / "out-orphan").mkdir()  # files of a reply whose row never came
    session.close()
    # a crash: m4 is still claimed; the next agent drops the claim and the orphan folder
    again = SessionFolder(folder)
    assert again.recover() == 1
    assert [m.id for m in again.wait_for_work(5)] == ["m4"]
    assert not (folder / "outbox" / "out-orphan").exists()
    assert outbound_rows(folder, "SELECT message_id, status FROM processing_ack") == [
        ("m2", "completed")]
    again.close()


def replied(folder: Path) -> list[tuple]:
    """The reply rows, or nothing while the agent is still creating outbound.db."""
    try:
        return outbound_rows(folder, "SELECT id, content FROM messages_out")
    except sqlite3.OperationalError:
        return []


def _readme_agent() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"### Writing your own agent.*?```python\n(.*?)```", text, re.S)
    assert match, "README has no 'Writing your own agent' example"
    return match.group(1)


def test_the_readme_agent_answers_with_a_file(tmp_path: Path) -> None:
    code = _readme_agent()
    assert len(code.strip().splitlines()) <= 20
    folder = make_folder(tmp_path)
    script = tmp_path / "my_agent.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], cwd=REPO,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (folder / ".heartbeat").exists(), 10, message="agent started")
        insert(folder, "m2", "ping")
        rows = wait_for(lambda: replied(folder), 10, message="the README agent's reply")
        out_id, content = rows[0]
        assert json.loads(content)["text"] == "you said: ping"
        assert (folder / "outbox" / out_id / "reply.txt").read_text() == "ping"
        assert outbound_rows(folder, "SELECT message_id, status FROM processing_ack") == [
            ("m2", "completed")]
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


@pytest.mark.parametrize(("argv", "folder"), [
    ([], "."), (["--workspace", "/w"], "/w"), (["--workspace=/w"], "/w"),
    (["--poll-interval", "1", "--workspace", "/x", "--wake", "poll"], "/x"),
    (["--workspace"], "."),  # argparse reports it later
])
def test_the_early_heartbeat_finds_the_workspace(argv: list[str], folder: str) -> None:
    from orchestrator.agent import beat
    assert beat.workspace_of(argv) == folder


def test_the_early_heartbeat_touches_only_a_real_folder(tmp_path: Path) -> None:
    from orchestrator.agent import beat
    beat.early(["--workspace", str(tmp_path)])
    assert (tmp_path / ".heartbeat").is_file()
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    beat.early(["--workspace", str(tmp_path / "link")])  # not followed: nothing happens
    beat.early(["--workspace", str(tmp_path / "missing")])
    (tmp_path / "elsewhere" / ".heartbeat").symlink_to(tmp_path / "target")
    beat.early(["--workspace", str(tmp_path / "elsewhere")])  # a planted link is replaced
    assert not (tmp_path / "target").exists()
    assert (tmp_path / "elsewhere" / ".heartbeat").is_file()
    assert not (tmp_path / "elsewhere" / ".heartbeat").is_symlink()


def test_handled_waits_for_a_change_and_misses_nothing(tmp_path: Path) -> None:
    """``wait_for_work(handled=True)``: after answering, the agent waits for the next
    commit instead of reading at once; a commit made while it answered is found at
    once (its event was queued), and a message due later still bounds the wait."""
    folder = make_folder(tmp_path)
    insert(folder, "m2")
    insert(folder, "m4", process_after=schema.after(1.5))
    with SessionFolder(folder, wake="inotify", poll_interval=600, safety_poll=600) as session:
        assert [m.id for m in session.wait_for_work(30)] == ["m2"]
        insert(folder, "m6")  # arrives while m2 is answered
        session.reply(session.pending()[0][0], "done")
        t0 = time.monotonic()
        assert [m.id for m in session.wait_for_work(30, handled=True)] == ["m6"]
        assert time.monotonic() - t0 < 1  # the queued event, not a poll
        session.reply(session.pending()[0][0], "done")
        got = session.wait_for_work(30, handled=True)  # nothing new: m4's time ends the wait
        assert [m.id for m in got] == ["m4"]
        assert time.monotonic() - t0 < 5  # long before the 600 s safety poll
