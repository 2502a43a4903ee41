"""``send`` and ``status`` through the HTTP API (``--url`` / ``ORCHESTRATOR_URL``), so
they work from another machine. The token: ``ORCHESTRATOR_TOKEN``, else
``--token-file``, else the local config's ``[api] token_file``.

Errors are one line: the server's own ``{"error": ...}`` for a refused request (exit
code 2, like bad input on the files path), or what went wrong reaching it (exit 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from orchestrator.host.secretfile import SecretFileError, read_secret

if TYPE_CHECKING:
    import httpx

TIMEOUT = 30.0


class ApiClientError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_url(flag: str | None) -> str | None:
    return flag or os.environ.get("ORCHESTRATOR_URL") or None


def resolve_token(token_file: str | None, config_token_file: str | None) -> str | None:
    env = os.environ.get("ORCHESTRATOR_TOKEN")
    if env:
        return env.strip()
    for path in (token_file, config_token_file):
        if path:
            try:
                return read_secret(Path(path))
            except FileNotFoundError:
                if path == token_file:
                    raise ApiClientError(f"--token-file {path}: no such file", 2) from None
            except SecretFileError as exc:
                raise ApiClientError(str(exc), 2) from None
    return None


def _client(url: str, token: str | None) -> httpx.Client:
    import httpx  # here: the command line imports this module for every command,
    # ``run`` included, whose start-up walk (``watch.head_start``) begins after it

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if url.startswith("unix:"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=url[len("unix:"):]),
                            base_url="http://orchestrator", headers=headers, timeout=TIMEOUT)
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT)


def _call(url: str, token: str | None, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    try:
        with _client(url, token) as client:
            resp = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiClientError(f"{url}: cannot reach the orchestrator API ({exc})", 1) from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = resp.text.strip().splitlines()[0] if resp.text.strip() else ""
        raise ApiClientError(f"{url}: HTTP {resp.status_code}: {message}",
                             2 if resp.status_code < 500 else 1)
    return resp.json()


def send(url: str, token: str | None, body: dict[str, Any],
         idempotency_key: str | None = None, wait: float | None = None) -> dict[str, Any]:
    """POST /v1/messages; with ``wait`` (also in ``body``) the answer may hold the
    reply, so the read timeout is that much longer."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    timeout = TIMEOUT + (wait or 0)
    return _call(url, token, "POST", "/v1/messages", json=body, headers=headers,
                 timeout=timeout)


def sessions(url: str, token: str | None) -> list[dict[str, Any]]:
    return _call(url, token, "GET", "/v1/sessions")


def retry_deliveries(url: str, token: str | None, session_id: str | None) -> dict[str, Any]:
    """``POST /v1/deliveries/retry``: ``{"retried": N}``."""
    body = {"session_id": session_id} if session_id else {}
    return _call(url, token, "POST", "/v1/deliveries/retry", json=body)


def remove_session(url: str, token: str | None, session_id: str, *, archive: bool,
                   force: bool) -> dict[str, Any]:
    """``DELETE /v1/sessions/{id}``: ``{"session_id", "action", "archive"}``."""
    params = {"archive": str(archive).lower(), "force": str(force).lower()}
    return _call(url, token, "DELETE", f"/v1/sessions/{quote(session_id, safe='')}",
                 params=params)
