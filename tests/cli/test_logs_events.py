"""Every JSON log line has a stable ``event`` key, and uvicorn's own lines come through
the same sink: a real ``orchestrator run --json-logs`` process."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from loguru import logger

from orchestrator.cli.logs import event_name, setup_logging
from orchestrator.config.sections import LogConfig
from tests.support.api_helpers import free_port
from tests.support.e2e import config_dict
from tests.support.helpers import wait_for

SNAKE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


@pytest.mark.parametrize("record, event", [
    ({"extra": {"event": "reply_delivered"}, "name": "x.y", "function": "f"},
     "reply_delivered"),
    ({"extra": {"event": "uvicorn.error"}, "name": "x", "function": "f"}, "uvicorn_error"),
    ({"extra": {}, "name": "orchestrator.engine.delivery", "function": "_retry_later"},
     "delivery_retry_later"),
    ({"extra": {}, "name": "orchestrator.cli.compose", "function": "<module>"}, "compose"),
    ({"extra": {}, "name": None, "function": None}, "log"),
])
def test_event_name(record: dict, event: str) -> None:
    assert event_name(record) == event


def test_bound_and_derived_events_and_uvicorn_lines_in_one_sink(capsys) -> None:
    setup_logging(LogConfig(), json=True)
    try:
        logger.bind(event="reply_delivered").info("delivered reply {}", "out-1")
        logger.info("derived")
        logging.getLogger("uvicorn.error").warning("from uvicorn %s", "itself")
    finally:
        logger.remove()
    bound, derived, uv = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert bound["event"] == "reply_delivered" and bound["message"] == "delivered reply out-1"
    assert derived["event"] == "test_logs_events_test_bound_and_derived_events_and_uvicorn_" \
        "lines_in_one_sink"
    assert uv == {"time": uv["time"], "level": "WARNING", "event": "uvicorn_error",
                  "message": "from uvicorn itself"}


def test_a_running_orchestrator_logs_flat_json_with_events_uvicorn_included(
        tmp_path: Path, reap_agents) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(config_dict(tmp_path, api={"listen": f"127.0.0.1:{port}"})))
    log = tmp_path / "stderr.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config",
                                 str(config), "--json-logs"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=fh, cwd=tmp_path)
    try:
        wait_for(lambda: "orchestrator up" in log.read_text() or proc.poll() is not None,
                 timeout=30, message="start-up")
        assert proc.poll() is None, log.read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn itself warns about this
            sock.recv(1024)
        wait_for(lambda: '"uvicorn_error"' in log.read_text(), timeout=10,
                 message="uvicorn's own warning in the log")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    assert all(SNAKE.match(r["event"]) for r in records), [r["event"] for r in records]
    assert all(not isinstance(v, (dict, list)) for r in records for v in r.values())
    [uv] = [r for r in records if r["event"] == "uvicorn_error"]
    assert uv["level"] == "WARNING" and "Invalid HTTP request" in uv["message"]
    up = [r for r in records if r["message"].startswith("orchestrator up")]
    assert up and up[0]["event"] == "supervisor_reconcile_at_start"
