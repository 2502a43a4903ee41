"""The composition root: a failure at any point of start-up releases everything.

Real parts: the data-dir lock, SQLite stores, the API socket, the inotify watch thread
and the local runtime. Only the failure itself is injected (a real part cannot be made
to fail on cue at each of these points).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.server import ApiService
from orchestrator.cli.compose import assembled, make_runtime
from orchestrator.engine.supervisor import Supervisor
from orchestrator.host.data_lock import lock_data_dir
from tests.support.e2e import make_config


class Boom(RuntimeError):
    pass


def open_files(under: Path) -> list[str]:
    """This process's descriptors on files under ``under``, on inotify, or on sockets."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)) or "inotify" in target or target.startswith("socket:"):
            found.append(target)
    return sorted(found)


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:g}s")
        time.sleep(0.02)


def fail_in_reconcile(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    async def boom(self: Supervisor) -> None:
        raise Boom("start-up reconcile failed")

    monkeypatch.setattr(Supervisor, "_reconcile_at_start", boom)
    return {}


def fail_in_runtime(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def factory(*args: Any) -> Any:
        raise Boom("the runtime could not be made")

    return {"runtime_factory": factory}


def fail_in_api_start(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    async def boom(self: ApiService) -> None:
        raise Boom("the API server could not start")

    monkeypatch.setattr(ApiService, "start", boom)
    return {"runtime_factory": make_runtime}


@pytest.mark.parametrize("inject", [fail_in_reconcile, fail_in_runtime, fail_in_api_start],
                         ids=["start-up reconcile", "runtime construction", "API start"])
def test_a_failure_during_start_up_releases_the_lock_socket_threads_and_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject) -> None:
    cfg = make_config(tmp_path)
    kwargs = inject(monkeypatch)
    threads_before = set(threading.enumerate())
    files_before = open_files(tmp_path)
    urls: list[str] = []

    async def main() -> None:
        async with assembled(cfg, **kwargs) as service:
            if service.api.url:
                urls.append(service.api.url)
            await service.supervisor.serve()

    with pytest.raises(Boom):
        asyncio.run(main())

    lock_data_dir(cfg.data_dir).release()  # not AlreadyRunning: the lock is free
    wait_until(lambda: set(threading.enumerate()) <= threads_before,
               "the watch and runtime threads ending")
    assert open_files(tmp_path) == files_before  # stores, watch, socket: all closed
    for url in urls:  # the API's port no longer accepts
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()
