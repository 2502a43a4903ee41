"""``send`` / ``status`` with ``--url``: the CLI through a real API server (the CLI
runs in a worker thread, the supervisor in the test's event loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import tomli_w

from orchestrator.cli import commands as cli
from tests.support.api_helpers import api_supervised, free_port, token_of, url_of
from tests.support.e2e import config_dict, make_config
from tests.support.helpers import until


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_send_and_status_through_the_api(tmp_path: Path, capsys, monkeypatch,
                                         reap_agents) -> None:
    cfg = make_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # another machine: no config file, no data dir
    elsewhere.mkdir()
    token_file = elsewhere / "token"
    monkeypatch.delenv("ORCHESTRATOR_URL", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_TOKEN", raising=False)

    async with api_supervised(cfg) as (sup, client):
        token_file.write_text(token_of(cfg) + "\n")
        token_file.chmod(0o600)
        url = url_of(client)
        missing = elsewhere / "config.toml"
        code, out, err = await asyncio.to_thread(
            cli_run, capsys, "send", "--config", missing, "--url", url, "--token-file",
            token_file, "--group", "remote", "--platform", "p1", "hello from afar")
        assert (code, err) == (0, ""), err
        sid = out.strip()
        await until(lambda: sid in sup.tracked, message="the new session tracked")
        await until(lambda: any(r["content"]["text"] == "echo: hello from afar"
                                for r in replies_to_session(cfg, sid)))

        monkeypatch.setenv("ORCHESTRATOR_URL", url)
        monkeypatch.setenv("ORCHESTRATOR_TOKEN", token_of(cfg))
        code, out, err = await asyncio.to_thread(cli_run, capsys, "status", "--config",
                                                 missing, "--json")
        assert code == 0, err
        [row] = json.loads(out)
        assert row["session_id"] == sid and row["agent_group"] == "remote"
        code, out, _ = await asyncio.to_thread(cli_run, capsys, "status", "--config",
                                               missing)
        assert code == 0 and sid in out and "AGENT GROUP" in out

        monkeypatch.setenv("ORCHESTRATOR_TOKEN", "wrong")
        code, out, err = await asyncio.to_thread(cli_run, capsys, "status", "--config",
                                                 missing)
        assert code == 2 and out == "" and err.count("\n") == 1 and "HTTP 401" in err
        monkeypatch.setenv("ORCHESTRATOR_TOKEN", token_of(cfg))
        code, out, err = await asyncio.to_thread(
            cli_run, capsys, "send", "--config", missing, "--group", "../x", "hi")
        assert code == 2 and err.count("\n") == 1 and "HTTP 400" in err


def replies_to_session(cfg, sid: str) -> list[dict]:
    from tests.support.e2e import replies
    return [r for r in replies(cfg) if r["session_id"] == sid]


def test_unreachable_url_is_one_line_exit_1(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_TOKEN", raising=False)
    code, out, err = cli_run(capsys, "status", "--config", tmp_path / "none.toml", "--url",
                             f"http://127.0.0.1:{free_port()}")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "cannot reach the orchestrator API" in err


def test_without_url_send_still_writes_the_files(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_URL", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(config_dict(tmp_path)))
    code, out, err = cli_run(capsys, "send", "--config", path, "--group", "g", "hi")
    assert code == 0 and out.startswith("sess-")


def test_init_creates_the_api_token_0600(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    assert cli_run(capsys, "init", "--config", path)[0] == 0
    token = tmp_path / "data" / "api-token"
    assert (token.stat().st_mode & 0o777) == 0o600 and len(token.read_text().strip()) >= 32
    first = token.read_text()
    assert cli_run(capsys, "init", "--config", path, "--force")[0] == 0
    assert token.read_text() == first  # kept
