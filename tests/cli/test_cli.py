"""cli: driven in-process through main(argv); exit codes and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from orchestrator import DISTRIBUTION
from orchestrator.cli import commands as cli
from orchestrator.config.load import load_config, read_config
from orchestrator.config.render import render_default
from orchestrator.contract.layout import registry_path, session_paths
from orchestrator.host import inbound
from orchestrator.host.registry import Registry
from tests.support.fakes import FakeStdin
from tests.support.helpers import query


@pytest.fixture
def conf(tmp_path):
    """A config whose data_dir is inside tmp_path; extra TOML can be appended."""
    path = tmp_path / "config.toml"

    def write(extra: str = "") -> Path:
        path.write_text(f'data_dir = "data"\n{extra}')
        return path

    write()
    return write


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sessions_of(tmp_path):
    with Registry(registry_path(tmp_path / "data")) as reg:
        return reg.sessions()


def messages_of(tmp_path, row):
    return inbound.read_messages(session_paths(tmp_path / "data", row.agent_group_id,
                                               row.id).inbound_db)


# --- config errors: exit 2, one line, no traceback --------------------------------------------

BAD_CONFIGS = [
    pytest.param('bogus = 1\n', "unknown key bogus", id="unknown-top-level-key"),
    pytest.param('[lifecycle]\nidle = 1\n', "unknown key [lifecycle] idle", id="unknown-section-key"),
    pytest.param('[runtime]\nstop_grace = "soon"\n', "[runtime] stop_grace must be a number",
                 id="wrong-type"),
    pytest.param('[docker]\npids_limit = true\n', "[docker] pids_limit must be an integer",
                 id="bool-where-int"),
    pytest.param('[lifecycle]\nmax_tries = 0\n', "max_tries must be between 1 and 100",
                 id="out-of-range"),
    pytest.param('[watch]\nmode = "inotify"\n', "[watch] mode must be one of 'events', 'poll'",
                 id="bad-choice"),
    pytest.param('[lifecycle\nmax_tries = 3\n', "not valid TOML", id="invalid-toml"),
    pytest.param(None, "config file not found", id="missing-file"),
]


@pytest.mark.parametrize("command", [["status"], ["send", "--group", "g", "hi"], ["status", "--json"]])
@pytest.mark.parametrize("content, fragment", BAD_CONFIGS)
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, command, content, fragment):
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    code, out, err = run(capsys, *command, "--config", path)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith(f"orchestrator: error: {path}: ")
    assert fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing was created from a bad config


def test_argparse_errors_exit_2(capsys, conf):
    with pytest.raises(SystemExit) as info:
        cli.main(["send", "--config", str(conf()), "--group", "g", "--mode", "bogus", "x"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- init ------------------------------------------------------------------------------

def test_init_writes_defaults_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "config.toml"
    code, out, err = run(capsys, "init", "--config", path)
    assert (code, out.strip(), err) == (0, f"wrote {path}", "")
    assert path.read_text() == render_default()
    cfg = read_config(path)
    assert cfg == dataclasses.replace(load_config({}, tmp_path.resolve()), source=path)

    path.write_text("# edited by hand\n")
    code, out, err = run(capsys, "init", "--config", path)
    assert code == 2 and out == ""
    assert err == f"orchestrator: error: {path} already exists; use --force to overwrite it\n"
    assert path.read_text() == "# edited by hand\n"

    code, _, _ = run(capsys, "init", "--config", path, "--force")
    assert code == 0 and path.read_text() == render_default()


def test_init_into_a_missing_folder_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "init", "--config", tmp_path / "no" / "config.toml")
    assert code == 2 and err.count("\n") == 1 and "cannot write config" in err


# --- send ------------------------------------------------------------------------------

def test_send_creates_group_session_and_message(tmp_path, capsys, conf):
    code, out, err = run(capsys, "send", "--config", conf(), "--group", "main", "hello there")
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    assert out == f"{row.id}\n"
    assert row.agent_group_id == "main"
    with Registry(registry_path(tmp_path / "data")) as reg:
        assert reg.messaging_group(row.messaging_group_id) == ("cli", "local")
    (msg,) = messages_of(tmp_path, row)
    assert json.loads(msg["content"]) == {"text": "hello there"}
    assert (msg["seq"], msg["status"], msg["kind"], msg["trigger"]) == (2, "pending", "chat", 1)
    assert (msg["channel_type"], msg["platform_id"], msg["thread_id"]) == ("cli", "local", None)
    paths = session_paths(tmp_path / "data", "main", row.id)
    assert paths.inbox.is_dir() and paths.outbox.is_dir() and paths.outbound_db.is_file()


def test_send_twice_reuses_the_session(tmp_path, capsys, conf):
    _, first, _ = run(capsys, "send", "--config", conf(), "--group", "main", "one")
    _, second, _ = run(capsys, "send", "--config", conf(), "--group", "main", "two")
    assert first == second
    (row,) = sessions_of(tmp_path)
    assert [m["seq"] for m in messages_of(tmp_path, row)] == [2, 4]


def test_send_with_attachments(tmp_path, capsys, conf):
    a = tmp_path / "report.pdf"
    a.write_bytes(b"%PDF-1.4 binary \x00\xff")
    b = tmp_path / "sub" / "report.pdf"  # same name: kept apart
    b.parent.mkdir()
    b.write_bytes(b"second")
    code, out, err = run(capsys, "send", "--config", conf(), "--group", "main",
                         "--attach", a, "--attach", b, "see attached")
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    (msg,) = messages_of(tmp_path, row)
    content = json.loads(msg["content"])
    root = session_paths(tmp_path / "data", "main", row.id).root
    assert content["text"] == "see attached"
    assert [(e["name"], e["size"]) for e in content["attachments"]] == [
        ("report.pdf", len(a.read_bytes())), ("report-1.pdf", 6)]
    assert (root / content["attachments"][0]["path"]).read_bytes() == a.read_bytes()
    assert (root / content["attachments"][1]["path"]).read_bytes() == b"second"
    assert content["attachments"][0]["path"] == f"inbox/{msg['id']}/report.pdf"
    assert "data" not in content["attachments"][0]  # no base64 copy in the DB


def test_send_thread_and_mode(tmp_path, capsys, conf):
    c = conf()

    def send(*extra):
        code, out, err = run(capsys, "send", "--config", c, "--group", "g", *extra, "x")
        assert code == 0, err
        return out.strip()

    shared_t1 = send("--thread", "t1")
    shared_t2 = send("--thread", "t2")
    assert shared_t1 == shared_t2  # default mode 'shared': threads share the chat's session
    pt1 = send("--mode", "per-thread", "--thread", "t1")
    pt2 = send("--mode", "per-thread", "--thread", "t2")
    assert len({shared_t1, pt1, pt2}) == 3
    assert send("--mode", "per-thread", "--thread", "t1") == pt1
    other_chat = send("--platform", "room-2")
    assert other_chat != shared_t1
    agent = send("--mode", "agent-shared", "--platform", "room-3", "--thread", "t9")
    assert send("--mode", "agent-shared", "--channel", "slack") == agent
    assert len(sessions_of(tmp_path)) == 5
    rows = {r.id: r for r in sessions_of(tmp_path)}
    assert rows[pt2].thread_id == "t2"
    assert messages_of(tmp_path, rows[pt2])[0]["thread_id"] == "t2"


def test_send_uses_default_mode_from_config(tmp_path, capsys, conf):
    c = conf('[sessions]\ndefault_mode = "per-thread"\n')
    _, a, _ = run(capsys, "send", "--config", c, "--group", "g", "--thread", "t1", "x")
    _, b, _ = run(capsys, "send", "--config", c, "--group", "g", "--thread", "t2", "x")
    assert a != b


def test_send_json_content(tmp_path, capsys, conf):
    code, _, err = run(capsys, "send", "--config", conf(), "--group", "g", "--content-json",
                       '{"text": "hi", "priority": 2}')
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    assert json.loads(messages_of(tmp_path, row)[0]["content"]) == {"text": "hi", "priority": 2}


def test_send_json_with_nan_is_one_line_and_writes_nothing(tmp_path, capsys, conf):
    code, _, err = run(capsys, "send", "--config", conf(), "--group", "g", "--content-json",
                       '{"text": "hi", "score": NaN}')
    assert code == 2 and err.count("\n") == 1 and "NaN or Infinity" in err, err
    assert sessions_of(tmp_path) == []


def test_send_with_a_sender(tmp_path, capsys, conf):
    """NanoClaw's runner shows ``sender="…"``; without one the model reads "Unknown"."""
    code, _, err = run(capsys, "send", "--config", conf(), "--group", "g", "--sender", "Ann",
                       "hi")
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    assert messages_of(tmp_path, row)[0]["content"] == '{"text":"hi","sender":"Ann"}'


def test_answer_writes_nanoclaws_question_response(tmp_path, capsys, conf):
    _, sid, _ = run(capsys, "send", "--config", conf(), "--group", "g", "hi")
    code, out, err = run(capsys, "answer", "--config", conf(), sid.strip(), "msg-q1", "yes",
                         "--user", "u1")
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    answer = messages_of(tmp_path, row)[1]
    assert out == f"{answer['id']}\n"
    assert (answer["kind"], answer["trigger"], answer["content"]) == (
        "system", 0, '{"type":"question_response","questionId":"msg-q1",'
                     '"selectedOption":"yes","userId":"u1"}')
    code, out, err = run(capsys, "answer", "--config", conf(), "sess-nope", "q", "yes")
    assert (code, out) == (2, "") and "no session 'sess-nope'" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--group", "../up", "x"], "invalid agent group"),
    (["--group", "g", "--content-json", "{broken"], "--content-json: TEXT is not valid JSON"),
    (["--group", "g", "--content-json", "[1, 2]"], "--content-json: TEXT must be a JSON object"),
    (["--group", "g", "--content-json", '{"attachments": [{"name": "a", "data": "!!"}]}'],
     "not valid base64"),
    (["--group", "g", "--attach", "/no/such/file.txt", "x"], "cannot read file"),
])
def test_send_refusals_are_one_line(tmp_path, capsys, conf, argv, fragment):
    code, out, err = run(capsys, "send", "--config", conf(), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err
    # refused before a session exists for it: no row, no folder, nothing half-written
    if (tmp_path / "data" / "orchestrator.db").exists():
        assert sessions_of(tmp_path) == []
    assert not any((tmp_path / "data" / "sessions").glob("*/*"))


def test_send_refuses_oversized_attachment(tmp_path, capsys, conf):
    c = conf("[sessions]\nmax_attachment_bytes = 10\n")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 11)
    code, out, err = run(capsys, "send", "--config", c, "--group", "g", "--attach", big, "x")
    assert code == 2 and out == ""
    assert err == (f"orchestrator: error: --attach {big}: 11 bytes is over the 10-byte limit "
                   "([sessions] max_attachment_bytes)\n")
    assert not (tmp_path / "data").exists()  # refused before anything was created


# --- status --------------------------------------------------------------------------

def test_status_json_and_table(tmp_path, capsys, conf):
    c = conf()
    _, s1, _ = run(capsys, "send", "--config", c, "--group", "alpha", "one")
    _, s1b, _ = run(capsys, "send", "--config", c, "--group", "alpha", "two")
    _, s2, _ = run(capsys, "send", "--config", c, "--group", "beta", "three")
    s1, s2 = s1.strip(), s2.strip()
    assert s1b.strip() == s1

    code, out, err = run(capsys, "status", "--config", c, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, list) and len(data) == 2
    by_id = {row["session_id"]: row for row in data}
    assert set(by_id) == {s1, s2}
    for row in data:
        assert {"session_id", "agent_group", "container_status", "pending"} <= set(row)
    assert (by_id[s1]["agent_group"], by_id[s1]["container_status"], by_id[s1]["pending"]) == (
        "alpha", "stopped", 2)
    assert (by_id[s2]["agent_group"], by_id[s2]["pending"]) == ("beta", 1)

    code, out, err = run(capsys, "status", "--config", c)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("AGENT GROUP") and "SESSION" in lines[0] and "PENDING" in lines[0]
    assert sorted(line.split()[:4] for line in lines[1:]) == [
        ["alpha", s1, "stopped", "2"], ["beta", s2, "stopped", "1"]]


def test_status_with_no_sessions(tmp_path, capsys, conf):
    code, out, _ = run(capsys, "status", "--config", conf())
    assert code == 0 and "no sessions yet" in out
    code, out, _ = run(capsys, "status", "--config", conf(), "--json")
    assert code == 0 and json.loads(out) == []


def test_status_does_not_modify_session_dbs(tmp_path, capsys, conf):
    """status reads, it does not change anything in the session DBs."""
    c = conf()
    run(capsys, "send", "--config", c, "--group", "g", "x")
    (row,) = sessions_of(tmp_path)
    db = session_paths(tmp_path / "data", "g", row.id).inbound_db
    before = db.read_bytes()
    run(capsys, "status", "--config", c)
    assert db.read_bytes() == before
    assert query(db, "SELECT status FROM messages_in") == [("pending",)]


# --- a newcomer's CLI ----------------------------------------------------------------------

def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"orchestrator {metadata.version(DISTRIBUTION)}\n"


def test_top_level_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "argparse" not in out and "main(argv)" not in out  # not the module docstring
    assert out.startswith("usage: orchestrator ")
    for text in ("run AI agent sessions", "--version", "examples:", "orchestrator send --group",
                 "docs/contract.md"):
        assert text.lower() in out.lower()


def test_send_help_explains_every_argument(capsys):
    with pytest.raises(SystemExit):
        cli.main(["send", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "TEXT the message text (UTF-8); - reads it from standard input" in out
    assert "--attach FILE attach a file" in out
    assert "--content-json TEXT is the whole message content as a JSON object" in out
    assert "'shared' = one per chat" in out and "'per-thread' = one per chat thread" in out
    assert "'agent-shared' = one per agent group" in out


def test_send_reads_text_from_stdin(tmp_path, capsys, conf, monkeypatch):
    text = "line one\nlíne two ✓\n" + "x" * 200_000  # over the ~128 KiB argv limit
    monkeypatch.setattr("sys.stdin", FakeStdin(text.encode("utf-8")))
    code, out, err = run(capsys, "send", "--config", conf(), "--group", "g", "-")
    assert code == 0, err
    (row,) = sessions_of(tmp_path)
    (msg,) = messages_of(tmp_path, row)
    assert json.loads(msg["content"]) == {"text": text}


@pytest.mark.parametrize("argv, stdin, fragment", [
    (["--group", "g", ""], None, "TEXT is empty"),
    (["--group", "g", "  \n "], None, "TEXT is empty"),
    (["--group", "g", "-"], b"", "TEXT is empty"),
    (["--group", "g", "-"], b"caf\xe9", "TEXT (standard input) is not UTF-8 (byte 3)"),
    (["--group", "g", "caf\udce9"], None, "TEXT is not valid UTF-8"),  # argv surrogateescape
])
def test_send_refuses_empty_and_undecodable_text(tmp_path, capsys, conf, monkeypatch, argv,
                                                 stdin, fragment):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", FakeStdin(stdin))
    code, out, err = run(capsys, "send", "--config", conf(), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "data" / "sessions").exists() or not any(
        (tmp_path / "data" / "sessions").glob("*/*"))


def test_non_utf8_argv_in_a_real_process_is_one_line(tmp_path, conf):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable.encode(), b"-m", b"orchestrator", b"send",
                           b"--config", str(conf()).encode(), b"--group", b"g", b"caf\xe9"],
                          capture_output=True, timeout=60, env={"LC_ALL": "C.UTF-8",
                                                                 "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr == (b"orchestrator: error: TEXT is not valid UTF-8; convert it (e.g. "
                           b"iconv -t UTF-8) or check your terminal's locale (LANG)\n")


def test_empty_text_with_an_attachment_is_fine(tmp_path, capsys, conf):
    a = tmp_path / "a.txt"
    a.write_text("file")
    code, _, err = run(capsys, "send", "--config", conf(), "--group", "g", "--attach", a, "")
    assert code == 0, err


def test_status_tells_sessions_of_one_group_apart(tmp_path, capsys, conf):
    c = conf()
    for extra in (["--platform", "room-1"], ["--platform", "room-2"],
                  ["--mode", "per-thread", "--platform", "room-1", "--thread", "t9"]):
        assert run(capsys, "send", "--config", c, "--group", "g", *extra, "x")[0] == 0
    code, out, err = run(capsys, "status", "--config", c)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[-3:] == ["CHANNEL", "PLATFORM", "THREAD"]
    assert sorted(r.split()[-3:] for r in rows) == [
        ["cli", "room-1", "-"], ["cli", "room-1", "t9"], ["cli", "room-2", "-"]]
    data = json.loads(run(capsys, "status", "--config", c, "--json")[1])
    assert sorted((r["channel_type"], r["platform_id"], r["thread_id"] or "") for r in data) == [
        ("cli", "room-1", ""), ("cli", "room-1", "t9"), ("cli", "room-2", "")]
    assert sum(r["thread_id"] is None for r in data) == 2


def test_status_writes_nothing_not_even_a_registry(tmp_path, capsys, conf):
    code, out, _ = run(capsys, "status", "--config", conf())
    assert code == 0 and "no sessions yet" in out
    assert not (tmp_path / "data").exists()
    run(capsys, "send", "--config", conf(), "--group", "g", "x")
    for suffix in ("-wal", "-shm"):  # as after the last writer closed it
        (tmp_path / "data" / f"orchestrator.db{suffix}").unlink(missing_ok=True)
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert run(capsys, "status", "--config", conf())[0] == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before
