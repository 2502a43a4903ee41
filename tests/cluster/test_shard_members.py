"""Shard membership through the real test cluster's API (issue 23): ``KubeMembers``
lists and watches the Pods carrying ``[cluster] pod_label`` — an orchestrator Pod that
starts shows up as a member (id: its node's name, URL: its Pod IP and the API port);
one that is deleted stays a member (remembered: it may hold conversations) that no
longer runs. The Pods here are stand-ins (the agent image sleeping, the
label of orchestrator Pods); the orchestrator's own Pods need the server image, which
tests/cluster/test_deploy.py builds."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from orchestrator.config.sections import ClusterConfig, KubernetesConfig
from orchestrator.runtime.kubernetes.members import KubeMembers
from tests.support.helpers import until
from tests.support.kube import Cluster

pytestmark = pytest.mark.kubernetes

IMAGE = "orchestrator-agent:latest"
LABEL = "orchestrator.test/shard"


def stand_in(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL: "yes"}},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                                 "command": ["sleep", "600"],
                                 "securityContext": {"allowPrivilegeEscalation": False,
                                                     "capabilities": {"drop": ["ALL"]}}}]},
    }


def test_orchestrator_pods_found_and_followed(kube_cluster: Cluster, kube_namespace: str
                                              ) -> None:
    kube_cluster.import_image(IMAGE)
    kube = dataclasses.replace(KubernetesConfig(), namespace=kube_namespace,
                               kubeconfig=str(kube_cluster.kubeconfig))
    cluster = ClusterConfig(discovery="kubernetes", pod_label=f"{LABEL}=yes",
                            pod_namespace=kube_namespace, api_port=8751)

    async def main() -> None:
        members = KubeMembers(kube, cluster)
        changes: list[int] = []
        members.on_change(lambda: changes.append(len(members.members())))
        await members.start()
        try:
            assert members.members() == []
            await asyncio.to_thread(kube_cluster.apply, stand_in(kube_namespace, "orch-1"))
            await until(lambda: members.members(), timeout=90, message="the Pod as a member")
            pod = await asyncio.to_thread(kube_cluster.get, "pod", "orch-1", kube_namespace)
            assert pod is not None
            [member] = members.members()
            assert member.id == kube_cluster.node_name
            assert member.url == f"http://{pod['status']['podIP']}:8751"
            await asyncio.to_thread(kube_cluster.kubectl, "-n", kube_namespace, "delete",
                                    "pod", "orch-1", "--wait=false")
            await until(lambda: members.live() == [], timeout=60,
                        message="the deleted Pod no longer running")
            # remembered: it may hold conversations (a down shard, not a departed one)
            assert members.members() == [member]
            assert changes == [1]
        finally:
            await members.close()

    asyncio.run(asyncio.wait_for(main(), 240))
