"""Kubernetes membership of the shards (``runtime.kubernetes.members``): the pure parts —
which orchestrator Pods count as members (by node or by Pod name), their API port,
the remembered list, and the label selector."""

from __future__ import annotations

import pytest

from orchestrator.config.cluster import Member
from orchestrator.runtime.kubernetes.members import (
    api_port,
    label_selector,
    members_of,
    remembered,
)


def pod(node: str | None, ip: str | None, phase: str = "Running", created: str = "2026-01-01",
        deleting: bool = False, name: str = "orch-x", port: int | None = None) -> dict:
    meta = {"name": name, "creationTimestamp": created,
            **({"deletionTimestamp": "x"} if deleting else {})}
    ports = [{"name": "metrics", "containerPort": 9}] + (
        [{"name": "api", "containerPort": port}] if port else [])
    return {"metadata": meta, "spec": {"nodeName": node, "containers": [{"ports": ports}]},
            "status": {"phase": phase, "podIP": ip}}


@pytest.mark.parametrize("pods, expected", [
    ([pod("n2", "10.0.0.2"), pod("n1", "10.0.0.1")],
     [Member("n1", "http://10.0.0.1:8750"), Member("n2", "http://10.0.0.2:8750")]),
    ([pod("n1", None)], []),                                  # no IP yet
    ([pod(None, "10.0.0.1")], []),                            # not scheduled
    ([pod("n1", "10.0.0.1", phase="Pending")], []),
    ([pod("n1", "10.0.0.1", deleting=True)], []),             # going away
    ([pod("n1", "10.0.0.1", created="2026-01-01"),            # a rolling update: the newest
      pod("n1", "10.0.0.9", created="2026-02-01")], [Member("n1", "http://10.0.0.9:8750")]),
    ([pod("n1", "fd00::1")], [Member("n1", "http://[fd00::1]:8750")]),
])
def test_members_of(pods, expected):
    assert members_of(pods, 8750) == expected


@pytest.mark.parametrize("pods, expected", [
    # two on one node (hostNetwork): by Pod name, each its own port; the oldest first
    ([pod("n1", "10.0.0.1", name="orch-b", port=9002, created="2026-01-02"),
      pod("n1", "10.0.0.1", name="orch-a", port=9001, created="2026-01-03")],
     [Member("orch-b", "http://10.0.0.1:9002"), Member("orch-a", "http://10.0.0.1:9001")]),
    ([pod("n1", "10.0.0.1", name="Bad_Name!")], []),          # not a valid shard id
    ([pod(None, "10.0.0.1", name="orch-a")], []),             # not scheduled
])
def test_members_by_pod_name(pods, expected):
    assert members_of(pods, 8750, "pod") == expected


@pytest.mark.parametrize("port, expected", [(None, 8750), (9001, 9001)])
def test_api_port_is_the_named_container_port(port, expected):
    assert api_port(pod("n1", "10.0.0.1", port=port), 8750) == expected


A, B, C = (Member("a", "http://1:1"), Member("b", "http://2:2"), Member("c", "http://3:3"))


@pytest.mark.parametrize("known, live, expected", [
    ([], [B, A], [B, A]),                                     # first list: as given
    ([A, B], [B], [A, B]),                                    # a's Pod gone: a stays
    ([A, B], [Member("a", "http://9:9"), B], [Member("a", "http://9:9"), B]),  # new Pod IP
    ([A, B], [C, A], [A, B, C]),                              # a newcomer goes last
])
def test_members_are_remembered_in_join_order(known, live, expected):
    assert remembered(known, live) == expected


@pytest.mark.parametrize("text, expected", [
    ("app=orch", {"app": "orch"}),
    ("app.kubernetes.io/name=orchestrator, tier=x",
     {"app.kubernetes.io/name": "orchestrator", "tier": "x"}),
])
def test_label_selector(text, expected):
    assert label_selector(text) == expected


@pytest.mark.parametrize("text", ["app", "=x", "a=b,,"])
def test_label_selector_refuses(text):
    with pytest.raises(ValueError, match="pod_label"):
        label_selector(text)
