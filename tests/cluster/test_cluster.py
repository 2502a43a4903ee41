"""The Kubernetes test cluster itself (``.ci/setup-kubernetes.sh``), proved through the
fixtures other tests use: the node is Ready, a Pod running the project's agent image starts
from a locally imported image (nothing is pulled) and writes through a hostPath volume to a
file the host sees, and the kubelet runs with ``AWS_EC2_METADATA_DISABLED=true`` (without it
kubelet 1.20 asks the cloud metadata address, which is not this machine's own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.kube import (
    Cluster,
    condition_true,
    containerd_ref,
    pod_phase_settled,
    process_environ,
    process_pid,
)

pytestmark = pytest.mark.kubernetes

AGENT_IMAGE = "orchestrator-agent:latest"
AGENT_UID = 10001  # the agent image's user


def test_the_node_reports_ready(kube_cluster: Cluster) -> None:
    node = kube_cluster.get("node", kube_cluster.node_name)
    assert node is not None and condition_true(node, "Ready"), node


def test_the_kubelet_runs_with_cloud_metadata_disabled(kube_cluster: Cluster) -> None:
    pid = process_pid("kubelet")
    assert pid is not None, "no live kubelet pid recorded by .ci/setup-kubernetes.sh"
    assert "kubelet" in Path(f"/proc/{pid}/exe").resolve().name
    assert process_environ(pid).get("AWS_EC2_METADATA_DISABLED") == "true"


def test_a_pod_of_the_agent_image_writes_through_a_hostpath_volume(
        kube_cluster: Cluster, kube_namespace: str, tmp_path: Path) -> None:
    kube_cluster.import_image(AGENT_IMAGE)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, AGENT_UID, AGENT_UID)
    kube_cluster.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "smoke", "namespace": kube_namespace},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "agent", "image": AGENT_IMAGE, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo hello from $(hostname) > /out/hello.txt"],
                "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": "out",
                         "hostPath": {"path": str(out), "type": "Directory"}}],
        },
    })
    pod = kube_cluster.wait_for_pod(kube_namespace, "smoke", ("Succeeded", "Failed"),
                                    timeout=90)
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["spec"]["nodeName"] == kube_cluster.node_name
    written = wait_for(lambda: (out / "hello.txt").is_file() and (out / "hello.txt").read_text(),
                       timeout=10, message="hello.txt on the host")
    assert written == "hello from smoke\n"


@pytest.mark.parametrize("tag, ref", [
    ("orchestrator-agent:latest", "docker.io/library/orchestrator-agent:latest"),
    ("orchestrator-agent", "docker.io/library/orchestrator-agent:latest"),
    ("me/agent:1", "docker.io/me/agent:1"),
    ("localhost/pause:v1", "localhost/pause:v1"),
    ("registry.example:5000/a/b", "registry.example:5000/a/b:latest"),
])
def test_docker_tags_map_to_the_names_containerd_gives_them(tag: str, ref: str) -> None:
    assert containerd_ref(tag) == ref


@pytest.mark.parametrize("phase, settled", [
    ("Pending", False), ("Running", True), (None, False),
])
def test_pod_phase_settled(phase: str | None, settled: bool) -> None:
    pod = {"status": {"phase": phase}} if phase else {}
    assert pod_phase_settled(pod, ("Running",)) is settled
