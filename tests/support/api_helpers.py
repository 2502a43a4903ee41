"""Helpers for the HTTP tests: a supervisor with its API on an ephemeral port, a real
httpx client holding the token, an SSE reader, and a real local webhook receiver.

Everything is real: uvicorn serves the Starlette app inside the supervisor's event
loop (the test's loop), the client speaks HTTP over a real socket, and the receiver is
a second uvicorn server on its own ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.config.model import Config
from orchestrator.engine.supervisor import Supervisor
from tests.support.e2e import serving


def token_of(cfg: Config) -> str:
    return Path(cfg.api.token_file).read_text().strip()


@contextlib.asynccontextmanager
async def api_supervised(cfg: Config, **kwargs: Any
                         ) -> AsyncIterator[tuple[Supervisor, httpx.AsyncClient]]:
    async with serving(cfg, **kwargs) as service:
        assert service.api.url is not None
        async with httpx.AsyncClient(base_url=service.api.url, timeout=10, headers={
                "Authorization": f"Bearer {token_of(cfg)}"}) as client:
            yield service.supervisor, client


def url_of(client: httpx.AsyncClient) -> str:
    """The API's address, as the orchestrator printed it (no trailing slash)."""
    return str(client.base_url).rstrip("/")


def message(text: str = "hello", group: str = "helpers", **extra: Any) -> dict:
    return {"agent_group": group, "channel": "chat", "platform_id": "room-1",
            "content": {"text": text}, **extra}


class SseReader:
    """Reads ``GET /v1/events`` as a background task; events land in ``events``."""

    def __init__(self, client: httpx.AsyncClient, last_id: int | None = None) -> None:
        self.client = client
        self.last_id = last_id
        self.events: list[dict] = []  # {"id", "event", "data"}
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> "SseReader":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        headers = {} if self.last_id is None else {"Last-Event-ID": str(self.last_id)}
        async with self.client.stream("GET", "/v1/events", headers=headers,
                                      timeout=httpx.Timeout(10, read=None)) as resp:
            assert resp.status_code == 200, resp.status_code
            self.connected.set()
            block: dict[str, str] = {}
            async for line in resp.aiter_lines():
                if line == "":
                    if "data" in block:
                        self.events.append({"id": int(block["id"]) if "id" in block else None,
                                            "event": block.get("event", "message"),
                                            "data": json.loads(block["data"])})
                    block = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    block[name] = value[1:] if value.startswith(" ") else value

    def ids(self, kind: str | None = None) -> list[int]:
        return [e["id"] for e in self.events
                if e["event"] not in ("hello", "gap") and (kind is None or e["event"] == kind)]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def done(self) -> bool:
        return self._task is not None and self._task.done()


# --- a real webhook receiver ------------------------------------------------------------


def verified(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """What a receiver does, with the Standard Webhooks package from PyPI (not our
    code): the signature over ``webhook-id.webhook-timestamp.body`` with the key
    ``secret`` (``whsec_…``) is among those of ``webhook-signature``, and the
    timestamp is within the package's tolerance (5 minutes)."""
    if not secret:
        return False
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    json: dict
    signature_ok: bool
    at: float  # time.monotonic() on arrival
    at_wall: float = 0.0  # time.time() on arrival


@dataclass
class Receiver:
    """``behave(body) -> (status, delay_seconds, headers)`` decides each answer; every
    request is verified (``verified``) with ``secret``, a ``whsec_…`` key ("" = not
    known yet: ``signature_ok`` is False)."""

    secret: str
    behave: Callable[[dict], tuple[int, float, dict]] = lambda body: (200, 0.0, {})
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"  # start(host=...): e.g. the docker bridge's gateway address
    _server: uvicorn.Server | None = None
    _task: asyncio.Task | None = None

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        ok = verified(self.secret, body, headers)
        data = json.loads(body)
        self.requests.append(Received(headers, body, data, ok, time.monotonic(), time.time()))
        status, delay, extra = self.behave(data)
        if delay:
            await asyncio.sleep(delay)
        return Response(b"{}", status_code=status, headers=extra,
                        media_type="application/json")

    def replies(self, reply_id: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.json.get("type") == "reply"
                and (reply_id is None or r.json["id"] == reply_id)]

    def failures(self) -> list[Received]:
        return [r for r in self.requests if r.json.get("type") == "failure"]

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> "Receiver":
        self.host = host
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/hook", self._handle, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                     timeout_graceful_shutdown=1))
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            await asyncio.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)
            self._server = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
