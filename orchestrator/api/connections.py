"""The open network (connections that never speak, or dribble):

- deadlines from the first byte: uvicorn's h11 protocol (``GuardedH11``) arms a
  timer when a connection opens — and on the first byte of each later request on a
  kept-alive one — that closes it unless the request's headers are complete within
  ``[api] header_timeout`` and its body within ``body_timeout`` after them; an idle
  kept-alive connection is closed after ``keepalive_timeout`` (uvicorn's own timer);
- a connection cap (``max_connections``, at most half the open-file limit): a new
  connection over it closes the connection that has waited longest for a request,
  or, if every one is busy, is answered 503 and closed;
- the open-file limit: ``raise_nofile_limit`` lifts the soft limit to the hard one
  when ``run`` starts;
- accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM): the listening socket
  (``ListenSocket``) turns them into one warning per episode; with the spare
  descriptor it keeps, a pending connection is accepted and closed at once rather
  than left to spin the loop, and asyncio's own per-attempt traceback is not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import time
from typing import Any, ClassVar

import h11
from loguru import logger
from uvicorn.protocols.http.h11_impl import H11Protocol

from orchestrator.config.sections import ApiConfig

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_EXHAUSTED = "socket.accept() out of system resource"  # asyncio's message
QUIET = 60.0  # s without a refused connection that ends an episode


def raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit (every connection, agent pipe and
    SQLite file is a descriptor; a soft limit of 1024 is a distribution default, not
    a choice). Returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit lower
            logger.warning("cannot raise the open-file limit from {} to {}: {}", soft, hard, exc)
    return soft, hard


def connection_cap(configured: int) -> int:
    """``[api] max_connections``, at most half the soft open-file limit (the rest is the
    engine's), at least 8."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft // 2))


class Tally:
    """Connections the API closed on its own (deadline, cap) or could not accept:
    one warning per kind when an episode starts, one summary when QUIET seconds pass
    without one, never a line per connection."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._since: float | None = None
        self._warned: set[str] = set()
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, kind: str, detail: str) -> None:
        now = time.monotonic()
        self.total[kind] = self.total.get(kind, 0) + 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._last = now
        if self._since is None:
            self._since = now
            self._arm(QUIET)
        if kind not in self._warned:  # once per kind and episode
            self._warned.add(kind)
            logger.warning("API: {} (further ones are counted, not logged: a summary "
                           "follows when they stop)", detail)

    def _arm(self, delay: float) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: summary at close()
            self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        left = self._last + QUIET - time.monotonic()
        if left > 0:
            self._arm(left)
            return
        self.end()

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._since is not None:
            parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
            logger.info("API: episode over after {:.0f}s: {}", self._last - self._since, parts)
        self._since = None
        self._warned = set()
        self.counts = {}


class Limits:
    """What a ``GuardedH11`` connection needs: the deadlines, the cap, the tally."""

    def __init__(self, cfg: ApiConfig, cap: int, tally: Tally) -> None:
        self.header_timeout = cfg.header_timeout
        self.body_timeout = cfg.body_timeout
        self.max_connections = cap
        self.tally = tally


def _canned(status: str, message: str) -> bytes:
    body = ('{"error": "%s"}\n' % message).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines from the first byte and a connection cap.

    Phases of a connection: ``headers`` (opened, or the first byte of a next request
    arrived: ``header_timeout`` runs), ``body`` (headers in: ``body_timeout`` runs),
    ``app`` (request complete: no deadline — a response may stream for hours, e.g.
    /v1/events), ``idle`` (response sent: uvicorn's keep-alive timer runs until a
    byte arrives)."""

    limits: ClassVar[Limits]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "headers"
        self._since = self.loop.time()
        self._seen: object = None
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict():
            self.limits.tally.note("refused", f"over [api] max_connections = "
                                   f"{self.limits.max_connections} with every connection "
                                   "busy: a new one is answered 503")
            transport.write(_canned("503 Service Unavailable",
                                    "too many connections: try again shortly"))
            transport.close()
            return
        self._arm(self.limits.header_timeout)

    def _evict(self) -> bool:
        """Close the connection that has waited longest for a request's headers."""
        waiting = [c for c in self.connections if isinstance(c, GuardedH11) and c is not self
                   and c._phase in ("headers", "idle") and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._since)
        self.limits.tally.note("evicted", f"over [api] max_connections = "
                               f"{self.limits.max_connections}: the connection idle "
                               "longest is closed for each new one")
        oldest._close("408 Request Timeout", "closed to make room: send the request sooner")
        return True

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        which = "header" if self._phase == "headers" else "body"
        self.limits.tally.note(f"{which} timeouts", f"closing connections whose request "
                               f"{'headers' if which == 'header' else 'body'} did not arrive "
                               f"within [api] {which}_timeout")
        if self._phase == "headers" and self.conn.their_state in (h11.IDLE, h11.DONE):
            self._close("408 Request Timeout", f"request {which} not received in time")
        else:  # mid-request: the handler sees a disconnect
            self.transport.close()

    def _close(self, status: str, message: str) -> None:
        self._disarm()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_canned(status, message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first byte of the next request
            self._phase = "headers"
            self._since = self.loop.time()
            self._arm(self.limits.header_timeout)
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen:  # a new request's headers are in
            self._seen = cycle
            self._phase = "body"
            self._arm(self.limits.body_timeout)
        if self._phase == "body" and cycle is not None and not cycle.more_body:
            self._phase = "app"
            self._disarm()
        if self._phase == "app" and cycle is not None and cycle.response_complete:
            self._phase = "idle"
            self._since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class ListenSocket(socket.socket):
    """The listening socket, with accept errors handled once per episode.

    asyncio's accept loop, on EMFILE, logs a traceback and schedules a retry for
    *every* attempt left in its batch (up to the backlog): with descriptors gone
    that grows into thousands of tracebacks a second. Here the first error of an
    episode is one warning; then the spare descriptor is given up for an instant to
    accept one pending connection and close it (the client learns at once), and
    asyncio is told the queue is empty. Without a spare, asyncio sees the error at
    most once a second (its retry), and its log line is dropped (``quiet_loop``)."""

    tally: Tally | None = None
    _spare: int | None = None
    _quiet_until = 0.0

    def keep_spare(self) -> None:
        if self._spare is None:
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            pair = super().accept()
        except OSError as exc:
            if exc.errno not in EXHAUSTED:
                raise
            if self.tally is not None:
                self.tally.note("not accepted", f"cannot accept connections: "
                                f"{exc.strerror} (open-file limit "
                                f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}); new "
                                "connections are closed at once until descriptors free up")
            if self._shed():
                raise BlockingIOError(errno.EAGAIN, "connection shed") from None
            now = time.monotonic()
            if now < self._quiet_until:
                raise BlockingIOError(errno.EAGAIN, "retry later") from None
            self._quiet_until = now + 0.9
            raise  # asyncio pauses accepting and retries in a second
        return pair

    def _shed(self) -> bool:
        if self._spare is None:
            return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = super().accept()
            conn.close()
        except OSError:
            pass  # nothing pending, or the descriptor went elsewhere
        self.keep_spare()
        return self._spare is not None

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


@contextlib.contextmanager
def quiet_loop(sock: socket.socket):
    """Drop asyncio's per-attempt "out of system resource" log for ``sock`` (the
    listening socket counts and logs those once per episode)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        s = context.get("socket")
        if context.get("message") == ACCEPT_EXHAUSTED and s is not None and \
                s.fileno() == sock.fileno():
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
