"""The one place blocking docker-py calls happen: a thread pool and an error policy.

``DockerExec.call(what, fn)`` runs ``fn(api)`` (a low-level ``docker.APIClient``)
in a small dedicated thread pool and returns its result to the event loop
(dockerspawner style). Every failure leaves as ``RuntimeUnavailable`` with a
one-line message saying what failed and what to do:

- daemon unreachable (``DockerException`` while connecting, or
  ``requests.exceptions.ConnectionError`` on a later call): ``DaemonUnreachable``
  "Docker daemon unreachable at ...: start it or set [docker] base_url". The
  client is dropped and rebuilt on the next call, so the runtime recovers by
  itself when the daemon is back. The transition down/up is logged once each,
  not per call (the exception says so: ``reported = True``).
- image missing: "image X not found: run `orchestrator image build`", logged
  once per image until it is found (``ImageMissing.reported``).
- HTTP 409 (a name in use): ``Conflict``, a RuntimeUnavailable a caller may resolve.
- ``missing_ok=True`` (stop/kill/remove/inspect): NotFound, "is not running"
  and "removal ... already in progress" (409) mean "already done" -> None.

No I/O happens in the constructor; the client is created on first use.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, TypeVar, overload

import requests
from docker import APIClient
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from loguru import logger

from orchestrator.runtime.base import RuntimeUnavailable
from orchestrator.support.logonce import LogOnce

T = TypeVar("T")

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
DAEMON = "daemon"  # the LogOnce key of "the daemon is unreachable"
# 409 answers that mean the container is already where we want it.
_DONE_FRAGMENTS = ("is not running", "already in progress", "is already stopped",
                   "no such container", "is not paused")


class DaemonUnreachable(RuntimeUnavailable):
    """The daemon did not answer. ``reported``: this outage has already been logged
    (once, by ``DockerExec``), so callers need not log it again per session."""

    reported = True


class ImageMissing(RuntimeUnavailable):
    """The agent image is not on the daemon. Logged once per image by ``DockerExec``
    (not once per session that wanted it), until the image is found."""

    reported = True


class Conflict(RuntimeUnavailable):
    """The daemon answered HTTP 409 (e.g. a container name already in use): callers
    that can resolve it branch on this type, not on the message text."""


def docker_where(base_url: str = "") -> str:
    """The daemon address as the user would recognise it (for messages)."""
    return base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def make_api_client(base_url: str = "", timeout: float = 60.0) -> APIClient:
    """A low-level client; negotiates the API version, so it connects (and may raise)."""
    if base_url:
        # types-docker says int; docker-py hands the timeout to requests, which takes a float
        return APIClient(base_url=base_url, version="auto",
                         timeout=timeout)  # type: ignore[arg-type]
    import docker

    return docker.from_env(version="auto", timeout=timeout).api  # type: ignore[arg-type]


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, APIError):
        return False  # the daemon answered
    if isinstance(exc, requests.exceptions.RequestException):
        return True  # ConnectionError, ReadTimeout, ChunkedEncodingError ...
    if isinstance(exc, DockerException):
        text = str(exc)
        return ("Error while fetching server API version" in text
                or "Connection" in text or "connect" in text)
    return isinstance(exc, (ConnectionError, TimeoutError))


def is_done_error(exc: BaseException) -> bool:
    """NotFound, or a 409 saying the container is already stopped / being removed."""
    if isinstance(exc, NotFound) and not isinstance(exc, ImageNotFound):
        return True
    if isinstance(exc, APIError) and exc.status_code in (304, 409):
        text = str(exc.explanation or exc).lower()
        return any(fragment in text for fragment in _DONE_FRAGMENTS)
    return False


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class DockerExec:
    """Blocking docker-py calls in a thread pool, translated to RuntimeUnavailable."""

    def __init__(self, base_url: str = "", *, timeout: float = 60.0, max_workers: int = 8):
        self.base_url = base_url
        self.where = docker_where(base_url)
        self.timeout = timeout
        self._max_workers = max_workers
        self._client: APIClient | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._answered = False  # whether any call has reached (or failed to reach) it yet
        # said once each: the daemon down (key DAEMON), an image missing (key ("image", name))
        self._said = LogOnce()

    # -- client -----------------------------------------------------------
    def api(self) -> APIClient:
        """The shared client, created on first use (call from a worker thread)."""
        with self._lock:
            if self._client is None:
                self._client = make_api_client(self.base_url, self.timeout)
            return self._client

    def new_client(self, timeout: float | None = None) -> APIClient:
        """A separate client (the event-stream thread owns its own connection)."""
        return make_api_client(self.base_url, self.timeout if timeout is None else timeout)

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001  # pragma: no cover - best effort: it is dropped
                pass

    @property
    def available(self) -> bool | None:
        """Whether the last call reached the daemon (None before the first call)."""
        return DAEMON not in self._said if self._answered else None

    def unreachable_message(self) -> str:
        return f"Docker daemon unreachable at {self.where}: start it or set [docker] base_url"

    def mark_available(self) -> None:
        self._answered = True
        if self._said.clear(DAEMON) is not None:
            logger.info("Docker daemon at {} is reachable again", self.where)

    def mark_unavailable(self, exc: BaseException) -> None:
        self._drop_client()
        self._answered = True
        if self._said.say(DAEMON, self.unreachable_message()):
            logger.warning("{} ({})", self.unreachable_message(), _first_line(exc))

    # -- error policy --------------------------------------------------------
    def translate(self, what: str, exc: BaseException, *, image: str | None = None
                  ) -> RuntimeUnavailable:
        """One-line RuntimeUnavailable for ``exc``; marks the daemon down if unreachable."""
        if _is_unreachable(exc):
            self.mark_unavailable(exc)
            return DaemonUnreachable(self.unreachable_message())
        self.mark_available()
        if isinstance(exc, ImageNotFound):
            name = image or "the agent image"
            missing = ImageMissing(f"image {name} not found: run `orchestrator image build` "
                                   "(work stays pending; starts are retried)")
            if self._said.say(("image", name), str(missing)):
                logger.error("{}", missing)
            return missing
        if isinstance(exc, APIError) and exc.status_code == 409:
            return Conflict(f"docker {what} failed: {_first_line(exc)}")
        return RuntimeUnavailable(f"docker {what} failed: {_first_line(exc)}")

    def call_sync(self, what: str, fn: Callable[[APIClient], T], *, missing_ok: bool = False,
                  image: str | None = None) -> T | None:
        """Run ``fn(api)`` in the current thread with the error policy applied."""
        try:
            result = fn(self.api())
        except (DockerException, requests.exceptions.RequestException, OSError) as exc:
            if missing_ok and is_done_error(exc):
                self.mark_available()
                return None
            raise self.translate(what, exc, image=image) from None
        self.mark_available()
        return result

    @overload
    async def call(self, what: str, fn: Callable[[APIClient], T], *,
                   missing_ok: Literal[False] = False, image: str | None = None) -> T: ...

    @overload
    async def call(self, what: str, fn: Callable[[APIClient], T], *, missing_ok: bool,
                   image: str | None = None) -> T | None: ...

    async def call(self, what: str, fn: Callable[[APIClient], T], *, missing_ok: bool = False,
                   image: str | None = None) -> T | None:
        """Run ``fn(api)`` in the docker thread pool; errors as in ``call_sync``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool(), lambda: self.call_sync(what, fn, missing_ok=missing_ok, image=image))

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run other blocking work (file ownership, thread joins) in the same pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), fn)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers,
                                                    thread_name_prefix="docker")
            return self._executor

    # -- the calls the runtime makes ---------------------------------------------
    async def require_image(self, image: str) -> dict:
        """Inspect the image; RuntimeUnavailable (with the build hint) when it is missing.

        Checked before create: docker-py's run() would try to pull (offline: APIError 500).
        """
        found = await self.call("image inspect", lambda api: api.inspect_image(image), image=image)
        if self._said.clear(("image", image)) is not None:
            logger.info("image {} is there now", image)
        return found

    async def inspect(self, container: str) -> dict | None:
        return await self.call("inspect", lambda api: api.inspect_container(container),
                               missing_ok=True)

    async def list_labelled(self, labels: list[str]) -> list[dict]:
        """All containers (any state) carrying every ``key=value`` in ``labels``."""
        result = await self.call(
            "list containers", lambda api: api.containers(all=True, filters={"label": labels}))
        return list(result or [])

    async def stop(self, container: str, grace: float) -> None:
        await self.call("stop", lambda api: api.stop(container, timeout=max(0, int(round(grace)))),
                        missing_ok=True)

    async def kill(self, container: str) -> None:
        await self.call("kill", lambda api: api.kill(container), missing_ok=True)

    async def pause(self, container: str) -> None:
        await self.call("pause", lambda api: api.pause(container))

    async def unpause(self, container: str) -> None:
        """Thaw; a container that is not paused (any more) or gone is done."""
        await self.call("unpause", lambda api: api.unpause(container), missing_ok=True)

    async def wait(self, container: str, timeout: float) -> int | None:
        def _wait(api: APIClient) -> int | None:
            try:
                # types-docker says int; docker-py hands it to requests, which takes a float
                return int(api.wait(container, timeout=timeout)  # type: ignore[arg-type]
                           ["StatusCode"])
            except requests.exceptions.ReadTimeout:
                return None

        return await self.call("wait", _wait, missing_ok=True)

    async def logs(self, container: str, max_bytes: int, *, tail_lines: int = 100_000,
                   read_cap: int = 16) -> tuple[bytes, int] | None:
        """A finished container's output (stdout and stderr as they came): its last
        ``max_bytes`` and the number of bytes before them that were cut; None when it is
        gone. Bounded: at most ``tail_lines`` lines and ``read_cap × max_bytes`` bytes
        are read (a flood beyond that keeps what was read)."""

        def _logs(api: APIClient) -> tuple[bytes, int]:
            stream = api.logs(container, stdout=True, stderr=True, stream=True, follow=False,
                              tail=tail_lines)
            kept, cut, read = bytearray(), 0, 0
            try:
                for chunk in stream:
                    kept += chunk
                    read += len(chunk)
                    if len(kept) > 2 * max_bytes:
                        cut += len(kept) - max_bytes
                        del kept[:len(kept) - max_bytes]
                    if read > read_cap * max_bytes:
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            if len(kept) > max_bytes:
                cut += len(kept) - max_bytes
                del kept[:len(kept) - max_bytes]
            return bytes(kept), cut

        return await self.call("logs", _logs, missing_ok=True)

    async def remove(self, container: str, settle: float = 10.0) -> None:
        """Remove; gone on return. A removal already in progress elsewhere (409) is
        waited for (up to ``settle`` s), so callers can rely on the container being gone."""

        def _remove(api: APIClient) -> None:
            try:
                api.remove_container(container, v=True, force=True)
                return
            except APIError as exc:
                if not (exc.status_code == 409 and "in progress" in str(exc.explanation)):
                    raise
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline:
                api.inspect_container(container)  # NotFound ends this: gone
                time.sleep(0.05)

        await self.call("remove", _remove, missing_ok=True)

    async def close(self) -> None:
        self._drop_client()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
