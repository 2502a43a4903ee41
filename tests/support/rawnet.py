"""Raw TCP clients for the open-network tests: connections that never speak, that
dribble, or that stop half-way, and a wait for the server to close them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    received: bytes = b""

    async def until_closed(self, timeout: float) -> float:
        """Seconds from opening until the server closed it (reads everything it sent);
        raises TimeoutError if it is still open after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    break
                self.received += chunk
        self.closed_at = time.monotonic()
        return self.closed_at - self.opened

    def status_line(self) -> str:
        return self.received.split(b"\r\n", 1)[0].decode("latin-1")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def address(client: httpx.AsyncClient) -> tuple[str, int]:
    parts = urlsplit(str(client.base_url))
    return parts.hostname or "127.0.0.1", parts.port or 80


class RawPool:
    """Opens raw connections to the API; closes every one on exit (the tests run with
    warnings as errors: an unclosed socket fails them)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.opened: list[Raw] = []

    async def open(self, n: int = 1) -> list[Raw]:
        host, port = address(self.client)
        out = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection(host, port)
            out.append(Raw(reader, writer))
        self.opened += out
        return out

    async def __aenter__(self) -> "RawPool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        for raw in self.opened:
            raw.close()
        for raw in self.opened:
            with contextlib.suppress(Exception):
                await raw.writer.wait_closed()


async def dribble(raw: Raw, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the server
    closes the connection."""
    for i in range(len(data)):
        try:
            raw.writer.write(data[i:i + 1])
            await raw.writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


def request(method: str, path: str, host: str, headers: dict[str, str] | None = None,
            body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
