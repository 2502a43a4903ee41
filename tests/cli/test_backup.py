"""``orchestrator backup`` and the schema-version refusal as the CLI shows them: real
SQLite files, one line and exit code 2 for every refusal. The backup under load and a
restore from it: tests/e2e/test_backup_e2e.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import tomli_w

from orchestrator.api.events import EventStore
from orchestrator.cli import commands as cli
from orchestrator.contract.layout import registry_path
from orchestrator.host.registry import Registry
from orchestrator.host.registry_schema import SCHEMA_VERSION
from tests.support.helpers import journal_mode, query


def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps({"data_dir": str(data), "api": {"listen": ""}}))
    return data, config


def main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_backup_copies_the_registry_and_the_event_log_with_their_versions(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, config = setup(tmp_path)
    with Registry(registry_path(data)) as reg:
        reg.ensure_agent_group("g")
    events = EventStore(data / "events.db")
    events.append("status", {"session_id": "s"})
    dest = tmp_path / "backups" / "one"
    code, out, err = main(capsys, "backup", str(dest), "--config", str(config), "--json")
    events.close()
    assert code == 0, err
    doc = json.loads(out)
    assert [(f["name"], f["schema_version"]) for f in doc["files"]] == [
        ("orchestrator.db", SCHEMA_VERSION), ("events.db", 1)]
    for name in ("orchestrator.db", "events.db"):
        copy = dest / name
        assert oct(copy.stat().st_mode & 0o777) == "0o600"
        assert journal_mode(copy) == "delete"  # one self-contained file
        assert not Path(f"{copy}-wal").exists()
    assert query(dest / "orchestrator.db", "SELECT id FROM agent_groups") == [("g",)]
    assert query(dest / "events.db", "SELECT kind FROM events") == [("status",)]
    manifest = json.loads((dest / "backup.json").read_text())
    assert manifest["data_dir"] == str(data) and len(manifest["files"]) == 2
    assert oct(dest.stat().st_mode & 0o777) == "0o700"

    # never over an earlier backup; never of a folder that is not a data dir
    code, _, err = main(capsys, "backup", str(dest), "--config", str(config))
    assert code == 2 and "exists: back up into a new or empty folder" in err
    assert len(err.strip().splitlines()) == 1
    _, empty = setup(tmp_path / "elsewhere")
    code, _, err = main(capsys, "backup", str(tmp_path / "b2"), "--config", str(empty))
    assert code == 2 and "no orchestrator.db or events.db to back up" in err


def test_a_newer_registry_is_one_line_from_run_and_status(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, config = setup(tmp_path)
    path = registry_path(data)
    Registry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    for command in ("status", "run"):
        code, _, err = main(capsys, command, "--config", str(config))
        assert code == 2, (command, err)
        assert len(err.strip().splitlines()) == 1 and str(path) in err, err
        assert f"schema version {SCHEMA_VERSION + 1} is newer than this orchestrator" in err
    assert path.read_bytes() == before
