"""What a Docker agent run used, end to end: the real orchestrator (in this event loop)
runs an agent container that burns one CPU for 2 s and touches 200 MB before it
becomes the reference agent and answers; it is stopped when idle, and the registry
holds its run — CPU ≥ 1.5 s and peak ≥ 200 MB from the container's cgroup (read while
it ran: ``runtime/docker/usage.py``), its wall time and exit reason — shown by
``status`` and counted by the per-group metrics as for a local agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.config.load import load_config
from orchestrator.contract.layout import registry_path
from orchestrator.host import status
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup
from tests.e2e.test_run_usage import metric
from tests.support.api_helpers import token_of
from tests.support.docker_fixtures import in_thread
from tests.support.e2e import replies_to, run, serving
from tests.support.heavy_agent import HEAVY, MIB
from tests.support.helpers import until


def docker_cfg(tmp_path: Path, instance: str, image: str) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "runtime": {"kind": "docker", "on_shutdown": "stop", "stop_grace": 2.0},
        "docker": {"instance": instance, "image": image, "network": "none", "memory": "512m",
                   "command": ["python3", "-c", HEAVY, "--workspace", "/workspace",
                               "--poll-interval", "0.05", "--heartbeat-interval", "0.2"]},
        "lifecycle": {"idle_after": 0.5, "stop_idle_after": 0.5, "claim_stuck": 30.0},
        "api": {"listen": "127.0.0.1:0"},
    }


@pytest.mark.docker
def test_cpu_and_peak_memory_of_a_docker_run_are_recorded(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    cfg = load_config(docker_cfg(tmp_path, instance, agent_image), tmp_path)

    async def body() -> tuple[str, dict]:
        async with serving(cfg) as service:
            sup = service.supervisor
            row = sup.sessions.resolve("heavy", MessagingGroup("cli", "local"), None, "shared")
            mid, _ = sup.sessions.write_message(row, {"text": "work hard"},
                                                routing=sup.sessions.routing_of(row))
            await until(lambda: replies_to(cfg, mid), 90, "the reply")
            usage = await until(lambda: sup.registry.run_usage().get(row.id), 30,
                                "the run recorded (stopped when idle)")
            url, token = service.api.url, token_of(cfg)
            cpu = await in_thread(metric, url, token, "orchestrator_agent_cpu_seconds_total",
                                  "other")  # a group the config does not name
            peaks = await in_thread(metric, url, token,
                                    "orchestrator_agent_peak_memory_bytes_count", "other")
            return row.id, usage, cpu, peaks

    sid, usage, cpu, peaks = run(body(), timeout=150)
    last = usage["last_run"]
    print(f"docker run usage: {last}")
    assert usage["runs"] == 1, usage
    assert last["cpu_seconds"] >= 1.5, last
    assert last["peak_memory_bytes"] >= 200 * MIB, last
    assert last["wall_seconds"] >= 2.0, last
    assert last["exit_reason"].startswith("stopped: idle"), last
    assert cpu is not None and cpu >= 1.5 and peaks == 1  # the per-group metrics
    with Registry(registry_path(cfg.data_dir)) as registry:
        [shown] = [r for r in status.collect(cfg.data_dir, registry) if r.session_id == sid]
    assert shown.usage == usage
