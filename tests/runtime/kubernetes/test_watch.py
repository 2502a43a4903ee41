"""PodWatch's list-then-watch loop with a minimal fake stream: a relist on 410 Gone (at
once) and on a dropped stream (after a backoff), each watch from its list's version.

The real API server is asked for a 410 in test_kubernetes_runtime (a watch from
resourceVersion 1); a young cluster's watch cache may still hold every event since
version 1 and replay them instead, so the loop itself is pinned down here, where the
410 is certain. Only the API calls are fake; the loop, its task and its timing are real.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from orchestrator.runtime.kubernetes.calls import ApiUnavailable, Gone
from orchestrator.runtime.kubernetes.spec import pod_selectors
from orchestrator.runtime.kubernetes.watch import PodWatch
from tests.support.helpers import until


class FakeCalls:
    """list() answers version "10", "20", ...; watch() fails as scripted, then streams."""

    namespace = "ns"

    def __init__(self, script: list[BaseException | None]) -> None:
        self.script = script
        self.watched_from: list[str] = []
        self.lists = 0

    async def list(self, labels: dict[str, str], fields: dict[str, str]
                   ) -> tuple[list[dict[str, Any]], str]:
        assert fields == {"spec.nodeName": "n"}  # every list is of our node's Pods
        self.lists += 1
        return [{"metadata": {"name": f"p{self.lists}"}}], str(self.lists * 10)

    async def watch(self, labels: dict[str, str], fields: dict[str, str], version: str
                    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        assert fields == {"spec.nodeName": "n"}
        self.watched_from.append(version)
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        yield "MODIFIED", {"metadata": {"name": "p", "resourceVersion": "99"}}
        await asyncio.Event().wait()  # an open stream with nothing more to say


async def test_gone_relists_at_once_and_a_dropped_stream_after_a_backoff():
    calls = FakeCalls([Gone("too old resource version: 1 (30)"),
                       ApiUnavailable("stream dropped")])
    listed: list[list[str]] = []
    events: list[tuple[str, str]] = []

    async def on_list(pods: list[dict[str, Any]]) -> None:
        listed.append([p["metadata"]["name"] for p in pods])

    watch = PodWatch(calls, pod_selectors("i", "n"), on_list,  # type: ignore[arg-type]
                     lambda kind, pod: events.append((kind, pod["metadata"]["name"])),
                     first_version="1")
    watch.ensure_started()
    try:
        await until(lambda: events, 10, "the event after two relists")
        assert calls.watched_from == ["1", "20", "30"]  # the old version once, then each list's
        assert listed == [["p1"], ["p2"], ["p3"]]
        assert (watch.gone, watch.drops, watch.lists) == (1, 1, 3)
        assert watch.connected and watch.version == "99"
        assert events == [("MODIFIED", "p")]
    finally:
        await watch.stop()
    assert not watch.running and not watch.connected
