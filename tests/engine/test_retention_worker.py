"""engine.retention's worker process: it yields the CPU and the disk to the loop from
the moment it exists (a real spawned process, its priorities read back from the kernel)."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from orchestrator.engine.retention import WORKER_NICE, _LowContext, _worker_init, io_idle

IOPRIO_GET = {"x86_64": 252, "aarch64": 31}


def _ioprio_class(pid: int) -> int | None:
    import ctypes
    import platform

    nr = IOPRIO_GET.get(platform.machine())
    if nr is None:
        return None
    value = ctypes.CDLL(None, use_errno=True).syscall(nr, 1, pid)
    return None if value < 0 else value >> 13


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling classes")
def test_the_worker_runs_niced_and_in_the_idle_io_class() -> None:
    pool = ProcessPoolExecutor(1, mp_context=_LowContext(), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pid = pool.submit(os.getpid).result(timeout=60)
        assert pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) >= WORKER_NICE
        if _ioprio_class(pid) is not None:
            assert _ioprio_class(pid) == 3  # IOPRIO_CLASS_IDLE
    finally:
        pool.shutdown()
    assert os.getpriority(os.PRIO_PROCESS, 0) < WORKER_NICE  # the parent is left alone


def test_io_idle_on_an_unknown_process_says_no() -> None:
    assert io_idle(2**22 + 12345) is False  # no such pid: the kernel refuses, no raise
