"""Signal capture as a context manager (uvicorn style).

First SIGINT/SIGTERM: set the stop event, let the supervisor drain and shut down.
Second one: the user means it — exit at once (agents are left to be re-adopted).
"""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import contextmanager
from typing import Iterator

from loguru import logger

HANDLED = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def capture_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    count = 0

    def handle(sig: signal.Signals) -> None:
        nonlocal count
        count += 1
        if count == 1:
            logger.info("{} received: shutting down (again to force)", sig.name)
            stop.set()
        else:
            logger.warning("{} received again: exiting now", sig.name)
            os._exit(128 + sig.value)

    for sig in HANDLED:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in HANDLED:
            loop.remove_signal_handler(sig)
