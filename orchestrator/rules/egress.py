"""The egress gateway's decisions, as small pure functions (table-tested).

The gateway (``orchestrator.gateway``) does the I/O: it accepts an agent's connection,
reads one HTTP request, and asks these functions what to do with it:

- ``allowed``: is ``host:port`` on the group's ``egress`` list;
- ``credential_for``: which configured key (if any) is injected for a host;
- ``token_verdict``: what a presented gateway token means for this listener's group
  (407: none, unknown or revoked; 403: another group's);
- ``limit_verdict``: a session's rate, concurrency and body-size limits (429 / 413);
- ``upstream_headers``: the request headers sent on, with the agent's placeholder
  and proxy headers removed and the real key added;
- ``agent_env``: the variables an agent with egress is started with (no key in them);
- ``should_log``: one log line per refused host per group per hour.

A refusal is a ``Refusal``: an HTTP status and a one-line body that names the thing
refused and the config key that would allow it — never a token or a key.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from orchestrator.config.sections import EgressCredential

CA_MOUNT = "/etc/orchestrator/ca-bundle.pem"  # where a container finds the CA bundle (ro)
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
PROXY_USER = "orchestrator"  # the user name in the proxy URL; the password is the token
LOG_EVERY = 3600.0  # seconds between two log lines for the same refused host of a group

# hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never sent on
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection",
                        "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length", "expect"})  # the body is read whole first


@dataclass(frozen=True, slots=True)
class AgentEgress:
    """What an agent of a group with egress is started with (``SessionRef.egress``):
    its variables (token, proxy, CA; never a key), the Docker network it joins instead
    of ``[docker] network``, and the host path of the CA bundle (mounted read-only at
    ``CA_MOUNT`` in a container)."""

    env: tuple[tuple[str, str], ...]
    network: str = ""
    ca_file: str = ""


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # one line: the response body and the log line
    result: str  # the metric's result label


class TokenState(Enum):
    MISSING = "missing"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    VALID = "valid"


def host_matches(entry_host: str, host: str) -> bool:
    """``*.example.com`` matches any name below example.com (not example.com itself)."""
    if entry_host.startswith("*."):
        return host.endswith(entry_host[1:]) and len(host) > len(entry_host) - 1
    return host == entry_host


def allowed(egress: Iterable[str], host: str, port: int) -> bool:
    """Whether ``host:port`` is on a group's ``egress`` list (entries as config keeps
    them: lower-case ``host:port``)."""
    host = host.lower().rstrip(".")
    for entry in egress:
        entry_host, _, entry_port = entry.rpartition(":")
        if entry_port == str(port) and host_matches(entry_host, host):
            return True
    return False


def host_refusal(group: str, host: str, port: int) -> Refusal:
    return Refusal(403, f"egress to {host}:{port} is not allowed for agent group {group!r}: "
                        f"add \"{host}:{port}\" to [groups.{group}] egress", "host_refused")


def credential_for(creds: Sequence[EgressCredential], host: str) -> EgressCredential | None:
    host = host.lower().rstrip(".")
    return next((c for c in creds if c.host == host), None)


def token_verdict(state: TokenState, token_group: str | None, group: str) -> Refusal | None:
    """None: go on. A token must be live and belong to this listener's group."""
    if state is TokenState.MISSING:
        return Refusal(407, "no gateway token: use the proxy URL or base URL this agent "
                            "was started with", "no_token")
    if state is TokenState.UNKNOWN:
        return Refusal(407, "unknown gateway token", "bad_token")
    if state is TokenState.REVOKED:
        return Refusal(407, "gateway token revoked: its session's agent has stopped",
                       "revoked_token")
    if token_group != group:
        return Refusal(403, f"this gateway token is not one of agent group {group!r}",
                       "other_group")
    return None


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    connections: int
    body_bytes: int


def limit_verdict(limits: Limits, *, recent_requests: int = 0, open_connections: int = 0,
                  body_bytes: int = 0) -> Refusal | None:
    """``recent_requests``: this session's requests in the last 60 s, this one included;
    ``open_connections``: its open connections, this one included."""
    if open_connections > limits.connections:
        return Refusal(429, f"too many connections from this session (more than "
                            f"{limits.connections}: [gateway] max_connections)", "limited")
    if recent_requests > limits.requests_per_minute:
        return Refusal(429, f"too many requests from this session (more than "
                            f"{limits.requests_per_minute} a minute: [gateway] "
                            "max_requests_per_minute)", "limited")
    if body_bytes > limits.body_bytes:
        return Refusal(413, f"request body larger than {limits.body_bytes} bytes "
                            "([gateway] max_body_bytes)", "too_large")
    return None


def within_minute(times: list[float], now: float) -> list[float]:
    """The request times of the last 60 s (kept per session by the gateway)."""
    return [t for t in times if now - t < 60.0]


def should_log(last: float | None, now: float, every: float = LOG_EVERY) -> bool:
    return last is None or now - last >= every


def basic_token(header: str | None) -> str | None:
    """The password of a ``Basic`` Proxy-Authorization (the token), or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password or None if sep else None


def header_token(value: str | None, cred: EgressCredential | None) -> str | None:
    """The token an SDK sends as its API key (the credential's header, prefix stripped)."""
    if not value:
        return None
    value = value.strip()
    prefix = (cred.prefix if cred is not None else "").strip()
    if prefix and value.lower().startswith(prefix.lower()):
        value = value[len(prefix):].strip()
    elif value.lower().startswith("bearer "):
        value = value[7:].strip()
    return value or None


def upstream_headers(headers: Sequence[tuple[str, str]], cred: EgressCredential | None,
                     secret: str | None) -> list[tuple[str, str]]:
    """What is sent upstream: the agent's headers minus hop-by-hop ones (the HTTP
    client sets Host and the framing), minus the credential's header (it carried the
    placeholder token), plus the real key."""
    drop = set(HOP_BY_HOP)
    if cred is not None:
        drop.add(cred.header.lower())
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    if cred is not None and secret is not None:
        out.append((cred.header, f"{cred.prefix}{secret}"))
    return out


def response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers the agent gets (framing is the gateway's own,
    except content-length, kept when the body is passed on as it came)."""
    return [(k, v) for k, v in headers
            if k.lower() not in HOP_BY_HOP or k.lower() == "content-length"]


def base_url_target(path: str) -> tuple[str, str] | None:
    """``/<host>[:port]/rest`` (base-URL mode) -> (``host[:port]``, ``/rest``)."""
    if not path.startswith("/") or path.startswith("//"):
        return None
    first, sep, rest = path[1:].partition("/")
    first = first.split("?", 1)[0]
    if not first:
        return None
    return first.lower(), "/" + rest if sep else "/"


HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]{0,61}"
                       r"[a-z0-9])?)*\.?$")


def split_hostport(text: str, default_port: int) -> tuple[str, int] | None:
    """``host[:port]`` from an agent -> (host, port); None unless the host is a plain
    DNS name or IPv4 address: anything else (``@``, ``#``, ``%``, brackets, spaces)
    could make the URL built from it point somewhere the allowlist never saw."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host.lower()
    if len(host) > 253 or not HOST_NAME.fullmatch(host):
        return None
    return host.rstrip("."), int(port)


def upstream_port(egress: Iterable[str], host: str) -> int:
    """The port of a credential's host on the egress list (443 when several or none)."""
    ports = {int(e.rpartition(":")[2]) for e in egress if e.rpartition(":")[0] == host}
    return ports.pop() if len(ports) == 1 else 443


def agent_env(*, host: str, port: int, token: str, ca_file: str,
              creds: Sequence[EgressCredential], egress: Iterable[str] = ()) -> dict[str, str]:
    """The variables an agent of a group with egress is started with: the proxy (token
    as the password), the CA bundle, and per credential its base URL and the token as
    the placeholder key its SDK sends. No key is ever among them."""
    proxy = f"http://{PROXY_USER}:{token}@{host}:{port}"
    env = {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy,
           "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    env.update({name: ca_file for name in CA_ENV})
    for cred in creds:
        if cred.base_url_env:
            up = upstream_port(egress, cred.host)
            where = cred.host if up == 443 else f"{cred.host}:{up}"
            env[cred.base_url_env] = f"http://{host}:{port}/{where}"
        if cred.key_env:
            env[cred.key_env] = token
    return env
