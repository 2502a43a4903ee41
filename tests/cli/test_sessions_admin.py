"""orchestrator sessions archive|delete|restore, offline (no ``run``: on the files, with
the data-dir lock), in-process through ``commands.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import commands as cli
from orchestrator.contract.layout import registry_path, session_dir
from orchestrator.host.data_lock import lock_data_dir
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup, Sessions
from tests.support.retention import settled_session


@pytest.fixture
def setup(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[api]\nlisten = ""\n')
    data = tmp_path / "data"
    with Registry(registry_path(data)) as reg:
        sessions = Sessions(data, reg, 1024)
        done = settled_session(sessions, reg, data, platform="done")
        busy = sessions.resolve("g", MessagingGroup("cli", "busy"), None, "shared")
        sessions.write_message(busy, {"text": "pending"})
    return config, data, done, busy.id


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_archive_restore_and_a_refusal_with_one_line(setup, capsys) -> None:
    config, data, done, busy = setup
    code, out, _ = run(capsys, "sessions", "archive", done, busy, "--config", str(config))
    assert code == 2
    lines = out.splitlines()
    assert lines[0].startswith(f"{done}: archived (") and lines[0].endswith(".tar.gz)")
    assert lines[1].startswith(f"{busy}: not removed: it has 1 pending message;")
    assert not session_dir(data, "g", done).exists() and session_dir(data, "g", busy).is_dir()
    code, out, _ = run(capsys, "status", "--config", str(config))
    assert code == 0 and out.splitlines()[-1].startswith("1 archived session in ")

    code, out, _ = run(capsys, "sessions", "restore", done, "--config", str(config), "--json")
    assert code == 0 and json.loads(out)["action"] == "restored"
    assert session_dir(data, "g", done).is_dir()
    code, out, _ = run(capsys, "sessions", "restore", done, "--config", str(config))
    assert code == 2 and "no archive" in out

    code, out, _ = run(capsys, "sessions", "delete", busy, "--force", "--json",
                       "--config", str(config))
    assert code == 0 and json.loads(out) == {"session_id": busy, "action": "deleted",
                                             "archive": None, "reason": None}
    assert not session_dir(data, "g", busy).exists()


def test_with_run_holding_the_data_dir_and_no_fixed_api_address_it_says_so(setup,
                                                                          capsys) -> None:
    config, data, done, _ = setup
    lock = lock_data_dir(data)  # as a running `orchestrator run`
    try:
        code, _, err = run(capsys, "sessions", "delete", done, "--config", str(config))
    finally:
        lock.release()
    assert code == 2 and "the orchestrator is running" in err and "--url" in err
    assert session_dir(data, "g", done).is_dir()
