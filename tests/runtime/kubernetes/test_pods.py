"""kubernetes pods: what a Pod's status means for its session (pure, table-tested)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.runtime.kubernetes.pods import (
    ENDED,
    PENDING,
    RUNNING,
    START_FAILED,
    UNSCHEDULABLE,
    PodView,
    classify,
    exit_reason,
    pending_too_long,
)


def pod(phase: str = "Pending", state: dict | None = None, *, reason: str | None = None,
        deleting: bool = False, conditions: list | None = None, message: str = "") -> dict:
    status: dict[str, Any] = {"phase": phase}
    if state is not None:
        status["containerStatuses"] = [{"name": "agent", "state": state}]
    if reason:
        status["reason"] = reason
        status["message"] = message
    if conditions:
        status["conditions"] = conditions
    meta: dict[str, Any] = {"name": "orch-p"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": status,
            "spec": {"nodeName": "localhost",
                     "containers": [{"name": "agent", "image": "agent:1"}]}}


UNSCHED = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient memory."}]


@pytest.mark.parametrize("given, state, code, reason", [
    (pod(), PENDING, None, ""),
    (pod("Pending", {"waiting": {"reason": "ContainerCreating"}}), PENDING, None, ""),
    (pod("Running", {"running": {"startedAt": "x"}}), RUNNING, None, ""),
    (pod("Running", {"running": {}}, deleting=True), RUNNING, None, ""),  # still stopping
    (pod("Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}), ENDED, 0,
     "exited"),
    (pod("Failed", {"terminated": {"exitCode": 3, "reason": "Error"}}), ENDED, 3, "exited"),
    (pod("Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}), ENDED, 137,
     "oom"),
    (pod("Running", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}), ENDED, 137,
     "oom"),  # the container's state comes before the Pod's phase
    (pod("Failed", {"terminated": {"exitCode": 143, "reason": "Error"}}, deleting=True),
     ENDED, 143, "vanished"),  # deleted by someone else
    (pod("Failed", None, reason="Evicted", message="The node was low on resource: memory."),
     ENDED, None, "evicted"),
    (pod("Failed", {"terminated": {"exitCode": 137}}, reason="Evicted"), ENDED, 137,
     "evicted"),
    (pod("Succeeded", None), ENDED, None, "exited"),
    (pod("Pending", conditions=UNSCHED), UNSCHEDULABLE, None, ""),
])
def test_a_pods_state(given, state, code, reason):
    view = classify(given)
    assert (view.state, view.exit_code, view.reason) == (state, code, reason)


@pytest.mark.parametrize("waiting, words", [
    ("ErrImagePull", "image agent:1 cannot be used on node localhost (ErrImagePull"),
    ("ImagePullBackOff", "(ImagePullBackOff: "),
    ("InvalidImageName", "(InvalidImageName: "),
    ("ErrImageNeverPull", "(ErrImageNeverPull: "),
    ("CreateContainerConfigError", "container of Pod orch-p cannot be created"),
    ("RunContainerError", "(RunContainerError: "),
])
def test_a_start_that_cannot_succeed_says_why_in_one_line(waiting, words):
    view = classify(pod("Pending", {"waiting": {"reason": waiting,
                                                "message": "some\nmulti-line detail"}}))
    assert view.state == START_FAILED
    assert words in view.message
    assert "\n" not in view.message and "some multi-line detail" in view.message
    if waiting in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                   "ErrImageNeverPull"):
        assert "fix [kubernetes] image" in view.message


def test_a_pod_its_node_refused_is_a_failed_start():
    view = classify(pod("Failed", None, reason="OutOfmemory", message="Node didn't have "
                        "enough resource: memory"))
    assert view.state == START_FAILED and "OutOfmemory" in view.message


def test_an_unschedulable_pod_quotes_the_scheduler():
    view = classify(pod("Pending", conditions=UNSCHED))
    assert "Insufficient memory" in view.message


@pytest.mark.parametrize("view, stopping, killing, expected", [
    (PodView(ENDED, 0, "exited"), False, False, "exited"),
    (PodView(ENDED, 137, "oom"), False, False, "oom"),
    (PodView(ENDED, None, "evicted"), False, False, "evicted"),
    (PodView(ENDED, 143, "vanished"), False, False, "vanished"),
    (PodView(ENDED, 143, "vanished"), True, False, "stopped"),  # we deleted it
    (PodView(ENDED, 137, "vanished"), False, True, "killed"),
    (PodView(ENDED, 137, "oom"), False, True, "killed"),  # as in Docker: our kill wins
    (PodView(RUNNING), True, False, "stopped"),
    (PodView(ENDED, 1, ""), False, False, "exited"),
])
def test_the_exit_reason_follows_what_we_asked_for(view, stopping, killing, expected):
    assert exit_reason(view, stopping=stopping, killing=killing) == expected


@pytest.mark.parametrize("view, waited, limit, ends", [
    (PodView(PENDING), 5, 10, False),
    (PodView(PENDING), 10, 10, True),
    (PodView(UNSCHEDULABLE, message="cannot be scheduled: x"), 11, 10, True),
    (PodView(RUNNING), 99, 10, False),
    (PodView(START_FAILED, message="m"), 99, 10, False),  # said by itself, not a timeout
])
def test_pending_too_long(view, waited, limit, ends):
    line = pending_too_long(view, waited, limit)
    assert (line is not None) is ends
    if line:
        assert "start_timeout" in line and "\n" not in line
