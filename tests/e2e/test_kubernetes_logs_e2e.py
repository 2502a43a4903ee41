"""Agent logs and run usage on Kubernetes, end to end: the real Supervisor on the real
test cluster runs an agent Pod that prints a line, works 1.5 s and exits 1. Once its
Pod is deleted its output is still read by ``orchestrator logs`` (from
``<data_dir>/logs/<group>/<session>/run-N.log``, kept before the delete), and the
registry holds the run with its wall time (the container's own, from the kubelet's
startedAt/finishedAt: whole seconds) and its exit reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from orchestrator.cli import commands as cli
from orchestrator.config.load import load_config
from orchestrator.host.agent_logs import AgentLogs
from tests.e2e.test_kubernetes_e2e import config_data, our_pods, send, session
from tests.support.docker_fixtures import in_thread
from tests.support.e2e import run, supervised
from tests.support.helpers import until
from tests.support.kube import Cluster

pytestmark = pytest.mark.kubernetes

CRASH = ["python3", "-c", "import sys, time; print('agent says: starting', flush=True); "
         "time.sleep(1.5); print('agent says: giving up', file=sys.stderr, flush=True); "
         "sys.exit(1)"]


def test_an_exited_pods_log_is_read_by_the_cli_after_the_pod_is_gone_and_its_run_recorded(
        tmp_path: Path, kube_cluster: Cluster, kube_namespace: str, agent_image: str,
        capsys: pytest.CaptureFixture) -> None:
    kube_cluster.import_image(agent_image)
    data = config_data(tmp_path, kube_cluster, kube_namespace, agent_image,
                       kubernetes={"command": CRASH}, lifecycle={"max_tries": 1},
                       sessions={"agent_log_runs": 3})
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(data))
    cfg = load_config(data, tmp_path)
    store = AgentLogs.of(cfg)
    instance = cfg.kubernetes.instance

    async def body() -> tuple[str, dict]:
        async with supervised(cfg) as sup:
            row = session(sup, "crashy")
            send(sup, row, "hello")
            usage = await until(lambda: sup.registry.run_usage().get(row.id), 90,
                                "a run recorded")
            await until(lambda: store.runs("crashy", row.id), 60, "its output kept")
            await until(lambda: in_thread(lambda: not our_pods(kube_cluster, kube_namespace,
                                                               instance)), 60, "Pods deleted")
            return row.id, usage

    sid, usage = run(body(), 180)
    last = usage["last_run"]
    print(f"run usage: {last}")
    assert last["exit_reason"] == "agent exited, exit code 1", last
    # the container's own wall time: whole seconds of the kubelet's (1.5 s of work)
    assert last["wall_seconds"] is not None and 1.0 <= last["wall_seconds"] <= 3.0, last
    assert last["cpu_seconds"] is None and last["peak_memory_bytes"] is None  # not read here
    code = cli.main(["logs", sid, "--config", str(config)])  # its newest run kept
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "agent says: starting\n" in out and "agent says: giving up\n" in out, out
    assert f"session {sid}, run " in err
    assert len(store.runs("crashy", sid)) <= 3  # [sessions] agent_log_runs
