"""errors: the project's own errors are one line and exit 2; a bug is a crash (exit 1).

Bad environments are real: a read-only bind mount (root ignores file modes, not
``ro``) and a small tmpfs filled to the last byte. In each, ``send`` prints one
line naming the path and the cause and leaves nothing half-made (exit 2);
``status`` only reads, so it works (exit 0), writes nothing, and names the path
and the cause in one warning line.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import commands as cli
from orchestrator.cli import send as cli_send
from orchestrator.config.sections import ConfigError
from orchestrator.host.attachments import AttachmentError
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessageError
from orchestrator.support import errors
from tests.support.mounts import fill, read_only, tmpfs, tree_snapshot


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert err.startswith("orchestrator: error: ")
    return err


def session_count(data: Path) -> int:
    registry = Registry.reader(data / "orchestrator.db")  # reads on a full disk too
    assert registry is not None
    with registry:
        return len(registry.sessions())


@pytest.fixture
def world(tmp_path, capsys):
    """A data dir with one session (group g, chat cli/local) and its config."""
    conf = tmp_path / "config.toml"
    conf.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "first")
    assert code == 0, err
    return conf, tmp_path / "data", out.strip()


# --- the error classes ---------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ConfigError, MessageError, AttachmentError, cli_send.SendError,
                                 errors.StorageError])
def test_input_errors_share_one_base(cls):
    assert issubclass(cls, errors.UserError)


@pytest.mark.parametrize("exc, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    (sqlite3.OperationalError("database or disk is full"), "no space left on the device"),
    (sqlite3.DatabaseError("file is not a database"), "file is not a database"),
])
def test_storage_error_names_path_cause_and_fix(tmp_path, exc, cause):
    err = errors.storage_error(exc, tmp_path / "x.db", "open it")
    assert str(err).startswith(f"{tmp_path / 'x.db'}: cannot open it ({cause}); ")
    assert "\n" not in str(err)


def _sqlite_error(code: int) -> sqlite3.Error:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "full"), True),
    (OSError(errno.EDQUOT, "quota"), True),
    (OSError(errno.EROFS, "read-only"), True),
    (OSError(errno.EACCES, "denied"), False),  # could be the session's own folder
    (_sqlite_error(13), True),  # SQLITE_FULL
    (sqlite3.DatabaseError("file is not a database"), False),
    (ValueError("x"), False),
])
def test_host_storage_failure(exc, expected):
    assert errors.host_storage_failure(exc) is expected


def test_a_bug_is_a_crash_not_bad_input(world, capsys, monkeypatch):
    """A ValueError from a bug must not pass for bad input (exit 2)."""
    conf, _, _ = world
    from orchestrator.host import status

    def broken(*_a, **_k):
        raise ValueError("a bug")

    monkeypatch.setattr(status, "collect", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["status", "--config", str(conf)])


def test_a_bug_exits_1_with_a_traceback(world):
    conf, _, _ = world
    code = ("import sys, orchestrator.host.status as s\n"
            "def broken(*a, **k): raise ValueError('a bug')\n"
            "s.collect = broken\n"
            "from orchestrator.cli.commands import main\n"
            f"sys.exit(main(['status', '--config', {str(conf)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: a bug" in proc.stderr


def test_bad_input_still_exits_2(world, capsys):
    conf, _, _ = world
    code, out, err = run(capsys, "send", "--config", conf, "--group", "../x", "hi")
    assert code == 2 and out == "" and "invalid agent group" in one_line(err)


# --- a read-only data dir ------------------------------------------------------------------

def test_read_only_data_dir(world, capsys):
    conf, data, sid = world
    before = tree_snapshot(data)
    with read_only(data):
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "--platform",
                             "other", "hi")
        assert code == 2 and out == ""
        assert f"{data}" in one_line(err) and "read-only file system" in err
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "again")
        assert code == 2 and "read-only file system" in one_line(err)
        code, out, err = run(capsys, "status", "--config", conf)  # reads only: it works
        assert code == 0 and sid in out
        assert err == (f"orchestrator: warning: {data}: read-only file system; send and run "
                       "cannot write there\n")
        code, out, _ = run(capsys, "status", "--config", conf, "--json")
        assert code == 0 and len(json.loads(out)) == 1
    assert tree_snapshot(data) == before  # nothing written, nothing half-made


# --- sessions/ read-only -------------------------------------------------------------------

def test_read_only_sessions_folder(world, capsys):
    conf, data, sid = world
    with read_only(data / "sessions"):
        code, out, err = run(capsys, "send", "--config", conf, "--group", "newgroup", "hi")
        assert code == 2 and out == ""
        assert f"{data / 'sessions' / 'newgroup'}: cannot create" in one_line(err)
        assert "read-only file system" in err
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "--platform",
                             "p2", "hi")  # a new session in an existing group
        assert code == 2 and f"{data / 'sessions' / 'g'}: cannot create" in one_line(err)
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "again")
        assert code == 2 and "inbound.db: cannot write the message" in one_line(err)
        code, out, err = run(capsys, "status", "--config", conf)
        assert code == 0 and sid in out
        assert err == (f"orchestrator: warning: {data / 'sessions'}: read-only file system; "
                       "send and run cannot write there\n")
    # the registry row and the folder come together or not at all
    assert session_count(data) == 1
    assert sorted(p.name for p in (data / "sessions").iterdir()) == ["g"]
    assert [p.name for p in (data / "sessions" / "g").iterdir()] == [sid]


# --- a full disk ----------------------------------------------------------------------------

def test_full_disk(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        conf = tmp_path / "config.toml"
        conf.write_text(f'data_dir = "{disk / "data"}"\n')
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "first")
        assert code == 0, err
        sid = out.strip()
        data = disk / "data"
        filler = fill(disk)
        before = tree_snapshot(data)
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "--platform",
                             "other", "hi")
        assert code == 2 and out == ""
        assert "no space left on the device" in one_line(err)
        assert "free some space" in err
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "x" * 20000)
        assert code == 2 and "no space left on the device" in one_line(err)
        code, out, err = run(capsys, "status", "--config", conf)
        assert code == 0 and sid in out
        assert err == (f"orchestrator: warning: {data}: no space left on the device; send "
                       "and run cannot write there\n")
        after = tree_snapshot(data)
        # no new session row, no session folder, no staging folder left behind
        assert session_count(data) == 1
        assert [p.name for p in (data / "sessions" / "g").iterdir()] == [sid]
        assert {k for k in after if not k.startswith("orchestrator.db")} == {
            k for k in before if not k.startswith("orchestrator.db")}
        filler.unlink()  # space again: the same commands work
        code, out, err = run(capsys, "send", "--config", conf, "--group", "g", "--platform",
                             "other", "hi")
        assert code == 0, err
        assert session_count(data) == 2


def test_unreadable_registry_is_one_line_for_status(world, capsys):
    conf, data, _ = world
    (data / "orchestrator.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (data / f"orchestrator.db{suffix}").unlink(missing_ok=True)
    code, out, err = run(capsys, "status", "--config", conf)
    assert code == 2 and out == ""
    assert f"{data / 'orchestrator.db'}: cannot read the registry" in one_line(err)


def test_run_on_a_read_only_data_dir_is_one_line(world, capsys):
    conf, data, _ = world
    with read_only(data):
        code, out, err = run(capsys, "run", "--config", conf)
    assert code == 2 and out == ""
    assert str(data) in one_line(err) and "read-only file system" in err and "cannot" in err
