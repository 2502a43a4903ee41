"""Cluster membership from Kubernetes (issue 23, ``[cluster] discovery = "kubernetes"``):
the orchestrator Pods carrying ``[cluster] pod_label``, found with the same
list-then-watch as the agent Pods (``watch.PodWatch`` over ``calls.KubeCalls``).

A member's id (``[cluster] shard_ids``) is its node's name (``"node"``: one
orchestrator per node, a DaemonSet — the node holds its session folders, so the node
is the stable identity across Pod restarts) or its Pod's name (``"pod"``: several per
node, e.g. a StatefulSet whose Pods keep their names and each has its own data dir);
its URL is the Pod's IP and its container port named ``api`` (``[cluster] api_port``
without one). A Pod counts once it is Running with an IP and not being deleted; two
with one id (a rolling update) → the newest.

Members are **remembered**: a shard whose Pod is deleted or not running stays a member
(its last URL; the liveness probe finds it down), because it may hold conversations —
dropping it would let another shard place them afresh (a split). The list keeps the
order the members were first seen (the first list by creation time), which is what
``rules.placement.possible_holders`` needs. Satisfies ``api.peers.Membership``
(structurally: the runtime layer does not import the API).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from loguru import logger

from orchestrator.config.cluster import MEMBER_ID, Member
from orchestrator.config.sections import ClusterConfig, KubernetesConfig
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


def member_id(pod: dict[str, Any], ids: str) -> str | None:
    """The shard id of an orchestrator Pod: its node's name (``ids = "node"``) or its own
    name (``"pod"``); None if it has none yet (not scheduled) or it is not a valid id."""
    name = ((pod.get("spec") or {}).get("nodeName") if ids == "node"
            else (pod.get("metadata") or {}).get("name"))
    return name if isinstance(name, str) and MEMBER_ID.fullmatch(name) else None


def api_port(pod: dict[str, Any], default: int) -> int:
    """The Pod's container port named ``api``, else ``default`` (``[cluster] api_port``):
    two orchestrators on one node's network (``hostNetwork``) listen on two ports."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "api" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return default


def members_of(pods: list[dict[str, Any]], port: int, ids: str = "node") -> list[Member]:
    """The live orchestrator Pods as members, one per id (the newest), the oldest first
    (then by id)."""
    best: dict[str, tuple[str, Member]] = {}
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ident, ip = member_id(pod, ids), status.get("podIP")
        scheduled = (pod.get("spec") or {}).get("nodeName")
        if not ident or not ip or not scheduled or status.get("phase") != "Running" \
                or meta.get("deletionTimestamp"):
            continue
        host = f"[{ip}]" if ":" in ip else ip
        created = str(meta.get("creationTimestamp") or "")
        if ident not in best or created > best[ident][0]:
            best[ident] = (created, Member(ident, f"http://{host}:{api_port(pod, port)}"))
    return [m for _, m in sorted(best.values(), key=lambda cm: (cm[0], cm[1].id))]


def remembered(known: list[Member], live: list[Member]) -> list[Member]:
    """``known`` with every live member's current URL, and the new ones appended in the
    order given: a member whose Pod went away keeps its place and last URL."""
    urls = {m.id: m.url for m in live}
    out = [Member(m.id, urls.get(m.id, m.url)) for m in known]
    seen = {m.id for m in known}
    return out + [m for m in live if m.id not in seen]


class KubeMembers:
    def __init__(self, kube: KubernetesConfig, cluster: ClusterConfig) -> None:
        namespace = cluster.pod_namespace or os.environ.get("POD_NAMESPACE") or kube.namespace
        self.calls = KubeCalls(dataclasses.replace(kube, namespace=namespace))
        self.port = cluster.api_port
        self.ids = cluster.shard_ids
        self._pods: dict[str, dict[str, Any]] = {}
        self._members: list[Member] = []
        self._callbacks: list[Callable[[], None]] = []
        self.watch = PodWatch(self.calls, (label_selector(cluster.pod_label), {}),
                              self._listed, self._event)

    def members(self) -> list[Member]:
        """Every shard seen since this orchestrator started, in that order."""
        return list(self._members)

    def live(self) -> list[str]:
        """The ids of the members whose Pod runs now (the rest are remembered)."""
        return [m.id for m in members_of(list(self._pods.values()), self.port, self.ids)]

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
        live = members_of(list(self._pods.values()), self.port, self.ids)
        members = remembered(self._members, live)
        if members == self._members:
            return
        running = {m.id for m in live}
        logger.info("cluster members: {}", ", ".join(
            f"{m.id}={m.url}" + ("" if m.id in running else " (no running Pod)")
            for m in members) or "none")
        self._members = members
        for callback in self._callbacks:
            callback()
