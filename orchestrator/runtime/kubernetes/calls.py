"""The one place Kubernetes API calls happen: a lightkube client and an error policy.

    KubeCalls(config: KubernetesConfig)

lightkube's ``AsyncClient`` is async-native (no thread pool, unlike docker-py), so
calls run on the event loop. The client is created on first use (no I/O in the
constructor) and dropped after the API server could not be reached, so the runtime
recovers by itself once it is back. Pods are sent and read as the API's JSON
(dicts): the pure modules (``spec``, ``pods``) never see a client type.

Every failure leaves as ``RuntimeUnavailable`` with one line naming the server and
the fix:

- unreachable (connection refused, timeout, TLS), HTTP 5xx, or a kubeconfig that
  cannot be read: ``ApiUnavailable``, logged once per outage (``reported``), and
  "reachable again" once when it answers;
- 401: the credentials are refused; 403: names the RBAC verb that is missing
  (``pods: create`` in namespace ...); both ``ApiUnavailable`` too (logged once);
- 404 on get/delete = done (None): "not found on delete is done"; 404 on create =
  the namespace is missing (logged once, like an outage);
- 409 on create: ``Conflict`` (a Pod of that name exists), for the caller to resolve;
- 410 Gone on a watch: ``Gone`` (the watch relists).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, cast

import httpx2 as httpx
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.resources.core_v1 import Pod
from lightkube.types import on_error_raise
from loguru import logger

from orchestrator.config.sections import KubernetesConfig
from orchestrator.runtime.base import RuntimeUnavailable
from orchestrator.support.logonce import LogOnce

API = "api"  # the LogOnce key of "the API server does not answer / refuses us"
NAMESPACE = "namespace"  # ... of "the namespace is missing" (lists there succeed, empty)
WATCH_SERVER_TIMEOUT = 240  # s a watch request lasts before lightkube renews it


class ApiUnavailable(RuntimeUnavailable):
    """The API server did not answer, failed (5xx) or refused us (401/403). Logged
    once per outage by ``KubeCalls``, so callers need not log it per session."""

    reported = True


class Conflict(RuntimeUnavailable):
    """HTTP 409: an object of that name exists already."""


class Gone(RuntimeError):
    """HTTP 410: the watch's resourceVersion is too old; list again."""


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an API failure (an ``ERROR`` watch event too), else None."""
    if isinstance(exc, ApiError):
        code = getattr(exc.status, "code", None)
        if isinstance(code, int):
            return code
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            return exc.response.status_code
        except Exception:  # noqa: BLE001 - a status-only ApiError has no response
            return None
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, ApiError) and getattr(exc.status, "message", None):
        text = str(exc.status.message)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300] or type(exc).__name__


def _selector(selector: dict[str, str]) -> dict[str, Any]:
    """lightkube's selector type (values may be operators too)."""
    return dict(selector)


class KubeCalls:
    """Pod calls in one namespace, with the error policy of the module docstring."""

    def __init__(self, config: KubernetesConfig) -> None:
        self.config = config
        self.namespace = config.namespace
        self._client: AsyncClient | None = None
        self._server = config.kubeconfig or "the in-cluster API server"
        self._said = LogOnce()
        self.calls = 0  # API requests made (a watch counts once per (re)start): bench

    @property
    def where(self) -> str:
        return self._server

    def _make_client(self) -> AsyncClient:
        try:
            if self.config.kubeconfig:
                kc = KubeConfig.from_file(self.config.kubeconfig)
            else:
                kc = KubeConfig.from_service_account()
            single: SingleConfig | None = kc.get()
        except (KubeConfigError, OSError, KeyError, ValueError) as exc:
            where = self.config.kubeconfig or "the in-cluster service account"
            raise self._unavailable(
                f"cannot load Kubernetes credentials from {where} ({_message(exc)}): set "
                "[kubernetes] kubeconfig to a readable kubeconfig, or run in a Pod with a "
                "service account", exc) from None
        if single is not None and single.cluster is not None:
            self._server = single.cluster.server
        return AsyncClient(config=kc, namespace=self.namespace, lazy=False, trust_env=False,
                           field_manager="orchestrator")

    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - best effort: it is dropped
                pass

    # -- error policy -----------------------------------------------------------
    def _unavailable(self, line: str, exc: BaseException | None = None, *,
                     key: str = API) -> ApiUnavailable:
        if self._said.say(key, line):
            logger.error("{}", line)
        return ApiUnavailable(line)

    def mark_available(self) -> None:
        if self._said.clear(API) is not None:
            logger.info("Kubernetes API server at {} answers again", self._server)

    @property
    def available(self) -> bool:
        return self._said.last(API) is None

    def translate(self, verb: str, exc: BaseException, name: str = "") -> RuntimeUnavailable:
        """One-line ``RuntimeUnavailable`` for a failed ``verb`` on pods."""
        code = status_code(exc)
        what = f"pod {name}" if name else "pods"
        if code is None or code >= 500:
            detail = _message(exc) if code is None else f"HTTP {code}: {_message(exc)}"
            return self._unavailable(
                f"Kubernetes API server unreachable at {self._server} ({detail}): start it, "
                "or fix [kubernetes] kubeconfig (work stays pending; retried)", exc)
        if code == 401:
            return self._unavailable(
                f"Kubernetes API server at {self._server} refused our credentials (401): fix "
                "[kubernetes] kubeconfig or the service account token", exc)
        if code == 403:
            return self._unavailable(
                f"not allowed to {verb} pods in namespace {self.namespace} (403): grant this "
                f"orchestrator's account the RBAC verb '{verb}' on 'pods' there", exc)
        self.mark_available()
        if code == 404 and verb == "create":
            return self._unavailable(
                f"namespace {self.namespace} does not exist on {self._server}: create it or "
                "set [kubernetes] namespace", exc, key=NAMESPACE)
        if code == 409:
            return Conflict(f"{what} in {self.namespace}: {_message(exc)}")
        return RuntimeUnavailable(f"Kubernetes {verb} of {what} in {self.namespace} failed "
                                  f"(HTTP {code}: {_message(exc)})")

    async def _failed(self, verb: str, exc: BaseException, name: str = "") -> RuntimeUnavailable:
        error = self.translate(verb, exc, name)
        if isinstance(error, ApiUnavailable) and status_code(exc) is None:
            await self._drop()  # a new connection next time
        return error

    # -- the calls -------------------------------------------------------------
    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        name = manifest["metadata"]["name"]
        try:
            pod = await self.client().create(cast(Pod, Pod.from_dict(manifest)))
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            raise await self._failed("create", exc, name) from None
        self.mark_available()
        if self._said.clear(NAMESPACE) is not None:
            logger.info("namespace {} is there now", self.namespace)
        return pod.to_dict()

    async def get(self, name: str) -> dict[str, Any] | None:
        self.calls += 1
        try:
            pod = await self.client().get(Pod, name, namespace=self.namespace)
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            if status_code(exc) == 404:
                self.mark_available()
                return None
            raise await self._failed("get", exc, name) from None
        self.mark_available()
        return pod.to_dict()

    async def delete(self, name: str, grace: int | None = None) -> None:
        """Delete a Pod by name; one that is not there is done."""
        self.calls += 1
        try:
            await self.client().delete(Pod, name, namespace=self.namespace, grace_period=grace)
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            if status_code(exc) == 404:
                self.mark_available()
                return
            raise await self._failed("delete", exc, name) from None
        self.mark_available()

    async def list(self, labels: dict[str, str], fields: dict[str, str]
                   ) -> tuple[list[dict[str, Any]], str]:
        """Every Pod carrying ``labels`` and matching ``fields`` (``spec.nodeName``: see
        ``spec.pod_selectors``), and the list's resourceVersion."""
        self.calls += 1
        try:
            found = self.client().list(Pod, namespace=self.namespace, labels=_selector(labels),
                                       fields=_selector(fields))
            items = [pod.to_dict() async for pod in found]
            version = found.resourceVersion
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            raise await self._failed("list", exc) from None
        self.mark_available()
        return items, version

    async def watch(self, labels: dict[str, str], fields: dict[str, str], version: str
                    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, Pod) from ``version`` on. Raises ``Gone`` on 410, the
        translated error when the stream fails or drops."""
        self.calls += 1
        stream = self.client().watch(Pod, namespace=self.namespace, labels=_selector(labels),
                                     fields=_selector(fields),
                                     resource_version=version,
                                     server_timeout=WATCH_SERVER_TIMEOUT,
                                     on_error=on_error_raise)
        try:
            async for kind, pod in stream:
                self.mark_available()
                yield kind, pod.to_dict()
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            if status_code(exc) == 410:
                raise Gone(_message(exc)) from None
            raise await self._failed("watch", exc) from None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def log(self, name: str, *, container: str) -> AsyncIterator[bytes]:
        """A Pod's container output, followed until the container ends (``pods/log``
        get): one line at a time, as UTF-8 (bad bytes replaced). A container that never
        ran (HTTP 400) or a Pod that is gone (404) yields nothing."""
        self.calls += 1
        try:
            stream = self.client().log(name, namespace=self.namespace, container=container,
                                       follow=True)
            async for line in stream:
                self.mark_available()
                yield line.encode("utf-8", "replace")
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            if status_code(exc) in (400, 404):
                return
            raise await self._failed("get", exc, f"{name}/log") from None

    async def ping(self, labels: dict[str, str], fields: dict[str, str]) -> None:
        """Raises ``RuntimeUnavailable`` unless our Pods can be listed (``/readyz``): a
        one-item page, with the verb the Role grants anyway (no namespace read)."""
        self.calls += 1
        try:
            found = self.client().list(Pod, namespace=self.namespace, labels=_selector(labels),
                                       fields=_selector(fields), chunk_size=1)
            async for _ in found:
                break
        except RuntimeUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            raise await self._failed("list", exc) from None
        self.mark_available()

    async def close(self) -> None:
        await self._drop()
