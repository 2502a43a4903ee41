"""List-then-watch the Pods of one instance in one namespace, the Kubernetes way.

    PodWatch(calls, (labels, fields), on_list, on_event)

One asyncio task (lightkube is async: no thread). Each round:

1. **list** the Pods carrying our instance label on our node (a label and a field
   selector: ``spec.pod_selectors``); ``on_list(pods)`` (the runtime
   reconciles its bookkeeping against it: exits missed, Pods to adopt);
2. **watch** from the list's ``resourceVersion``; every event goes to
   ``on_event(type, pod)`` (``ADDED`` / ``MODIFIED`` / ``DELETED``). lightkube renews
   the request every ``WATCH_SERVER_TIMEOUT`` s from the last version it saw.

It lists again (a new round) on ``410 Gone`` (the version is older than the API
server keeps: relisted at once) and whenever the stream fails or drops (after a
backoff of 0.1 s doubling to ``BACKOFF_MAX``). What happened in between is in the
new list, so nothing is missed, only seen late. An unreachable API server is logged
once per outage (by ``KubeCalls``). ``connected`` / ``lists`` / ``gone`` are
observable (tests, bench); ``first_version`` lets a test start the first watch
from an old version to provoke a 410.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from loguru import logger

from orchestrator.runtime.base import RuntimeUnavailable
from orchestrator.runtime.kubernetes.calls import Gone, KubeCalls

BACKOFF_MAX = 5.0

OnList = Callable[[list[dict[str, Any]]], Awaitable[None]]
OnEvent = Callable[[str, dict[str, Any]], None]


class PodWatch:
    """The list-then-watch task of one runtime. ``ensure_started`` / ``stop``."""

    def __init__(self, calls: KubeCalls, selectors: tuple[dict[str, str], dict[str, str]],
                 on_list: OnList, on_event: OnEvent, *,
                 first_version: str | None = None) -> None:
        self.calls = calls
        self.labels, self.fields = selectors
        self.on_list = on_list
        self.on_event = on_event
        self.first_version = first_version
        self.connected = False  # a watch stream is open
        self.lists = 0  # completed lists (each one handed to on_list)
        self.gone = 0  # 410 Gone answers (each one a relist)
        self.drops = 0  # streams that failed or ended other than by 410
        self.version: str | None = None  # the last resourceVersion seen
        self._task: asyncio.Task | None = None
        self._listed = asyncio.Event()
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def ensure_started(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._listed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._main(), name="pod-watch")

    async def wait_listed(self, timeout: float) -> bool:
        """Wait for the next completed list (True) or ``timeout`` s (False)."""
        try:
            await asyncio.wait_for(self._listed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connected = False

    async def _main(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                version = await self._list()
                backoff = 0.1
                await self._follow(version)
                self.drops += 1  # lightkube renews on a clean end: an end here is a drop
            except Gone as exc:
                self.gone += 1
                logger.info("Pod watch in {}: resourceVersion too old ({}); listing again",
                            self.calls.namespace, exc)
                continue
            except RuntimeUnavailable as exc:
                self.drops += 1
                logger.debug("Pod watch in {} failed: {}; listing again in {:g}s",
                             self.calls.namespace, exc, backoff)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in a callback must not end the watch
                self.drops += 1
                logger.exception("Pod watch in {} failed; listing again", self.calls.namespace)
            finally:
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _list(self) -> str:
        pods, version = await self.calls.list(self.labels, self.fields)
        await self.on_list(pods)
        self.lists += 1
        self._listed.set()
        self._listed = asyncio.Event()
        self.version = version
        if self.first_version is not None:  # a test's old version (provokes 410 Gone)
            version, self.first_version = self.first_version, None
        return version

    async def _follow(self, version: str) -> None:
        self.connected = True
        async for kind, pod in self.calls.watch(self.labels, self.fields, version):
            self.version = ((pod.get("metadata") or {}).get("resourceVersion")
                            or self.version)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.on_event(kind, pod)
