"""Cluster membership from Kubernetes (issue 23, ``[cluster] discovery = "kubernetes"``):
the orchestrator Pods carrying ``[cluster] pod_label``, found with the same
list-then-watch as the agent Pods (``watch.PodWatch`` over ``calls.KubeCalls``).

A member's id is its node's name (an orchestrator owns the session folders on its
node's disk, so the node is the stable identity across Pod restarts); its URL is the
Pod's IP and ``[cluster] api_port``. A Pod counts once it is Running with an IP and
not being deleted; two on one node (a rolling update) → the newest. Satisfies
``api.peers.Membership`` (structurally: the runtime layer does not import the API).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from loguru import logger

from orchestrator.config.cluster import Member
from orchestrator.config.model import ClusterConfig, KubernetesConfig
from orchestrator.runtime.kubernetes.calls import KubeCalls
from orchestrator.runtime.kubernetes.spec import node_name as _node_name
from orchestrator.runtime.kubernetes.watch import PodWatch


def node_name(config: KubernetesConfig) -> str:
    """This shard's id on Kubernetes: ``[kubernetes] node_name``, ``NODE_NAME``, the host."""
    return _node_name(config.node_name)


def label_selector(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` → {k: v, k2: v2} (equality selectors only)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise ValueError(f"[cluster] pod_label {text!r}: write 'KEY=VALUE[,KEY=VALUE]'")
        out[key.strip()] = value.strip()
    return out


def members_of(pods: list[dict[str, Any]], port: int) -> list[Member]:
    """The live orchestrator Pods as members, one per node (the newest), by id."""
    best: dict[str, tuple[str, Member]] = {}
    for pod in pods:
        meta, spec, status = (pod.get("metadata") or {}, pod.get("spec") or {},
                              pod.get("status") or {})
        node, ip = spec.get("nodeName"), status.get("podIP")
        if not node or not ip or status.get("phase") != "Running" \
                or meta.get("deletionTimestamp"):
            continue
        host = f"[{ip}]" if ":" in ip else ip
        created = str(meta.get("creationTimestamp") or "")
        if node not in best or created > best[node][0]:
            best[node] = (created, Member(node, f"http://{host}:{port}"))
    return [best[k][1] for k in sorted(best)]


class KubeMembers:
    def __init__(self, kube: KubernetesConfig, cluster: ClusterConfig) -> None:
        namespace = cluster.pod_namespace or os.environ.get("POD_NAMESPACE") or kube.namespace
        self.calls = KubeCalls(dataclasses.replace(kube, namespace=namespace))
        self.port = cluster.api_port
        self._pods: dict[str, dict[str, Any]] = {}
        self._members: list[Member] = []
        self._callbacks: list[Callable[[], None]] = []
        self.watch = PodWatch(self.calls, (label_selector(cluster.pod_label), {}),
                              self._listed, self._event)

    def members(self) -> list[Member]:
        return list(self._members)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        self.watch.ensure_started()
        if not await self.watch.wait_listed(10):
            logger.warning("cluster membership: no list of the orchestrator Pods within 10s; "
                           "this shard serves alone until one comes")

    async def close(self) -> None:
        await self.watch.stop()
        await self.calls.close()

    async def _listed(self, pods: list[dict[str, Any]]) -> None:
        self._pods = {(p.get("metadata") or {}).get("uid", ""): p for p in pods}
        self._update()

    def _event(self, kind: str, pod: dict[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid", "")
        if kind == "DELETED":
            self._pods.pop(uid, None)
        else:
            self._pods[uid] = pod
        self._update()

    def _update(self) -> None:
        members = members_of(list(self._pods.values()), self.port)
        if members == self._members:
            return
        logger.info("cluster members: {}", ", ".join(f"{m.id}={m.url}" for m in members)
                    or "none")
        self._members = members
        for callback in self._callbacks:
            callback()
