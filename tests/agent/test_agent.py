"""The reference agent against the session-folder contract (docs/contract.md).

Pure decisions are table tests; behaviour is tested on real SQLite files with
the agent as a real subprocess. Nothing sleeps and hopes: every wait is a
condition polled against a deadline, and every "does not happen" is an
observation over an explicit window.

The host's store module is written elsewhere, so session folders here are
built with ``schema.init_inbound`` and plain SQL (even seqs into messages_in).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pytest

from orchestrator.agent import agent as agent_mod
from orchestrator.agent import decide
from orchestrator.contract import layout, schema
from tests.support.helpers import REPO, wait_for

UTC = timezone.utc


# --- helpers ----------------------------------------------------------------


def holds_for(cond: Callable[[], Any], what: str, seconds: float, interval: float = 0.02) -> None:
    """Assert ``cond`` stays truthy during the whole window (a negative observation)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cond(), f"{what} stopped holding"
        time.sleep(interval)


@dataclass
class Session:
    root: Path

    @property
    def paths(self) -> layout.SessionPaths:
        return layout.SessionPaths(self.root)

    def init_inbound(self) -> None:
        schema.init_inbound(self.paths.inbound_db)

    def insert(self, msg_id: str, seq: int, content: Any = None, *, text: str | None = None,
               **cols: Any) -> None:
        """Insert a messages_in row like the host would (even seq, JSON content)."""
        assert seq % 2 == 0
        if content is None:
            content = json.dumps({"text": text if text is not None else msg_id})
        row = {"id": msg_id, "seq": seq, "kind": "chat", "timestamp": schema.now_ts(),
               "content": content, **cols}
        names = ", ".join(f'"{k}"' for k in row)
        marks = ", ".join("?" for _ in row)
        conn = sqlite3.connect(self.paths.inbound_db)
        try:
            conn.execute(f"INSERT INTO messages_in ({names}) VALUES ({marks})", list(row.values()))
            conn.commit()
        finally:
            conn.close()

    def _out(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        if not self.paths.outbound_db.exists():
            return []
        try:
            with schema.opened(self.paths.outbound_db, readonly=True) as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # file created, schema not yet
            return []

    def acks(self) -> dict[str, str]:
        return {r["message_id"]: r["status"] for r in self._out("SELECT * FROM processing_ack")}

    def ack_rows(self) -> dict[str, sqlite3.Row]:
        return {r["message_id"]: r for r in self._out("SELECT * FROM processing_ack")}

    def replies(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._out("SELECT * FROM messages_out ORDER BY seq")]

    def reply_to(self, msg_id: str) -> dict[str, Any] | None:
        found = [r for r in self.replies() if r["in_reply_to"] == msg_id]
        assert len(found) <= 1, f"more than one reply to {msg_id}"
        return found[0] if found else None

    def heartbeat_mtime(self) -> int | None:
        try:
            return self.paths.heartbeat.stat().st_mtime_ns
        except FileNotFoundError:
            return None


@dataclass
class AgentProc:
    proc: subprocess.Popen
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent did not exit within {timeout}s:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def session(tmp_path: Path) -> Session:
    root = tmp_path / "sessions" / "group" / "sess"
    root.mkdir(parents=True)
    s = Session(root)
    s.init_inbound()
    return s


@pytest.fixture
def run_agent(tmp_path: Path):
    """Start ``python -m orchestrator.agent --workspace DIR ...`` as a real subprocess."""
    procs: list[AgentProc] = []

    def start(session: Session, *args: str, isolated: bool = False,
              env: dict[str, str] | None = None) -> AgentProc:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH")) if p
        )
        full_env.update(env or {})
        # -S: no site-packages, like a container with nothing but python3.
        cmd = [sys.executable, *(["-S"] if isolated else []), "-m", "orchestrator.agent",
               "--workspace", str(session.root), "--poll-interval", "0.02", *args]
        stderr_path = tmp_path / f"agent-{len(procs)}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=session.root, env=full_env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        handle = AgentProc(proc, stderr_path)
        procs.append(handle)
        return handle

    yield start
    for handle in procs:
        if handle.proc.poll() is None:
            handle.proc.kill()
            handle.proc.wait(timeout=10)


def content_of(reply: dict[str, Any]) -> dict[str, Any]:
    return json.loads(reply["content"])


def file_state(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# --- pure decisions -----------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("max_in", "max_out", "expected"),
    [
        (None, None, 1),
        (0, None, 1),
        (2, None, 3),
        (None, 1, 3),
        (None, 7, 9),
        (2, 3, 5),
        (8, 5, 9),
        (10, 11, 13),
        (4, 1, 5),
    ],
)
def test_next_odd_seq(max_in: int | None, max_out: int | None, expected: int) -> None:
    assert decide.next_odd_seq(max_in, max_out) == expected


@pytest.mark.parametrize(
    ("process_after", "due"),
    [
        (None, True),
        ("", True),
        ("2025-01-01 11:59:59", True),  # SQLite datetime('now') shape: UTC, no zone
        ("2025-01-01 12:00:00", True),  # exactly now
        ("2025-01-01 12:00:00.001", False),
        ("2025-01-01 12:00:01", False),
        ("2025-01-01T12:00:01Z", False),
        ("2025-01-01T20:00:00+09:00", True),  # 11:00 UTC
        ("2025-01-01T13:00:00+00:00", False),
        ("not a time", True),  # unreadable must not block the queue forever
    ],
)
def test_is_due(process_after: str | None, due: bool) -> None:
    assert decide.is_due(process_after, NOW) is due


def _row(msg_id: str, seq: int, status: str = "pending", kind: str = "chat",
         process_after: str | None = None) -> dict[str, Any]:
    return {"id": msg_id, "seq": seq, "status": status, "kind": kind, "process_after": process_after}


@pytest.mark.parametrize(
    ("rows", "acked", "expected"),
    [
        ([], set(), []),
        ([_row("b", 4), _row("a", 2)], set(), ["a", "b"]),
        ([_row("a", 2, kind="system"), _row("b", 4)], set(), ["b"]),
        ([_row("a", 2), _row("b", 4)], {"a"}, ["b"]),
        ([_row("a", 2, status="completed"), _row("b", 4, status="failed"),
          _row("c", 6, status="paused"), _row("d", 8)], set(), ["d"]),
        ([_row("a", 2, process_after="2025-01-01 12:00:05"),
          _row("b", 4, process_after="2025-01-01 11:00:00")], set(), ["b"]),
    ],
)
def test_select_work(rows: list[dict[str, Any]], acked: set[str], expected: list[str]) -> None:
    assert [r["id"] for r in decide.select_work(rows, acked, NOW)] == expected


@pytest.mark.parametrize(
    ("raw", "text", "attachments"),
    [
        ('{"text": "hi"}', "hi", []),
        ('"plain"', "plain", []),
        ("{}", "", []),
        ('{"text": null}', "", []),
        ('{"text": "x", "attachments": null}', "x", []),
        ('{"text": "x", "attachments": [{"name": "a.png", "path": "inbox/m/a.png", "size": 3}]}',
         "x", [("a.png", "inbox/m/a.png")]),
        ('{"attachments": [{"path": "inbox/m/b.txt"}]}', "", [("b.txt", "inbox/m/b.txt")]),
        ('{"attachments": [{"localPath": "inbox/m/c.txt"}]}', "", [("c.txt", "inbox/m/c.txt")]),
        ('{"attachments": [{"name": 5}]}', "", [("", "")]),
        (b'{"text": "bytes"}', "bytes", []),
    ],
)
def test_parse_content(raw: Any, text: str, attachments: list[tuple[str, str]]) -> None:
    parsed = decide.parse_content(raw)
    assert parsed.text == text
    assert [(a.name, a.path) for a in parsed.attachments] == attachments


@pytest.mark.parametrize(
    "raw",
    ["not json{", "", "[1, 2]", "42", "null", '{"text": 5}', '{"attachments": "a.png"}',
     '{"attachments": ["a.png"]}', None, 3],
)
def test_parse_content_malformed(raw: Any) -> None:
    with pytest.raises(decide.MalformedContent):
        decide.parse_content(raw)


@pytest.mark.parametrize(
    ("text", "files", "refused", "expected"),
    [
        ("echo: hi", None, None, {"text": "echo: hi"}),
        ("echo: hi", [], [], {"text": "echo: hi"}),
        ("echo: hi", ["a.png"], None, {"text": "echo: hi", "files": ["a.png"]}),
        ("echo: ", ["a", "b"], ["c: symlink"],
         {"text": "echo: ", "files": ["a", "b"], "refused": ["c: symlink"]}),
        ("echo: héllo", None, None, {"text": "echo: héllo"}),
    ],
)
def test_reply_content(text: str, files: list[str] | None, refused: list[str] | None,
                       expected: dict[str, Any]) -> None:
    assert json.loads(decide.reply_content(text, files, refused)) == expected


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a.png", True), ("my photo.jpg", True), ("", False), (".", False), ("..", False),
     (".hidden", False), ("a/b", False), ("a\\b", False), ("a\x00b", False), (None, False),
     ("x" * 256, False)],
)
def test_safe_file_name(name: Any, ok: bool) -> None:
    assert (decide.safe_file_name(name) is not None) is ok


@pytest.mark.parametrize(
    ("path", "expected"),
    [("inbox/m1/a.png", "inbox/m1/a.png"), ("a.png", "a.png"), ("/etc/passwd", None),
     ("../x", None), ("inbox/../../x", None), ("", None), (".", None), ("a\x00b", None),
     (None, None)],
)
def test_check_relative_path(path: Any, expected: str | None) -> None:
    result = decide.check_relative_path(path)
    assert (str(result) if result is not None else None) == expected
    if result is not None:
        assert isinstance(result, PurePosixPath)


def test_new_out_id_is_fresh_and_valid() -> None:
    ids = {decide.new_out_id() for _ in range(100)}
    assert len(ids) == 100
    for out_id in ids:
        assert layout.validate_id(out_id) == out_id


def test_parse_args_defaults_and_overrides() -> None:
    opts = agent_mod.parse_args([])
    assert opts == agent_mod.Options(workspace=".", poll_interval=0.1, work_seconds=0.0,
                                     heartbeat_interval=1.0, exit_when_idle=None,
                                     hang_on=None, crash_on=None)
    opts = agent_mod.parse_args(["--workspace", "/workspace", "--work-seconds", "2",
                                 "--exit-when-idle", "5", "--hang-on", "h", "--crash-on", "c"])
    assert (opts.workspace, opts.work_seconds, opts.exit_when_idle, opts.hang_on, opts.crash_on) == (
        "/workspace", 2.0, 5.0, "h", "c")
    with pytest.raises(SystemExit):
        agent_mod.parse_args(["--poll-interval", "0"])


@pytest.mark.parametrize("argv", [
    [],
    ["--workspace", "/w", "--wake", "poll", "--poll-interval", "0.5"],
    ["--workspace=/w", "--exit-when-idle=0", "--hang-on", "h h", "--crash-on=c"],
    ["--safety-poll", "600", "--heartbeat-interval", "2", "--work-seconds", "0"],
])
def test_quick_parse_agrees_with_argparse(argv: list[str]) -> None:
    assert agent_mod.quick_parse(argv) == agent_mod._argparse(argv)


@pytest.mark.parametrize("argv", [
    ["--help"], ["-h"], ["--work", "1"],  # an abbreviation: argparse says it is ambiguous
    ["--workspace"], ["--wake", "sometimes"], ["--poll-interval", "0"],
    ["--poll-interval", "x"], ["--hang-on", "-x"], ["stray"], ["--unknown", "1"],
])
def test_quick_parse_leaves_anything_unusual_to_argparse(argv: list[str]) -> None:
    assert agent_mod.quick_parse(argv) is None


# modules a cold start of the agent must not load (each is milliseconds of every start;
# ctypes comes later, once the first due work is answered: SessionFolder.start_watch)
# (re, enum and json: ~6 ms together, issue 28; orchestrator.contract.layout imports re)
COLD_START_FORBIDDEN = {"argparse", "ctypes", "dataclasses", "enum", "inspect", "json",
                        "loguru", "orchestrator.agent.files", "orchestrator.contract.inotify",
                        "orchestrator.contract.layout",
                        "pathlib", "re", "select", "shutil", "signal", "struct", "threading",
                        "typing", "uuid"}


def test_agent_cold_start_imports_nothing_heavy(session: Session) -> None:
    """From its start to its first reply, the agent (run as the local runtime runs it)
    imports none of the modules that used to be most of a cold round trip; ctypes
    (inotify) follows the reply."""
    session.insert("m2", 2, text="hi")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-S", "-P", "-X", "importtime",
         str(REPO / "orchestrator" / "agent" / "__main__.py"), "--workspace", str(session.root),
         "--exit-when-idle", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert session.reply_to("m2") is not None
    before, replied, after = done.stderr.partition(" completed")
    assert replied, done.stderr

    def imported(text: str) -> set[str]:
        return {line.rsplit("|", 1)[1].strip() for line in text.splitlines()
                if line.startswith("import time:") and "|" in line}

    assert not imported(before) & COLD_START_FORBIDDEN, sorted(imported(before))
    assert "ctypes" in imported(after)  # the watch, set up once the due work was answered


def test_agent_imports_only_stdlib() -> None:
    code = (
        "import sys, orchestrator.agent, orchestrator.agent.agent\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
        " - {'orchestrator', '__main__'})\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- the agent as a real process ---------------------------------------------


def test_echo_reply_odd_seq_above_both_tables(session: Session, run_agent) -> None:
    session.insert("m1", 2, text="hi", platform_id="chan-1", channel_type="slack", thread_id="t-9")
    session.insert("m0", 8, text="old", status="completed")
    schema.init_outbound(session.paths.outbound_db)
    with schema.opened(session.paths.outbound_db) as conn:
        conn.execute("INSERT INTO messages_out (id, seq, timestamp, kind, content) "
                     "VALUES ('prev', 5, datetime('now'), 'chat', '{}')")
    before = datetime.now(UTC)
    agent = run_agent(session)

    reply = wait_for(lambda: session.reply_to("m1"), 10.0, message="reply to m1")
    assert reply["seq"] == 9  # next odd above max(8 in, 5 out)
    assert reply["kind"] == "chat"
    assert (reply["platform_id"], reply["channel_type"], reply["thread_id"]) == ("chan-1", "slack", "t-9")
    assert content_of(reply) == {"text": "echo: hi"}
    assert reply["deliver_after"] is None
    assert layout.validate_id(reply["id"])
    stamp = schema.parse_ts(reply["timestamp"])
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert session.acks() == {"m1": "completed"}
    assert not session.paths.outbox_dir(reply["id"]).exists()  # no files, no folder

    session.insert("m2", 10, text="again")
    reply2 = wait_for(lambda: session.reply_to("m2"), 10.0, message="reply to m2")
    assert reply2["seq"] == 11
    assert content_of(reply2) == {"text": "echo: again"}
    assert "m1 seq=2" in agent.stderr() and "m2 seq=10" in agent.stderr()
    assert agent.alive()


def test_attachment_copied_to_outbox_before_row(session: Session, run_agent, tmp_path: Path) -> None:
    inbox = session.paths.inbox_dir("m1")
    inbox.mkdir(parents=True)
    (inbox / "a.png").write_bytes(b"\x89PNG fake bytes")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (inbox / "link.png").symlink_to(secret)
    (session.root / "inbox" / "linkdir").symlink_to(tmp_path)
    content = json.dumps({"text": "pics", "attachments": [
        {"name": "a.png", "path": "inbox/m1/a.png", "size": 15},
        {"name": "link.png", "path": "inbox/m1/link.png"},
        {"name": "up.txt", "path": "../secret.txt"},
        {"name": "abs.txt", "path": str(secret)},
        {"name": "via.txt", "path": "inbox/linkdir/secret.txt"},
        {"name": "../evil", "path": "inbox/m1/a.png"},
        {"name": "gone.png", "path": "inbox/m1/gone.png"},
    ]})
    session.insert("m1", 2, content)
    run_agent(session)

    reply = wait_for(lambda: session.reply_to("m1"), 10.0, message="reply to m1")
    body = content_of(reply)
    assert body["text"] == "echo: pics"
    assert body["files"] == ["a.png"]
    assert len(body["refused"]) == 6
    out_dir = session.paths.outbox_dir(reply["id"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png"]
    assert (out_dir / "a.png").read_bytes() == b"\x89PNG fake bytes"
    assert not (out_dir / "a.png").is_symlink()
    assert session.acks() == {"m1": "completed"}


def test_skips_system_acked_and_non_pending_rows(session: Session, run_agent) -> None:
    schema.init_outbound(session.paths.outbound_db)
    with schema.opened(session.paths.outbound_db) as conn:
        conn.execute("INSERT INTO processing_ack VALUES ('m2', 'completed', '2020-01-01 00:00:00')")
        conn.execute("INSERT INTO processing_ack VALUES ('m7', 'failed', '2020-01-01 00:00:00')")
    session.insert("m1", 2, kind="system")
    session.insert("m2", 4)  # already acked completed
    session.insert("m3", 6, trigger=0)  # context only
    session.insert("m4", 8, text="go")
    session.insert("m5", 10, status="completed")
    session.insert("m6", 12, status="paused")
    session.insert("m7", 14)  # already acked failed
    agent = run_agent(session, "--exit-when-idle", "0.3")
    assert agent.wait() == 0, agent.stderr()

    replies = session.replies()
    assert [r["in_reply_to"] for r in replies] == ["m4"]
    assert content_of(replies[0]) == {"text": "echo: go"}
    acks = session.ack_rows()
    assert {k: v["status"] for k, v in acks.items()} == {
        "m2": "completed", "m3": "completed", "m4": "completed", "m7": "failed"}
    assert acks["m2"]["status_changed"] == "2020-01-01 00:00:00"  # untouched
    assert acks["m7"]["status_changed"] == "2020-01-01 00:00:00"


def test_process_after_waits_until_due(session: Session, run_agent) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    session.insert("now", 2)
    session.insert("later", 4, process_after=schema.format_ts(due))
    session.insert("past", 6, process_after=past)  # SQLite shape, no zone: UTC
    # A zone far from UTC: an agent reading these as local time gets them wrong.
    run_agent(session, env={"TZ": "Asia/Tokyo"})

    wait_for(lambda: session.acks().get("now") == "completed", 10.0, message="'now' completed")
    wait_for(lambda: session.acks().get("past") == "completed", 10.0, message="'past' completed")
    window = (due - datetime.now(UTC)).total_seconds() - 0.2
    assert window > 0, "machine too slow for this test's window"
    holds_for(lambda: "later" not in session.acks(), "'later' not yet claimed", window)

    wait_for(lambda: session.acks().get("later") == "completed", 10.0, message="'later' completed")
    acked_at = schema.parse_ts(session.ack_rows()["later"]["status_changed"])
    assert acked_at >= due - timedelta(milliseconds=1)  # timestamps have ms precision
    assert content_of(session.reply_to("later")) == {"text": "echo: later"}


def test_leftover_processing_acks_deleted_at_start(session: Session, run_agent) -> None:
    schema.init_outbound(session.paths.outbound_db)
    with schema.opened(session.paths.outbound_db) as conn:
        conn.execute("INSERT INTO processing_ack VALUES ('m1', 'processing', '2020-01-01 00:00:00')")
        conn.execute("INSERT INTO processing_ack VALUES ('ghost', 'processing', '2020-01-01 00:00:00')")
        conn.execute("INSERT INTO processing_ack VALUES ('done', 'completed', '2020-01-01 00:00:00')")
    orphan = session.paths.outbox / "out-orphan"
    orphan.mkdir(parents=True)
    (orphan / "x.bin").write_bytes(b"x")
    session.insert("m1", 2, text="redo")
    agent = run_agent(session, "--exit-when-idle", "0.3")
    assert agent.wait() == 0, agent.stderr()

    assert session.acks() == {"m1": "completed", "done": "completed"}
    assert content_of(session.reply_to("m1")) == {"text": "echo: redo"}
    assert not orphan.exists()  # a crashed predecessor's unwritten reply files


def test_crash_on_exits_leaving_claim_then_successor_redoes_it(session: Session, run_agent) -> None:
    session.insert("m1", 2, text="please boom now")
    agent = run_agent(session, "--crash-on", "boom")
    assert agent.wait() == agent_mod.EXIT_CRASH
    assert session.acks() == {"m1": "processing"}
    assert session.replies() == []

    successor = run_agent(session, "--exit-when-idle", "0.3")
    assert successor.wait() == 0, successor.stderr()
    assert session.acks() == {"m1": "completed"}
    assert content_of(session.reply_to("m1")) == {"text": "echo: please boom now"}


def test_hang_on_claims_then_goes_silent(session: Session, run_agent) -> None:
    session.insert("m1", 2, text="freeze here")
    session.insert("m2", 4, text="after")
    agent = run_agent(session, "--hang-on", "freeze", "--heartbeat-interval", "0.05",
                      "--work-seconds", "0.5", "--exit-when-idle", "0.2")
    wait_for(lambda: session.acks().get("m1") == "processing", 10.0, message="m1 claimed")
    beat = wait_for(session.heartbeat_mtime, 10.0, message="heartbeat after the claim")
    holds_for(lambda: agent.alive() and session.heartbeat_mtime() == beat
              and "m2" not in session.acks() and session.replies() == [],
              "silence (no heartbeat, no work, no exit)", 0.6)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=3) == 0
    assert session.acks() == {"m1": "processing"}


def test_work_seconds_touches_heartbeat(session: Session, run_agent) -> None:
    session.insert("m1", 2, text="slow")
    run_agent(session, "--work-seconds", "1.0", "--heartbeat-interval", "0.1")
    wait_for(lambda: session.acks().get("m1") == "processing", 10.0, message="m1 claimed")
    seen: set[int] = set()

    def beats_while_processing() -> bool:
        if session.acks().get("m1") != "processing":
            raise AssertionError(f"work ended after only {len(seen)} heartbeat(s)")
        seen.add(session.heartbeat_mtime())
        return len(seen) >= 4

    wait_for(beats_while_processing, 5, message="heartbeats during work")
    wait_for(lambda: session.acks().get("m1") == "completed", 10.0, message="m1 completed")
    assert content_of(session.reply_to("m1")) == {"text": "echo: slow"}


def test_exit_when_idle_without_inbound_db(tmp_path: Path, run_agent) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    session = Session(root)
    agent = run_agent(session, "--exit-when-idle", "0.3", isolated=True)
    assert agent.wait() == 0, agent.stderr()
    assert session.paths.outbound_db.exists() and session.paths.outbox.is_dir()
    assert not session.paths.inbound_db.exists()  # waited; never created it


def test_waits_for_inbound_db_to_appear(tmp_path: Path, run_agent) -> None:
    root = tmp_path / "late"
    root.mkdir()
    session = Session(root)
    agent = run_agent(session, isolated=True)
    wait_for(lambda: session.paths.outbound_db.exists() and session.heartbeat_mtime(),
             10.0, message="agent started")
    session.init_inbound()
    session.insert("m1", 2, text="late")
    reply = wait_for(lambda: session.reply_to("m1"), 10.0, message="reply to m1")
    assert content_of(reply) == {"text": "echo: late"}
    assert agent.alive()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("busy", [False, True])
def test_signal_exits_promptly(session: Session, run_agent, signum: int, busy: bool) -> None:
    agent = run_agent(session, "--work-seconds", "60", "--heartbeat-interval", "5")
    if busy:
        session.insert("m1", 2, text="long job")
        wait_for(lambda: session.acks().get("m1") == "processing", 10.0, message="m1 claimed")
    else:
        wait_for(lambda: "started" in agent.stderr(), 10.0, message="agent started")
    sent = time.monotonic()
    agent.proc.send_signal(signum)
    assert agent.wait(timeout=3) == 0, agent.stderr()
    assert time.monotonic() - sent < 2
    assert session.replies() == []  # no half-done reply
    if busy:
        assert session.acks() == {"m1": "processing"}  # evidence left for the host


def test_malformed_content_fails_and_agent_keeps_running(session: Session, run_agent) -> None:
    session.insert("bad", 2, "not json{")
    session.insert("list", 4, "[1, 2]")
    session.insert("str", 6, '"plain"')
    session.insert("empty", 8, "{}")
    agent = run_agent(session)
    wait_for(lambda: len(session.acks()) == 4
             and "processing" not in session.acks().values(), 10.0, message="all four settled")
    acks = session.acks()
    assert acks == {"bad": "failed", "list": "failed", "str": "completed", "empty": "completed"}
    assert content_of(session.reply_to("bad"))["text"].startswith("error: ")
    assert content_of(session.reply_to("list"))["text"].startswith("error: ")
    assert content_of(session.reply_to("str")) == {"text": "echo: plain"}
    assert content_of(session.reply_to("empty")) == {"text": "echo: "}
    assert [r["seq"] for r in session.replies()] == [9, 11, 13, 15]

    session.insert("next", 10, text="still here")
    wait_for(lambda: session.reply_to("next"), 10.0, message="reply after the malformed ones")
    assert agent.alive()


def test_inbound_db_is_never_written(session: Session, run_agent) -> None:
    inbox = session.paths.inbox_dir("m2")
    inbox.mkdir(parents=True)
    (inbox / "f.txt").write_text("file")
    session.insert("m1", 2, text="one")
    session.insert("m2", 4, json.dumps({"text": "two", "attachments": [
        {"name": "f.txt", "path": "inbox/m2/f.txt"}]}))
    session.insert("m3", 6, "broken{")
    session.insert("m4", 8, trigger=0)
    session.insert("m5", 10, kind="system")
    before = file_state(session.paths.inbound_db)
    agent = run_agent(session, "--exit-when-idle", "0.3", isolated=True)
    assert agent.wait() == 0, agent.stderr()

    assert session.acks() == {"m1": "completed", "m2": "completed", "m3": "failed", "m4": "completed"}
    assert file_state(session.paths.inbound_db) == before
    assert sorted(p.name for p in session.root.iterdir()) == [
        ".heartbeat", "inbound.db", "inbox", "outbound.db", "outbox"]  # no journal left
