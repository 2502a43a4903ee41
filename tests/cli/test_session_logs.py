"""``orchestrator logs -f`` on real files: what a run writes from then on, the next run
as it starts, a file trimmed to its cap read again from its start; escaped output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tomli_w

from orchestrator.cli import commands as cli
from orchestrator.cli.session_logs import follow
from orchestrator.host.agent_logs import AgentLogs
from tests.support.e2e import Client, make_config


def test_follow_prints_new_output_and_switches_to_each_new_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logs = AgentLogs(tmp_path, max_bytes=4096, keep_runs=5)
    run, fd = logs.begin("g", "s")
    os.write(fd, b"before -f\n")
    first = logs.read("g", "s")
    fds = [fd]
    steps = [
        lambda: os.write(fd, b"line one\n"),
        lambda: os.write(fd, b"\x1b[31mred\n"),
        lambda: fds.append(logs.begin("g", "s")[1]),  # run 2 starts
        lambda: os.write(fds[-1], b"second run\n"),
    ]

    def sleep(_: float) -> None:
        if steps:
            steps.pop(0)()

    try:
        follow(logs, "g", "s", first, True, sleep=sleep, rounds=6)
    finally:
        for f in fds:
            os.close(f)
    out, err = capsys.readouterr()
    assert out == "line one\n\\x1b[31mred\nsecond run\n"  # not what came before -f
    assert "==> session s, run 2 <==" in err


def test_follow_reads_a_trimmed_file_from_its_start(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    logs = AgentLogs(tmp_path, max_bytes=4096, keep_runs=5)
    _, fd = logs.begin("g", "s")
    os.write(fd, b"x" * 5000)
    first = logs.read("g", "s")
    capsys.readouterr()
    steps = [lambda: logs.cap("g", "s"), lambda: os.write(fd, b"tail\n")]

    def sleep(_: float) -> None:
        if steps:
            steps.pop(0)()

    try:
        follow(logs, "g", "s", first, False, sleep=sleep, rounds=4)
    finally:
        os.close(fd)
    out, _ = capsys.readouterr()
    # the trimmed file again from its start (its cut mark), then what came after
    assert out.startswith("[orchestrator: ") and out.endswith("xxtail\n"), out[:80]


def test_a_session_with_no_output_kept_yet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = make_config(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps({"data_dir": str(cfg.data_dir)}))
    client = Client(cfg)
    row = client.session("quiet")
    client.close()
    assert cli.main(["logs", row.id, "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no agent output kept yet" in err
    assert cli.main(["logs", row.id, "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "session_id": row.id, "agent_group": "quiet", "run": None, "runs": [], "size": 0,
        "text": ""}
