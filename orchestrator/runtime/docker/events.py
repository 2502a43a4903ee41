"""Follow one instance's container events in a thread and hand them to the loop.

    DockerEvents(exec, instance, on_event, on_connect)

docker-py's event stream is a blocking iterator, so it runs in its own daemon
thread with its own client (``DockerExec.new_client``). Every event is passed
to ``on_event(event)`` and every (re)connection to ``on_connect()`` — both on
the bound event loop (``loop.call_soon_threadsafe``), never on the thread.

The stream ends silently when the daemon restarts, and the daemon keeps only
its last 256 events, so the thread reconnects with a capped backoff
(0.1 s doubling to ``EVENT_BACKOFF_MAX``), asks for ``since`` the last event it
saw, and ``on_connect`` is the runtime's cue to reconcile (re-list by label)
for whatever happened while nobody listened. An unreachable daemon is logged
once per outage (through ``DockerExec``, shared with ``start``'s message).
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable

from loguru import logger

from orchestrator.runtime.docker.calls import DockerExec, _is_unreachable
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from orchestrator.support.logonce import LogOnce

if TYPE_CHECKING:
    from docker import APIClient

EVENT_BACKOFF_MAX = 5.0


class DockerEvents:
    """The event-stream thread of one runtime. Start with ``ensure_started``, end with
    ``stop``; ``connected`` / ``connects`` are observable (tests, status)."""

    def __init__(self, exec: DockerExec, instance: str, on_event: Callable[[dict], None],
                 on_connect: Callable[[], None]) -> None:
        self.exec = exec
        self.instance = instance
        self.on_event = on_event
        self.on_connect = on_connect
        self.since: str | None = None  # the last event's time, for the next connection
        self.connected = False
        self.connects = 0  # how many times the stream has (re)connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop callbacks run on (the runtime rebinds when it is used from a new loop)."""
        self._loop = loop

    def ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name=f"docker-events-{self.instance}",
                                        daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End the stream (closing it unblocks the thread) and join the thread."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - best effort: the thread ends either way
                pass
        thread = self._thread
        if thread is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, thread.join, 5.0)
            self._thread = None

    # -- the thread ---------------------------------------------------------------------
    def _post(self, fn: Any, *args: Any) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed meanwhile
            return False
        return True

    def _main(self) -> None:
        """Thread: follow this instance's container events; reconnect with backoff."""
        filters = {"type": "container", "label": f"{LABEL_INSTANCE}={self.instance}"}
        backoff = 0.1
        said = LogOnce()  # "ended" / "failed": each said once until the stream is back
        while not self._stop.is_set():
            client = None
            try:
                client = self.exec.new_client(timeout=10)
                stream = self._open_stream(client, filters)
                if stream is None:  # stopped meanwhile
                    break
                backoff = 0.1
                if not self._connected(said):
                    break
                self._follow(stream)
            except Exception as exc:  # noqa: BLE001 - DockerException, ConnectionError...: retry
                self._failed(exc, said)
            finally:
                self._disconnected(client)
            if self._stop.is_set():
                break
            if said.say("ended", "ended"):
                logger.debug("Docker event stream ended ({}); reconnecting", self.exec.where)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, EVENT_BACKOFF_MAX)

    def _open_stream(self, client: APIClient, filters: dict[str, str]) -> Any:
        """The event stream, kept for ``stop`` to close; None (closed) if stopped."""
        # since: the last event's "seconds.nanoseconds" text, which the API takes as it
        # is and docker-py passes on; types-docker allows only datetime | int
        stream = client.events(decode=True, filters=filters,
                               since=self.since)  # type: ignore[call-overload]
        with self._lock:
            if self._stop.is_set():
                stream.close()
                return None
            self._stream = stream
        return stream

    def _connected(self, said: LogOnce) -> bool:
        """Mark the stream up and tell the loop (to reconcile); False: the loop is gone."""
        self.connected = True
        self.connects += 1
        self.exec.mark_available()
        if said.clear("ended") is not None:
            logger.info("Docker event stream reconnected ({}); reconciling", self.exec.where)
        said.clear("failed")
        return self._post(self.on_connect)

    def _follow(self, stream: Any) -> None:
        """Pass each event to the loop, remembering its time for the next ``since``."""
        for event in stream:
            nano = event.get("timeNano")
            if nano:
                self.since = f"{nano // 1_000_000_000}.{nano % 1_000_000_000:09d}"
            if not self._post(self.on_event, event):
                self._stop.set()
                return

    def _failed(self, exc: Exception, said: LogOnce) -> None:
        if self._stop.is_set():
            return
        if _is_unreachable(exc):
            self.exec.mark_unavailable(exc)
        elif said.say("failed", "failed"):
            logger.warning("Docker event stream failed at {}: {}; retrying",
                           self.exec.where, str(exc).splitlines()[0] if str(exc)
                           else type(exc).__name__)

    def _disconnected(self, client: APIClient | None) -> None:
        self.connected = False
        with self._lock:
            self._stream = None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - best effort: a new client is made
                pass
