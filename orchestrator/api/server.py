"""The network surface a Supervisor owns: the event log, metrics, and — unless
``[api] listen = ""`` — uvicorn serving the Starlette app as a task of the
supervisor's own event loop (``uvicorn.Server.serve``: no second process or thread).

The listening socket is bound by us before uvicorn starts, so a port in use or a
refused address is one line at start-up, and ``"127.0.0.1:0"`` (tests) has a known
port. uvicorn's own signal handling is switched off: the supervisor's
``capture_signals`` owns SIGINT/SIGTERM and stops the server in its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path

import uvicorn
from loguru import logger

from orchestrator.api.app import Api
from orchestrator.api.auth import ApiConfigError, Listen, parse_listen, start_error
from orchestrator.api.events import EventStore
from orchestrator.api.idempotency import IdempotencyKeys
from orchestrator.api.metrics import Metrics
from orchestrator.config.model import Config
from orchestrator.engine.ports import Control
from orchestrator.host.secretfile import SecretFileError, ensure_secret

SHUTDOWN_GRACE = 3  # s (uvicorn takes whole seconds)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the supervisor owns the signals
        yield

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stop = asyncio.Event()

    async def main_loop(self) -> None:
        """uvicorn's own loop wakes every 0.1 s; once a second (its Date-header tick)
        is enough here, where the supervisor's idle CPU is a target; ``stop()`` ends
        the wait at once."""
        counter = 0
        while not await self.on_tick(counter):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            counter += 10

    def stop(self) -> None:
        self.should_exit = True
        self._stop.set()


def preflight(cfg: Config) -> tuple[Listen | None, str | None]:
    """Checks before anything starts: (where to listen, the token). Raises ApiConfigError."""
    listen = parse_listen(cfg.api.listen)
    token = None
    if listen is not None and cfg.api.token_file:  # no API, no token to create
        try:
            token = ensure_secret(Path(cfg.api.token_file))
        except SecretFileError as exc:
            raise ApiConfigError(f"[api] token_file: {exc}") from None
    if listen is not None:
        problem = start_error(listen, token is not None)
        if problem:
            raise ApiConfigError(problem)
    return listen, token


def bind(listen: Listen) -> socket.socket:
    try:
        if listen.path:
            path = listen.path
            with contextlib.suppress(FileNotFoundError):  # a stale socket from a previous run
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o600)
        else:
            infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        raise ApiConfigError(f"[api] listen = {listen.url()}: cannot listen "
                             f"({exc.strerror or exc})") from None
    return sock


class ApiService:
    """The HTTP face on the engine's event loop. Its stores (event log, idempotency
    keys) are opened and closed by the composition root; ``close`` ends the server."""

    def __init__(self, control: Control, listen: Listen | None, token: str | None,
                 events: EventStore, metrics: Metrics, keys: IdempotencyKeys) -> None:
        self.listen = listen
        self.events = events
        self.metrics = metrics
        self.api = Api(control, token, events, metrics, keys)
        self._sock = bind(listen) if listen else None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.url: str | None = None
        if self._sock is not None and listen is not None:
            if listen.path:
                self.url = listen.url()
            else:
                host, port = self._sock.getsockname()[:2]
                self.url = Listen(host=host, port=port).url()

    async def start(self) -> None:
        if self._sock is None:
            return
        config = uvicorn.Config(self.api.app(), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                proxy_headers=False, server_header=False,
                                timeout_keep_alive=30)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="api")
        logger.info("API listening on {}", self.url)

    async def close(self) -> None:
        self.api.closing.set()
        self.events.end_streams()
        if self._server is not None and self._task is not None:
            self._server.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_GRACE + 2)
            except Exception as exc:  # noqa: BLE001 - a timeout or the server's own error: cancel it
                logger.warning("API server did not stop cleanly: {}", exc or "timeout")
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            if self.listen and self.listen.path:
                with contextlib.suppress(OSError):
                    os.unlink(self.listen.path)
