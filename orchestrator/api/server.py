"""The network surface a Supervisor owns: the event log, metrics, and — unless
``[api] listen = ""`` — uvicorn serving the Starlette app as a task of the
supervisor's own event loop (``uvicorn.Server.serve``: no second process or thread).

The listening socket is bound by us before uvicorn starts, so a port in use or a
refused address is one line at start-up, and ``"127.0.0.1:0"`` (tests) has a known
port. uvicorn's own signal handling is switched off: the supervisor's
``capture_signals`` owns SIGINT/SIGTERM and stops the server in its shutdown.

The guards of the open network (deadlines, the connection cap, accept errors) are
in ``api/connections.py``.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import uvicorn
from loguru import logger
from starlette.middleware import Middleware

from orchestrator.api.app import Api
from orchestrator.api.auth import ApiConfigError, Listen, host_rule, parse_listen, start_error
from orchestrator.api.connections import (
    GuardedH11,
    Limits,
    ListenSocket,
    Tally,
    connection_cap,
    quiet_loop,
)
from orchestrator.api.events import EventStore
from orchestrator.api.idempotency import IdempotencyKeys
from orchestrator.api.metrics import Metrics
from orchestrator.api.peers import Peers
from orchestrator.config.model import Config
from orchestrator.engine.ports import Control
from orchestrator.host.secretfile import SecretFileError, ensure_secret
from orchestrator.support.port_holder import port_holder

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


def bind(listen: Listen) -> ListenSocket:
    try:
        if listen.path:
            path = listen.path
            with contextlib.suppress(FileNotFoundError):  # a stale socket from a previous run
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            sock = ListenSocket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o600)
        else:
            infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = ListenSocket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
        sock.keep_spare()
    except OSError as exc:
        raise ApiConfigError(listen_error(listen, exc)) from None
    return sock


def listen_error(listen: Listen, exc: OSError) -> str:
    """One line: why, who holds the port (an orchestrator: its data dir), what to do."""
    line = f"[api] listen = {listen.url()}: cannot listen ({exc.strerror or exc})"
    if exc.errno != errno.EADDRINUSE or listen.path:
        return line
    holder = port_holder(listen.port)
    if holder is not None:
        line += f"; {holder.describe()}"
    return (line + "; pick another port in the config: [api] listen = \"127.0.0.1:PORT\", "
            "\"127.0.0.1:0\" for any free one, or \"\" for no API")


class ApiService:
    """The HTTP face on the engine's event loop. Its stores (event log, idempotency
    keys) are opened and closed by the composition root; ``close`` ends the server."""

    def __init__(self, control: Control, listen: Listen | None, token: str | None,
                 events: EventStore, metrics: Metrics, keys: IdempotencyKeys,
                 peers: Peers | None = None) -> None:
        self.listen = listen
        self.peers = peers  # [cluster]: the other shards (the router in front of the routes)
        self.events = events
        self.metrics = metrics
        self.cfg = control.cfg.api
        rule = host_rule(listen, self.cfg.allowed_hosts, token is not None) if listen else None
        self.api = Api(control, token, events, metrics, keys, rule,
                       unix=bool(listen and listen.path))
        self.tally = Tally()
        self._sock = bind(listen) if listen else None
        if self._sock is not None:
            self._sock.tally = self.tally
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._quiet: contextlib.ExitStack | None = None
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
        self.api.history.start()  # the console's plots: one sample every 10 s
        limits = Limits(self.cfg, connection_cap(self.cfg.max_connections), self.tally)
        protocol = type("GuardedH11", (GuardedH11,), {"limits": limits})
        # log_config=None: uvicorn adds no handlers of its own; its loggers go through
        # loguru's sink (cli.logs.intercept_uvicorn)
        config = uvicorn.Config(self.api.app(self._router()), log_level="warning", access_log=False,
                                log_config=None,
                                lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                proxy_headers=False, server_header=False, http=protocol,
                                timeout_keep_alive=self.cfg.keepalive_timeout,  # type: ignore[arg-type]
                                backlog=1024)
        self._quiet = contextlib.ExitStack()
        self._quiet.enter_context(quiet_loop(self._sock))
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="api")
        logger.info("API listening on {} (at most {} connections)", self.url,
                    limits.max_connections)

    def _router(self) -> tuple[Middleware, ...]:
        if self.peers is None:
            return ()
        from orchestrator.api.shard_router import ShardRouter, local_lookups

        holds, has_session = local_lookups(self.api.control.registry)
        return (Middleware(ShardRouter, self.peers, self.api.token,
                           self.api.control.cfg.sessions.default_mode, self.api.max_body,
                           holds, has_session),)

    async def close(self) -> None:
        self.api.closing.set()
        await self.api.history.stop()
        self.events.end_streams()
        if self._server is not None and self._task is not None:
            self._server.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_GRACE + 2)
            except Exception as exc:  # noqa: BLE001 - a timeout or the server's own error: cancel it
                logger.warning("API server did not stop cleanly: {}", exc or "timeout")
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self.tally.end()
        if self._quiet is not None:
            self._quiet.close()
            self._quiet = None
        if self._sock is not None:
            self._sock.close()
            if self.listen and self.listen.path:
                with contextlib.suppress(OSError):
                    os.unlink(self.listen.path)
