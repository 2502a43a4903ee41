"""Sessions past the inotify watch budget are still answered (issue 28).

A real ``orchestrator run`` in a user namespace of its own whose
``user.max_inotify_watches`` is lowered (per user namespace since Linux 4.9; the host's
limit is not touched, nothing is raised): the watch covers the root, the group and a
few sessions, and polls the rest. Checked: the one warning line naming the sysctl and
the value to set, a message → reply for every session (with sweeps too rare to be what
answers them), the ``orchestrator_watch_polled_sessions`` metric and the line of
``orchestrator status``. Fails (never skips) under ``CI`` if the namespace cannot be made.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomli_w

from orchestrator.config.load import load_config
from orchestrator.watch import budget
from tests.support.e2e import Client, config_dict, replies_to
from tests.support.helpers import in_ci, until, wait_for

LIMIT = 520  # budget.usable: 8 watches — the root, the group and 6 sessions
SESSIONS = 12
GROUP = "grp"


def _namespace_works() -> str | None:
    """Why a user namespace with a lowered limit cannot be made here, or None."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         f"echo {LIMIT} > /proc/sys/user/max_inotify_watches && "
         "cat /proc/sys/user/max_inotify_watches"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout.strip() != str(LIMIT):
        return f"no user namespace with a lowered watch limit: {probe.stderr.strip()}"
    return None


@pytest.fixture
def namespace() -> None:
    why = _namespace_works()
    if why is not None:
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)


class NamespacedOrchestrator:
    """``orchestrator run`` exec'd in a new user namespace (the same pid) whose watch
    limit is ``LIMIT``."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.log = log
        script = f'echo {LIMIT} > /proc/sys/user/max_inotify_watches && exec "$@"'
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
                 sys.executable, "-m", "orchestrator", "run", "--config", str(config_file)],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=config_file.parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"orchestrator did not end:\n{self.text()}") from None


def _polled_metric(url: str, token: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    found = re.search(r"^orchestrator_watch_polled_sessions ([0-9.e+]+)$", text, re.M)
    assert found, text[:2000]
    return float(found.group(1))


async def test_sessions_past_the_watch_budget_are_polled_and_answered(
        tmp_path: Path, namespace: None, reap_agents) -> None:
    # sweeps far apart: a reply within the test comes from the watch or the poll
    raw = config_dict(tmp_path, watch={"sweep_interval": 600.0,
                                       "dormant_sweep_interval": 600.0})
    config_file = tmp_path / "config.toml"
    config_file.write_text(tomli_w.dumps(raw))
    client = Client(load_config(raw, tmp_path))
    cfg = client.cfg
    rows = [client.session(GROUP, thread=f"t{i}", mode="per-thread") for i in range(SESSIONS)]
    orch = NamespacedOrchestrator(config_file, tmp_path / "run.log")
    try:
        wait_for(lambda: "orchestrator up" in orch.text() or orch.proc.poll() is not None,
                 timeout=60, message="orchestrator start-up")
        assert orch.proc.poll() is None, orch.text()
        warnings = [line for line in orch.text().splitlines()
                    if "inotify watch budget too small" in line]
        assert len(warnings) == 1, orch.text()
        line = warnings[0]
        assert f"user.max_inotify_watches={LIMIT}" in line, line
        assert f"{SESSIONS - 6} sessions past it are polled" in line, line
        assert "'sysctl -w user.max_inotify_watches=65536'" in line, line

        found = re.search(r"API listening on (http://[0-9.]+:[0-9]+)", orch.text())
        assert found, orch.text()
        token = (cfg.data_dir / "api-token").read_text().strip()
        assert _polled_metric(found.group(1), token) >= 1

        status = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--config",
                                 str(config_file)], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr
        assert "past the inotify watch budget and polled" in status.stderr, status.stderr

        sent = [client.send(GROUP, f"hello {i}", thread=f"t{i}", mode="per-thread")
                for i in range(SESSIONS)]
        assert {row.id for row, _ in sent} == {row.id for row in rows}
        for _, mid in sent:
            await until(lambda mid=mid: replies_to(cfg, mid), timeout=60,
                        message=f"the reply to {mid}")
        assert budget.read_state(cfg.data_dir) is not None
    finally:
        code = orch.end()
    assert code == 0, orch.text()
