"""schemathesis fuzzes a live ``orchestrator run`` (a real subprocess, the reference
agent answering) over every operation of its OpenAPI document, with the token: every
phase (examples, coverage, fuzzing, stateful via the document's links), every check
but one, and the run must end with no failure — in particular no 5xx and every
response conforming to the document.

The check left out, ``positive_data_acceptance``, asks that every schema-valid request
be accepted; two rules of the API cannot be written in JSON Schema and are refused
with a 400 on purpose: ``process_after`` must be in the future, and a ``cursor`` must
be one the server handed out. ``[api] max_wait`` is cut to 2 s here so that a waited
POST of a message scheduled for later (no reply can come) does not hold a worker for
a minute. ``Accept: application/json`` makes ``GET /v1/events`` answer one JSON page
instead of an endless stream, so that operation is fuzzed too (the stream itself:
test_api.py, test_api_events.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import tomli_w

from tests.support.e2e import OrchestratorProcess, config_dict

MAX_EXAMPLES = 20  # per operation and phase: the whole test stays under a minute here


def test_schemathesis_finds_nothing_against_a_live_orchestrator(tmp_path: Path,
                                                                reap_agents) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(config_dict(tmp_path, api={
        "listen": "127.0.0.1:0", "max_wait": 2.0})))
    orch = OrchestratorProcess(config_file, tmp_path / "run.log")
    try:
        orch.wait_up()
        found = re.search(r"API listening on (http://[0-9.]+:[0-9]+)", orch.text())
        assert found, orch.text()
        url = found.group(1)
        token = (tmp_path / "data" / "api-token").read_text().strip()
        report = tmp_path / "report.json"
        cli = Path(sys.executable).parent / "schemathesis"
        proc = subprocess.run(
            [str(cli), "run", f"{url}/openapi.json",
             "-H", f"Authorization: Bearer {token}", "-H", "Accept: application/json",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "10",
             "--workers", "2", "--no-color", "--report", "json",
             "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=150, cwd=tmp_path)
        data = json.loads(report.read_text())
        ops, cases = data["operations"], data["test_cases"]
        print(f"schemathesis {data['schemathesis_version']}: {ops['tested']}/{ops['total']} "
              f"operations, {cases['generated']} cases, {cases['unique_failures']} failures, "
              f"{len(data['errors'])} errors, {data['running_time']:.1f}s, "
              f"seed {data['seed']}")
        assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
        assert ops["tested"] == ops["selected"] == ops["total"]
        assert data["failures"] == [] and data["errors"] == []
        assert cases["generated"] > 100
        log = orch.text()
        assert "internal error" not in log and "Traceback" not in log, log[-20000:]
    finally:
        if orch.proc.poll() is None:
            orch.end(signal.SIGTERM)
