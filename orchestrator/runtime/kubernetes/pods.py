"""What a Pod's status means for its session, as pure functions.

    classify(pod) -> PodView     # pending | running | ended | start_failed | unschedulable
    exit_reason(view, stopping=, killing=) -> str  # the AgentExit reason

The Pod comes as the API's JSON (a dict), from a list, a watch event or a create
answer. Only the ``agent`` container counts. What the kubelet and the scheduler
write there is read as follows:

- ``terminated`` container: ``ended`` with its exit code; ``OOMKilled`` -> ``oom``;
- Pod ``Failed`` with reason ``Evicted`` (node pressure): ``ended``, ``evicted``;
- a Pod with a ``deletionTimestamp`` that ended: ``vanished`` unless we deleted it
  (``exit_reason`` says ``stopped``/``killed`` then): someone deleted it by hand;
- ``waiting`` for an image (``ErrImagePull``, ``ImagePullBackOff``,
  ``InvalidImageName``, ``ErrImageNeverPull``) or unable to create the container
  (``CreateContainerConfigError`` ...): ``start_failed`` with one line naming the
  image and the fix;
- ``PodScheduled`` False (``Unschedulable``): ``unschedulable`` with the
  scheduler's words; the runtime ends it once ``start_timeout`` has passed;
- Pod ``Failed`` before its container ran (kubelet admission refused it, e.g.
  ``OutOfmemory`` on the pinned node): ``start_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.runtime.base import wall_between
from orchestrator.runtime.kubernetes.spec import CONTAINER

PENDING = "pending"
RUNNING = "running"
ENDED = "ended"
START_FAILED = "start_failed"
UNSCHEDULABLE = "unschedulable"

PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                          "ErrImageNeverPull", "RegistryUnavailable"})
CREATE_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError",
                            "RunContainerError", "PreCreateHookError", "PreStartHookError"})


@dataclass(frozen=True)
class PodView:
    """Where a Pod is, for the runtime. ``reason``: the AgentExit reason of an ended
    Pod (before ``exit_reason`` applies what we asked for); ``message``: one line for
    a start that failed or cannot be scheduled."""

    state: str
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    # an ended container's own run: its startedAt to its finishedAt (None: not told)
    wall_seconds: float | None = None

    @property
    def alive(self) -> bool:
        return self.state in (PENDING, RUNNING, UNSCHEDULABLE)


def _one_line(text: Any, limit: int = 300) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _agent_status(status: dict[str, Any]) -> dict[str, Any] | None:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return cs
    return None


def _image(pod: dict[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == CONTAINER:
            return str(c.get("image") or "?")
    return "?"


def _terminated(cs: dict[str, Any] | None) -> dict[str, Any] | None:
    if cs is None:
        return None
    return (cs.get("state") or {}).get("terminated")


def _wall(term: dict[str, Any] | None) -> float | None:
    """A terminated container's wall time, from the kubelet's startedAt/finishedAt."""
    if term is None:
        return None
    started, finished = term.get("startedAt"), term.get("finishedAt")
    return wall_between(started if isinstance(started, str) else None,
                        finished if isinstance(finished, str) else None)


def classify(pod: dict[str, Any]) -> PodView:
    """The state of one Pod of ours (see the module docstring)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    deleting = bool(meta.get("deletionTimestamp"))
    cs = _agent_status(status)
    term = _terminated(cs)
    if status.get("reason") == "Evicted":
        code = term.get("exitCode") if term else None
        return PodView(ENDED, code, "evicted", _one_line(status.get("message")),
                       _wall(term))
    if term is not None:
        code = term.get("exitCode")
        if term.get("reason") == "OOMKilled":
            reason = "oom"
        elif deleting:
            reason = "vanished"
        else:
            reason = "exited"
        return PodView(ENDED, code if isinstance(code, int) else None, reason,
                       wall_seconds=_wall(term))
    waiting = ((cs or {}).get("state") or {}).get("waiting") or {}
    why = waiting.get("reason") or ""
    if why in PULL_REASONS:
        return PodView(START_FAILED, message=(
            f"image {_image(pod)} cannot be used on node {(pod.get('spec') or {}).get('nodeName')}"
            f" ({why}: {_one_line(waiting.get('message')) or 'no detail'}): import or push "
            "it there, or fix [kubernetes] image / image_pull_policy"))
    if why in CREATE_REASONS:
        return PodView(START_FAILED, message=(
            f"container of Pod {meta.get('name')} cannot be created ({why}: "
            f"{_one_line(waiting.get('message')) or 'no detail'})"))
    if phase in ("Succeeded", "Failed"):
        if phase == "Failed" and cs is None:  # its container never existed
            return PodView(START_FAILED, message=(
                f"Pod {meta.get('name')} was refused by its node "
                f"({status.get('reason') or 'Failed'}: "
                f"{_one_line(status.get('message')) or 'no detail'})"))
        return PodView(ENDED, None, "vanished" if deleting else "exited")
    if cs is not None and (cs.get("state") or {}).get("running") is not None:
        return PodView(RUNNING)
    for cond in status.get("conditions") or []:
        if (cond.get("type") == "PodScheduled" and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"):
            return PodView(UNSCHEDULABLE, message=(
                f"Pod {meta.get('name')} cannot be scheduled: "
                f"{_one_line(cond.get('message')) or 'no detail'}"))
    return PodView(PENDING)


def exit_reason(view: PodView, *, stopping: bool = False, killing: bool = False) -> str:
    """exited | oom | evicted | vanished | stopped | killed: what we asked for wins
    (a Pod we deleted ends with 137/143 and a deletionTimestamp), then an OOM kill or
    an eviction, then what the Pod says."""
    if stopping:
        return "stopped"
    if killing:
        return "killed"
    return view.reason or "exited"


def pending_too_long(view: PodView, waited: float, start_timeout: float) -> str | None:
    """The one line that ends a start still Pending after ``start_timeout`` s, or None."""
    if view.state not in (PENDING, UNSCHEDULABLE) or waited < start_timeout:
        return None
    why = view.message or "still Pending (no node ran it)"
    return f"{why}; gave up after {start_timeout:g}s ([kubernetes] start_timeout)"
