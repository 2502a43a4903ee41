"""Kubernetes membership of the shards (``runtime.kubernetes.members``): the pure parts —
which orchestrator Pods count as members, and the label selector."""

from __future__ import annotations

import pytest

from orchestrator.config.cluster import Member
from orchestrator.runtime.kubernetes.members import label_selector, members_of


def pod(node: str | None, ip: str | None, phase: str = "Running", created: str = "2026-01-01",
        deleting: bool = False) -> dict:
    meta = {"creationTimestamp": created, **({"deletionTimestamp": "x"} if deleting else {})}
    return {"metadata": meta, "spec": {"nodeName": node},
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
