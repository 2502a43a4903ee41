"""Agent Pods' output kept before the Pod is deleted, and each run's wall time.

Pure: a terminated container's wall time from the kubelet's startedAt/finishedAt
(``pods.classify``), and the bounded tail a log read keeps (``logs.Tail``). Against the
real test cluster: a Pod that printed and exited has its output in
``logs/<group>/<session>/run-N.log`` once it is deleted, and its exit carries its wall
time; a stopped Pod's log holds what the agent wrote during its grace too (the
reference agent's "stopping on signal" line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import SessionRef
from orchestrator.runtime.kubernetes.logs import READ_CAP, Tail
from orchestrator.runtime.kubernetes.pods import ENDED, classify
from tests.runtime.kubernetes.test_kubernetes_runtime import AGENT, make_runtime
from tests.support.docker_fixtures import in_thread, make_session
from tests.support.helpers import until
from tests.support.kube import Cluster


def terminated(**times: str) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "agent", "state": {"terminated": {"exitCode": 3, **times}}}]}}


@pytest.mark.parametrize("times,wall", [
    ({"startedAt": "2026-12-07T10:00:00Z", "finishedAt": "2026-12-07T10:00:02Z"}, 2.0),
    ({"startedAt": "2026-12-07T10:00:00Z"}, None),  # not told
    ({"startedAt": "2026-12-07T10:00:05Z", "finishedAt": "2026-12-07T10:00:02Z"}, None),
    ({}, None),
])
def test_an_ended_pods_wall_time_is_its_containers_own(times: dict, wall: float | None) -> None:
    view = classify(terminated(**times))
    assert (view.state, view.exit_code, view.wall_seconds) == (ENDED, 3, wall)


def test_the_tail_keeps_the_last_bytes_and_stops_at_the_read_cap() -> None:
    tail = Tail(10)
    assert tail.add(b"0123456789" * 3)  # 30 read, 10 kept
    tail.trim()
    assert (bytes(tail.kept), tail.cut) == (b"0123456789", 20)
    more = [tail.add(b"x" * 10) for _ in range(READ_CAP)]
    # past READ_CAP × max_bytes read (30 + 14 × 10 > 16 × 10): stop reading
    assert more.index(False) == (READ_CAP * 10 - 30) // 10
    tail.trim()
    assert len(tail.kept) == 10 and tail.cut == tail.read - 10


def pods(cluster: Cluster, namespace: str) -> dict[str, dict]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
    return {p["metadata"]["name"]: p for p in json.loads(out)["items"]}


PRINT_AND_EXIT = ("python3", "-c", "import sys, time; print('agent says: hello', flush=True); "
                  "time.sleep(2); print('agent says: bye', file=sys.stderr, flush=True); "
                  "sys.exit(3)")


@pytest.mark.kubernetes
async def test_an_exited_pods_output_outlives_it_and_its_wall_time_is_reported(
        tmp_path: Path, kube_cluster: Cluster, kube_namespace: str, agent_image: str) -> None:
    kube_cluster.import_image(agent_image)
    folder = make_session(tmp_path, "g", "s1")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, agent_image,
                                command=PRINT_AND_EXIT)
    store = AgentLogs(tmp_path)
    try:
        await rt.start(SessionRef("g", "s1", folder))
        await until(lambda: exits, 90, "the Pod's exit")
        await until(lambda: store.runs("g", "s1"), 60, "its output kept")
        await until(lambda: no_pods(kube_cluster, kube_namespace), 60, "the Pod deleted")
    finally:
        await rt.close()
    [ev] = exits
    assert (ev.reason, ev.exit_code) == ("exited", 3)
    assert ev.usage is not None and ev.usage.wall_seconds is not None
    # the kubelet's timestamps are whole seconds: 2 s of sleep is 1 to 3 s of wall time
    assert 1.0 <= ev.usage.wall_seconds <= 3.0, ev.usage
    got = store.read("g", "s1")
    assert got is not None and got.run == 1
    assert b"agent says: hello\n" in got.data and b"agent says: bye\n" in got.data
    assert not got.data.startswith(b"[orchestrator:")  # nothing cut


async def no_pods(cluster: Cluster, namespace: str) -> bool:
    return not await in_thread(pods, cluster, namespace)


@pytest.mark.kubernetes
async def test_a_stopped_pods_log_holds_what_it_wrote_during_its_grace(
        tmp_path: Path, kube_cluster: Cluster, kube_namespace: str, agent_image: str) -> None:
    kube_cluster.import_image(agent_image)
    folder = make_session(tmp_path, "g", "s2")
    rt, exits, _ = make_runtime(kube_cluster, kube_namespace, tmp_path, agent_image,
                                command=AGENT)
    store = AgentLogs(tmp_path)
    try:
        await rt.start(SessionRef("g", "s2", folder))
        await rt.stop("s2", grace=5)
        # kept by the time stop returns: the Pod is gone, its output is not
        got = store.read("g", "s2")
        left = await in_thread(pods, kube_cluster, kube_namespace)
    finally:
        await rt.close()
    assert [e.reason for e in exits] == ["stopped"] and left == {}
    assert got is not None, "no run log kept"
    assert b"stopping on signal" in got.data, got.data[-500:]
