"""The gateway's connections: HTTP/1.1 from agents in, verified HTTPS to upstreams out.

One listener per group with ``egress`` (its own port), so a token is always checked
against the group whose door it came through. Per connection (``h11`` parses, we never
hand-parse HTTP; the decisions are ``rules.egress``'):

- ``CONNECT host:port`` (``HTTPS_PROXY``), token as the proxy password. A host with an
  injected credential is intercepted: TLS is terminated with a leaf of our CA (``ca``),
  each request inside is sent on with the real key through ``httpx`` (verified TLS).
  Any other allowed host is tunnelled untouched (the agent's TLS end to end).
- ``GET http://host/...`` (``HTTP_PROXY``): sent on as plain HTTP, no key injected.
- ``POST /<host>/v1/...`` (base-URL mode, e.g. ``ANTHROPIC_BASE_URL``): the token is
  the placeholder key the SDK sends in the credential's header; sent on to
  ``https://<host>/v1/...`` with the real key.

Response bodies are passed on chunk by chunk as they arrive (``aiter_raw``: SSE streams
are never buffered). Request bodies are read whole, up to ``max_body_bytes``. Nothing
here logs a header value, a token, a key or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import httpx

from orchestrator.config.sections import EgressCredential
from orchestrator.rules import egress as rules
from orchestrator.rules.egress import Refusal

IDLE_TIMEOUT = 300.0  # seconds an agent's connection may sit without sending a byte
READ_CHUNK = 65536


class Closed(Exception):
    """The agent's side ended (EOF, reset, a protocol error): the connection is done."""


@dataclass
class GroupDoor:
    """One group's listener and what it allows."""

    group: str
    port: int
    egress: tuple[str, ...]
    creds: tuple[EgressCredential, ...]
    server: asyncio.base_events.Server | None = None
    host: str = ""


@dataclass
class Conn:
    """One agent connection: whose it is once a token was checked."""

    door: GroupDoor
    session_id: str | None = None
    token: str | None = None
    counted: bool = False
    peer: str = field(default="")


async def next_event(h: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        try:
            ev = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise Closed(str(exc)) from None
        if ev is not h11.NEED_DATA:
            return ev
        try:
            data = await asyncio.wait_for(reader.read(READ_CHUNK), IDLE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise Closed(str(exc)) from None
        h.receive_data(data)


def text_headers(raw: object) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1"))
            for k, v in raw]  # type: ignore[attr-defined]


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name.lower()), None)


async def send(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)
        await writer.drain()


async def refuse(h: h11.Connection, writer: asyncio.StreamWriter, refusal: Refusal) -> None:
    body = (refusal.reason + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"),
               ("content-length", str(len(body))), ("connection", "close")]
    if refusal.status == 407:
        headers.append(("proxy-authenticate", 'Basic realm="orchestrator egress gateway"'))
    try:
        await send(writer, h.send(h11.Response(status_code=refusal.status, headers=headers,
                                               reason=phrase(refusal.status))))
        await send(writer, h.send(h11.Data(data=body)))
        await send(writer, h.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        pass


async def read_body(h: h11.Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, limit: int) -> bytes | None:
    """The request's body; None when it is larger than ``limit``."""
    parts: list[bytes] = []
    size = 0
    if h.they_are_waiting_for_100_continue:
        await send(writer, h.send(h11.InformationalResponse(status_code=100, headers=[])))
    while True:
        ev = await next_event(h, reader)
        if isinstance(ev, h11.Data):
            size += len(ev.data)
            if size > limit:
                return None
            parts.append(bytes(ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise Closed("connection ended inside a request")


async def forward(client: httpx.AsyncClient, h: h11.Connection,
                  writer: asyncio.StreamWriter, method: str, url: httpx.URL,
                  headers: list[tuple[str, str]], body: bytes) -> int:
    """Send one request upstream and stream its answer back; the upstream's status,
    or raises ``httpx.HTTPError`` before anything was sent to the agent."""
    request = client.build_request(method, url, headers=headers, content=body)
    response = await client.send(request, stream=True)
    try:
        out = rules.response_headers(text_headers(response.headers.raw))
        await send(writer, h.send(h11.Response(status_code=response.status_code,
                                               headers=out,
                                               reason=response.reason_phrase.encode())))
        async for chunk in response.aiter_raw():
            await send(writer, h.send(h11.Data(data=chunk)))
        await send(writer, h.send(h11.EndOfMessage()))
    finally:
        await response.aclose()
    return response.status_code


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                 port: int, first: bytes) -> bool:
    """A byte pipe to ``host:port`` (an allowed host without an injected key)."""
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 15)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        if first:
            up_writer.write(first)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        up_writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await up_writer.wait_closed()
    return True


def phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def now() -> float:
    return time.monotonic()
