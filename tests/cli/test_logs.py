"""logs: ``--json-logs`` prints one flat JSON object per line, with the session it is about."""

from __future__ import annotations

import io
import json
from pathlib import Path

from loguru import logger

from orchestrator.cli.logs import json_sink, setup_logging
from orchestrator.config.sections import LogConfig
from tests.support.e2e import Client, make_config, replies, run, supervised
from tests.support.helpers import until


def test_json_lines_are_flat(capsys):
    setup_logging(LogConfig(), json=True)
    try:
        logger.info("plain {}", "line")
        with logger.contextualize(session="sess-1", group="grp"):
            logger.warning("about a session")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.remove()  # (conftest puts the usual sink back after the test)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "event", "message"}
    assert (first["level"], first["message"]) == ("INFO", "plain line")
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second == {"time": second["time"], "level": "WARNING", "message": "about a session",
                      "session": "sess-1", "group": "grp",
                      "event": "test_logs_test_json_lines_are_flat"}
    assert third["exception"] == "ValueError: boom" and third["level"] == "ERROR"
    assert all(isinstance(v, str) for v in first.values())  # flat: no nested objects
    assert len(lines[0]) < 200  # loguru's own serialize: ~900 bytes a line


def test_a_sessions_pass_logs_its_session_and_group(tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)
    out = io.StringIO()
    sink = logger.add(json_sink(out), level="INFO")

    async def body() -> None:
        client = Client(cfg)
        async with supervised(cfg):
            row, _ = client.send("grp-a", "hello")
            await until(lambda: replies(cfg), message="the reply")
        client.close()
        return row

    try:
        row = run(body())
    finally:
        logger.remove(sink)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    delivered = [r for r in records if r["message"].startswith("delivered reply")]
    assert len(delivered) == 1
    assert (delivered[0]["session"], delivered[0]["group"]) == (row.id, "grp-a")
    up = [r for r in records if r["message"].startswith("orchestrator up")]
    assert len(up) == 1 and "session" not in up[0]  # not about one session
