"""Measuring what a test promises about the event loop and memory.

``LoopWatch`` runs a ticker task on the loop under test: every few milliseconds it
sleeps and notes how late it woke (the loop's lag: how long something held it) and
the process's resident memory (``/proc/self/status`` VmRSS; psutil is not needed).
``LeanReceiver`` is the real webhook receiver that keeps each POST's size and its
JSON without the files' bytes, so holding many big POSTs does not count as the
sender's memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from tests.support.api_helpers import Received, Receiver, verified

MiB = 1 << 20


def vm_kib(key: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak) of this process, in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@dataclass
class LoopWatch:
    """``async with LoopWatch() as w: ...`` then ``w.max_lag`` (s) and ``w.rss_peak``
    (bytes, sampled each tick) with ``w.rss_start``."""

    period: float = 0.005
    lags: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    _task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period)
            self.lags.append(time.monotonic() - t - self.period)
            self.rss_peak = max(self.rss_peak, vm_kib() * 1024)

    async def __aenter__(self) -> "LoopWatch":
        self.rss_start = self.rss_peak = vm_kib() * 1024
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        seen = len(self.lags)
        while len(self.lags) < seen + 2:  # a stall just before the exit is counted too
            await asyncio.sleep(self.period)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @property
    def max_lag(self) -> float:
        return max(self.lags, default=0.0)

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start


def strip_data(body: dict) -> dict:
    for entry in body.get("files") or []:
        if isinstance(entry, dict) and entry.get("data") is not None:
            entry["data"] = f"<{len(entry['data'])} base64 chars>"
    return body


@dataclass
class LeanReceiver(Receiver):
    """A real receiver (uvicorn, signatures verified) keeping ``size`` per POST and the
    JSON with each file's base64 replaced by its length."""

    sizes: list[int] = field(default_factory=list)

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        ok = verified(self.secret, body, headers)
        self.sizes.append(len(body))
        data = strip_data(json.loads(body))
        del body
        self.requests.append(Received(headers, b"", data, ok, time.monotonic(), time.time()))
        status, delay, extra = self.behave(data)
        if delay:
            await asyncio.sleep(delay)
        return Response(b"{}", status_code=status, headers=extra,
                        media_type="application/json")
