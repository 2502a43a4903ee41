"""engine.retention's worker process: it yields the CPU to the loop from the moment it
exists (a real spawned process, its priority read back from the kernel)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from orchestrator.engine.retention import WORKER_NICE, _LowContext, _worker_init


def test_the_worker_runs_niced_and_the_parent_does_not() -> None:
    pool = ProcessPoolExecutor(1, mp_context=_LowContext(), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pid = pool.submit(os.getpid).result(timeout=60)
        assert pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) >= WORKER_NICE
    finally:
        pool.shutdown()
    assert os.getpriority(os.PRIO_PROCESS, 0) < WORKER_NICE
