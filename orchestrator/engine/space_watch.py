"""The space watchdog: each session's usage against its quota, and the host's reserve.

Measuring a folder is a walk the agent can make slow (``host.space``), so it never
runs in a pass: a pass (outbox or outbound.db activity) or the reconcile sweep asks
``look``; at most one walk per session per ``MIN_INTERVAL``, at most ``MAX_WALKS`` at
once, each in a thread. When a walk changes whether a session is over its space
(``rules.space``), the session is marked for a pass, whose verdict kills it
(``lifecycle.judge``); ``refusal`` turns its starts down, measuring afresh first
(an operator may have freed the space), and each refusal counts as the session's
own start failure, so ``max_tries`` ends its work like any other failure.

The same walks keep the reserve (``host.space.Reserve``): released when an agent
has filled the disk up to it, taken again when the space is back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from loguru import logger

from orchestrator.config.model import Config
from orchestrator.host.space import Reserve, Usage, free_bytes, session_bytes
from orchestrator.rules.space import (
    Disk,
    Step,
    biggest,
    disk_verdict,
    low_reason,
    over_quota,
)

MIN_INTERVAL = 1.0  # s between two walks of one session
MAX_WALKS = 2  # walks at once (threads); more asks wait for the next event or sweep
DISK_EVERY = 1.0  # s between two looks at the free space


class SpaceRefused(Exception):
    """A start refused because the session is over its space (its own failure)."""


class SpaceWatch:
    def __init__(self, cfg: Config, mark: Callable[[str, int], None], timer_flag: int) -> None:
        self.data_dir = cfg.data_dir
        self.limit = cfg.sessions.max_session_bytes
        self.min_free = cfg.sessions.min_free_bytes
        self.mark = mark
        self.flag = timer_flag
        self.reserve = Reserve(cfg.data_dir, self.min_free)
        self.usage: dict[str, int] = {}  # bytes at the last walk
        self.quota: dict[str, str] = {}  # over-quota reasons
        self.disk = Disk(free=2**62, held=0, ever_held=False)
        self.low = False
        self._walked: dict[str, float] = {}  # monotonic time of the last walk's start
        self._walking: set[str] = set()
        self._disk_at = float("-inf")
        self._disk_lock = threading.Lock()  # one reserve step at a time
        self._tasks: set[asyncio.Task] = set()
        self._said_small = False

    @property
    def on(self) -> bool:
        return self.limit > 0 or self.min_free > 0

    def over(self, session_id: str) -> str | None:
        """Why this session must not run (over its quota, or the biggest on a low
        disk), as last measured; None if it may."""
        reason = self.quota.get(session_id)
        if reason is not None:
            return reason
        if self.low and biggest(self.usage) == session_id:
            return low_reason(self.disk, self.min_free, self.usage[session_id])
        return None

    # --- asking for a walk (on the loop; never waits) --------------------------------

    def look(self, agent_group: str, session_id: str, running: bool) -> None:
        """Walk this session's folder soon if it runs or was just written (or is held
        back: to see it come back under), and the free space with it; rate-limited,
        off the loop."""
        if not self.on:
            return
        wanted = running or self.over(session_id) is not None
        now = time.monotonic()
        if not wanted and now - self._disk_at < DISK_EVERY:
            return
        if not wanted:
            session_id = ""  # the free space only
        elif session_id in self._walking or now - self._walked.get(session_id, -1e9) < MIN_INTERVAL:
            return
        if len(self._walking) >= MAX_WALKS:
            return
        self._walking.add(session_id)
        if session_id:
            self._walked[session_id] = now
        self._disk_at = now
        task = asyncio.create_task(self._walk(agent_group, session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _walk(self, agent_group: str, session_id: str) -> None:
        # the biggest session matters only on a low disk: not a sort of every session's
        # usage per walk (that made a 10 000-session start-up quadratic, 12 CPU-s)
        top = biggest(self.usage) if self.low else None
        before = {sid: self.over(sid) is not None for sid in (session_id, top) if sid}
        try:
            usage = await asyncio.to_thread(self._measure, agent_group, session_id)
        except OSError as exc:  # the pass says what is wrong with the folder
            logger.debug("session {}: space not measured: {}", session_id or "-", exc)
            return
        finally:
            self._walking.discard(session_id)
        if session_id and usage is not None:
            self._record(session_id, usage)
        top = biggest(self.usage) if self.low else None
        for sid in {*before, *([top] if top else [])}:
            if (self.over(sid) is not None) != before.get(sid, False):
                self.mark(sid, self.flag)

    def _record(self, session_id: str, usage: Usage) -> None:
        self.usage[session_id] = usage.bytes
        reason = over_quota(usage.bytes, self.limit)
        if reason is None:
            if self.quota.pop(session_id, None) is not None:
                logger.info("session {}: back under its space quota ({} bytes)", session_id,
                            usage.bytes)
        else:
            if session_id not in self.quota:
                logger.error("session {}: {}", session_id, reason)
            self.quota[session_id] = reason

    # --- in a thread ------------------------------------------------------------------

    def _measure(self, agent_group: str, session_id: str) -> Usage | None:
        usage = None
        if session_id:
            usage = session_bytes(self.data_dir, agent_group, session_id,
                                  stop_over=self.limit)
        self._disk_step()
        return usage

    def _disk_step(self) -> None:
        """Look at the free space; release or take the reserve (``disk_verdict``)."""
        if self.min_free <= 0:
            return
        with self._disk_lock:
            held = self.reserve.held()  # a reserve kept by the previous run counts as held
            disk = Disk(free_bytes(self.data_dir), held,
                        self.disk.ever_held or held >= self.min_free)
            verdict = disk_verdict(disk, self.min_free)
            if verdict.step is Step.RELEASE:
                self.reserve.release()
                logger.error("data dir nearly full ({} bytes free): the host's reserve of {} "
                             "bytes released for its own records; the session using the most "
                             "space is stopped", disk.free, self.min_free)
            elif verdict.step is Step.TAKE:
                if self.reserve.take():
                    disk = Disk(free_bytes(self.data_dir), self.min_free, True)
                    if self.disk.ever_held:
                        logger.info("data dir has room again: the host's reserve is kept")
            elif not disk.ever_held and not self._said_small:
                self._said_small = True
                logger.warning("data dir has {} bytes free, too little for the host's reserve "
                               "([sessions] min_free_bytes = {}): none is kept", disk.free,
                               self.min_free)
            self.disk, self.low = disk, verdict.low

    # --- a start --------------------------------------------------------------------------

    async def refusal(self, agent_group: str, session_id: str) -> str | None:
        """Why this session's agent must not start now, measured afresh; None: it may."""
        if not self.on:
            return None
        usage = await asyncio.to_thread(self._measure, agent_group, session_id)
        if usage is not None:
            self._record(session_id, usage)
        return self.over(session_id)

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
