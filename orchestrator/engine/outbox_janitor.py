"""Removing settled replies' ``outbox/<id>/`` folders without holding up the event loop.

A delivery pass removes what it settled at once, but only a few dozen entries' worth
(``INLINE_OPS``, well under a millisecond): a reply's folder is usually empty by then,
its files moved to ``delivered/``. Whatever is left — an agent's 200 000 junk files,
a 3 000-deep tree — goes to the ``OutboxJanitor``: one background task that removes
``STEP_OPS`` entries at a time in a thread of its own (``host.treeremove``, by
descriptor, iterative, never following a link), taking the queued folders in turn, so
one huge tree neither stalls the loop nor starves another session's cleanup. Every
session keeps being served meanwhile: passes never wait for the janitor.

A folder that needs more than one step is logged once when it is found and once when
it is gone; one that cannot be removed at all (e.g. no permission) is logged once and
left. The queue lives in memory: a restart in the middle leaves the rest of that
folder on disk (as a crash between recording and cleaning always has).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from orchestrator.contract.layout import OUTBOX
from orchestrator.host.safefs import SessionDir
from orchestrator.host.treeremove import Removal, remove_tree

INLINE_OPS = 64  # per pass, on the loop: a reply folder's few leftovers
STEP_OPS = 2000  # per janitor step, in its thread (a few ms of work)


@dataclass
class _Job:
    agent_group: str
    session_id: str
    out_id: str
    ops: int = 0
    steps: int = 0
    hoisted: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.agent_group, self.session_id, self.out_id)


def remove_step(data_dir: Path, job: _Job, budget: int) -> Removal:
    """One bounded step at ``outbox/<id>`` of the job's session (run in a thread): the
    session folder and ``outbox/`` are opened afresh, never through a link."""
    try:
        with SessionDir(data_dir, job.agent_group, job.session_id) as folder:
            outbox = folder.open_dir(OUTBOX)
            try:
                return remove_tree(outbox, job.out_id, budget)
            finally:
                os.close(outbox)
    except FileNotFoundError:  # the session or its outbox/ is gone: so is the folder
        return Removal(done=True)
    except OSError as exc:
        return Removal(stuck=f"cannot open it ({exc.strerror or exc})")


class OutboxJanitor:
    def __init__(self, data_dir: Path, step_ops: int = STEP_OPS) -> None:
        self.data_dir = data_dir
        self.step_ops = step_ops
        self._queue: deque[_Job] = deque()
        self._queued: set[tuple[str, str, str]] = set()
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, agent_group: str, session_id: str, out_ids: list[str]) -> None:
        """Queue folders to remove; returns at once."""
        for out_id in out_ids:
            job = _Job(agent_group, session_id, out_id)
            if job.key not in self._queued:
                self._queued.add(job.key)
                self._queue.append(job)
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="outbox-janitor")

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-rm")
        while self._queue:
            job = self._queue[0]
            r = await loop.run_in_executor(self._pool, remove_step, self.data_dir, job,
                                           self.step_ops)
            self._queue.popleft()
            job.ops += r.ops
            job.steps += 1
            job.hoisted += r.hoisted
            where = f"sessions/{job.agent_group}/{job.session_id}/{OUTBOX}/{job.out_id}"
            if r.stuck is not None:
                logger.warning("{}: could not clean up ({}); leaving the rest", where, r.stuck)
            elif not r.done:
                if job.steps == 1:
                    logger.info("{}: a large tree (over {} entries{}); removing it in the "
                                "background", where, INLINE_OPS + self.step_ops,
                                ", deeper than the open-folder bound" if r.hoisted else "")
                self._queue.append(job)  # round robin: the next folder gets a step first
                continue
            elif job.steps > 1:
                logger.info("{}: removed ({} operations in {} steps)", where, job.ops,
                            job.steps)
            self._queued.discard(job.key)

    async def aclose(self) -> None:
        """Stop between steps (the step under way finishes: it is bounded)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
