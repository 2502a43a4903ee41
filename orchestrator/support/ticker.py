"""A drift-correcting ticker: fires at ``start + k × interval``, not ``interval`` after
the previous tick finished, and skips ticks it fell behind on instead of bursting."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


async def ticks(interval: float, stop: asyncio.Event) -> AsyncIterator[int]:
    """Yield the tick number every ``interval`` seconds until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = 0
    while True:
        k += 1
        delay = start + k * interval - loop.time()
        if delay < 0:  # fell behind (a long pass): resume on the grid, no burst
            k += int(-delay // interval) + 1
            delay = start + k * interval - loop.time()
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except asyncio.TimeoutError:
            yield k
