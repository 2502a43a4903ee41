"""Each agent Pod's output, kept before the Pod is deleted (a Pod's log goes with it).

    PodLogs(calls: KubeCalls, store: AgentLogs)
    await logs.keep(group, session_id, pod_name)   # -> run number | None
    await logs.around(group, session_id, pod_name, timeout, delete_and_wait)  # a stop

The container's log is read with ``pods/log`` get (the Role grants it), followed
(``follow=true``) until the container ends — for a Pod that ended that is at once; for
one being stopped it is everything up to its last line, its grace included, so a stop
starts the follow *before* its delete and awaits it after the Pod is gone (``around``). It becomes
the session's next run log in ``<data_dir>/logs/<group>/<session>/run-N.log``, exactly
like a Docker container's (``host.agent_logs``): the last ``[sessions]
max_agent_log_bytes`` kept, the newest ``agent_log_runs`` runs.

Bounded, since the output is hostile: only the last ``max_bytes`` are held while
reading, at most ``READ_CAP`` × that much is read (a flood beyond keeps what was
read), and the whole read ends after ``timeout`` s. A failure is one warning line and
the delete goes on: a log is never worth a Pod left behind. A run that printed
nothing leaves no file.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable

from loguru import logger

from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import RuntimeUnavailable
from orchestrator.runtime.kubernetes.calls import KubeCalls
from orchestrator.runtime.kubernetes.spec import CONTAINER

READ_CAP = 16  # × max_bytes: the most read of one run's log
TIMEOUT = 30.0  # s: the longest a read of one run's log may take


@dataclass
class Tail:
    """The last ``max_bytes`` of what was read, and how many bytes before them went."""

    max_bytes: int
    kept: bytearray = field(default_factory=bytearray)
    cut: int = 0
    read: int = 0

    def add(self, chunk: bytes) -> bool:
        """Take a chunk; False once ``READ_CAP`` × ``max_bytes`` have been read."""
        self.kept += chunk
        self.read += len(chunk)
        if len(self.kept) > 2 * self.max_bytes:
            self.trim()
        return self.read <= READ_CAP * self.max_bytes

    def trim(self) -> None:
        if len(self.kept) > self.max_bytes:
            self.cut += len(self.kept) - self.max_bytes
            del self.kept[:len(self.kept) - self.max_bytes]


class PodLogs:
    """Reads a Pod's output and keeps it as its session's next run log."""

    def __init__(self, calls: KubeCalls, store: AgentLogs, timeout: float = TIMEOUT) -> None:
        self.calls = calls
        self.store = store
        self.timeout = timeout

    async def _read(self, name: str, tail: Tail) -> None:
        async for chunk in self.calls.log(name, container=CONTAINER):
            if not tail.add(chunk):
                break

    async def keep(self, group: str, session_id: str, name: str,
                   timeout: float | None = None) -> int | None:
        """Read Pod ``name``'s output (until its container ends, or ``timeout``) and
        keep it; the run's number, or None (nothing printed, or it failed: one line)."""
        tail = Tail(self.store.max_bytes)
        try:
            await asyncio.wait_for(self._read(name, tail), timeout or self.timeout)
        except asyncio.TimeoutError:
            logger.warning("agent {}/{}: the log of Pod {} was still streaming after {:g}s: "
                           "kept what was read", group, session_id, name,
                           timeout or self.timeout)
        except RuntimeUnavailable as exc:
            if not tail.read:
                logger.warning("agent {}/{}: output of Pod {} not kept: {}", group,
                               session_id, name, exc)
                return None
        tail.trim()
        if not tail.kept and not tail.cut:
            return None
        try:
            run = await asyncio.to_thread(self.store.keep, group, session_id,
                                          bytes(tail.kept), tail.cut)
        except (OSError, ValueError) as exc:
            logger.warning("agent {}/{}: output of Pod {} not kept: {}", group, session_id,
                           name, exc)
            return None
        logger.debug("agent {}/{}: output of Pod {} kept as run {}", group, session_id, name,
                     run)
        return run

    async def around(self, group: str, session_id: str, name: str, timeout: float,
                     delete: Awaitable[None]) -> None:
        """``delete`` (a stop's delete and its wait until the Pod is gone) with the
        Pod's log followed from before it, so what the agent writes during its grace is
        kept too; the log is kept once the Pod is gone. A delete that fails stops the
        follow (a live container's stream would not end)."""
        log = asyncio.get_running_loop().create_task(
            self.keep(group, session_id, name, timeout))
        try:
            await delete
        except BaseException:
            log.cancel()
            await asyncio.gather(log, return_exceptions=True)
            raise
        await log
