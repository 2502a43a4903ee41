"""``--json`` means JSON output: ``send --json`` prints the ids (the content flag is
``--content-json``), ``send --wait`` prints the reply through the API (``--url``, or
the config's own ``[api] listen``), ``answer`` and ``init`` print JSON too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import tomli_w

from orchestrator.cli import commands as cli
from tests.support.api_helpers import api_supervised, free_port, token_of, url_of
from tests.support.e2e import config_dict, make_config


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_send_json_prints_the_ids_and_content_json_reads_the_content(tmp_path: Path,
                                                                      capsys) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('data_dir = "data"\n')
    code, out, err = cli_run(capsys, "send", "--config", conf, "--group", "g", "--json",
                             "--content-json", '{"text": "hi", "n": 1}')
    assert code == 0, err
    ids = json.loads(out)
    assert set(ids) == {"session_id", "message_id", "series_id"}
    assert ids["session_id"].startswith("sess-") and ids["message_id"].startswith("msg-")
    assert ids["series_id"] is None
    code, out, err = cli_run(capsys, "send", "--config", conf, "--group", "g", "--json",
                             "--every", "0 9 * * *", "daily")
    assert code == 0, err
    assert json.loads(out)["series_id"]
    code, out, err = cli_run(capsys, "init", "--config", tmp_path / "new.toml", "--json")
    assert code == 0 and json.loads(out)["config"].endswith("new.toml"), err


async def test_send_wait_prints_the_reply(tmp_path: Path, capsys, monkeypatch,
                                          reap_agents) -> None:
    monkeypatch.delenv("ORCHESTRATOR_URL", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_TOKEN", raising=False)
    port = free_port()
    conf = tmp_path / "config.toml"
    conf.write_text(tomli_w.dumps(config_dict(tmp_path, api={"listen": f"127.0.0.1:{port}"})))
    cfg = make_config(tmp_path, api={"listen": f"127.0.0.1:{port}"})
    async with api_supervised(cfg) as (_sup, client):
        assert url_of(client).endswith(f":{port}")
        # no --url: the config's own [api] listen and token_file
        code, out, err = await asyncio.to_thread(
            cli_run, capsys, "send", "--config", conf, "--group", "g", "--wait", "30", "hi")
        assert code == 0, err
        sid, text = out.splitlines()
        assert sid.startswith("sess-") and text == "echo: hi"
        code, out, err = await asyncio.to_thread(
            cli_run, capsys, "send", "--config", conf, "--url", url_of(client), "--group",
            "g", "--wait", "30", "--json", "again")
        assert code == 0, err
        got = json.loads(out)
        assert got["session_id"] == sid and got["reply"]["in_reply_to"] == got["message_id"]
        assert got["reply"]["content"]["text"] == "echo: again"
        # nothing comes within the wait (due next year): the ids, and a line on stderr
        code, out, err = await asyncio.to_thread(
            cli_run, capsys, "send", "--config", conf, "--group", "g", "--wait", "0.3",
            "--at", "+300d", "later")
        assert code == 0 and out.strip() == sid and "no reply within 0.3s" in err
        assert token_of(cfg)


def test_send_wait_without_an_api_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_URL", raising=False)
    conf = tmp_path / "config.toml"
    conf.write_text('data_dir = "data"\n[api]\nlisten = ""\n')
    code, _, err = cli_run(capsys, "send", "--config", conf, "--group", "g", "--wait", "5",
                           "x")
    assert code == 2 and err.count("\n") == 1 and "--wait" in err
    with pytest.raises(SystemExit) as info:  # argparse's own refusal
        cli.main(["send", "--config", str(conf), "--group", "g", "--wait", "61", "x"])
    assert info.value.code == 2 and "from 0 to 60" in capsys.readouterr().err


def test_group_destinations_and_series_cancel_print_json(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('data_dir = "data"\n')
    code, out, err = cli_run(capsys, "group", "destinations", "g", "--json", "add", "ops",
                             "--channel", "email", "--platform", "ops@example.org",
                             "--config", conf)
    assert code == 0, err
    assert json.loads(out) == {"group": "g", "added": "ops"}
    code, out, err = cli_run(capsys, "group", "destinations", "g", "--json", "remove", "ops",
                             "--config", conf)
    assert code == 0 and json.loads(out) == {"group": "g", "removed": "ops"}, err
    code, out, err = cli_run(capsys, "send", "--config", conf, "--group", "g", "--json",
                             "--every", "0 9 * * *", "daily")
    series_id = json.loads(out)["series_id"]
    code, out, err = cli_run(capsys, "series", "cancel", series_id, "--config", conf, "--json")
    assert code == 0, err
    assert json.loads(out) == {"series_id": series_id, "removed": 1}
