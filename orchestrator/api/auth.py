"""Where the API listens and who may use it: pure checks, table-tested.

``[api] listen`` is ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path`` or ``""`` (off).
Every ``/v1`` request needs ``Authorization: Bearer <token>``, compared in constant
time. Without a token the API may only listen on loopback or a Unix socket: refusing
to start is better than serving every session to the network.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from orchestrator.support.errors import UserError


class ApiConfigError(UserError):
    """One line naming the key and the fix; ``run`` refuses to start."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str | None = None
    port: int = 0
    path: str | None = None  # a Unix socket

    def url(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_listen(text: str) -> Listen | None:
    """None = the API is off."""
    if text == "":
        return None
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ApiConfigError(f"[api] listen: unix socket path must be absolute, got {text!r}")
        return Listen(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ApiConfigError(f"[api] listen must be 'HOST:PORT', 'unix:/path' or '', got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Listen(host=host, port=int(port))


def is_loopback(listen: Listen) -> bool:
    if listen.path:
        return True
    if listen.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.host or "").is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def start_error(listen: Listen, has_token: bool) -> str | None:
    if has_token or is_loopback(listen):
        return None
    return (f"[api] listen = {listen.host}:{listen.port} is not a loopback address and "
            "[api] token_file is '': set a token file (or listen on 127.0.0.1)")


def bearer_ok(header: str | None, token: str | None) -> bool:
    """No token configured (loopback only) lets everyone in."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


# --- who may call: Host and Origin (DNS rebinding, cross-site requests) ------------------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761: browsers never resolve it elsewhere),
    127.0.0.0/8 and ::1. A name that merely resolves to 127.0.0.1 is not one: that is
    exactly what a DNS-rebinding page uses."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(value: str) -> str | None:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``), lower-case,
    without port or trailing dot; None if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end > 0 else "?"
        if rest and not (rest.startswith(":") and rest[1:].isdecimal()):
            return None
        return value[1:end] or None
    name, sep, port = value.partition(":")
    if sep and not port.isdecimal():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in " /\\@?#%"):
        return None
    return name


def origin_host(origin: str) -> str | None:
    """The host of an Origin header (``scheme://host[:port]``); None for ``null`` or
    anything else that is not an origin."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        return None
    return host_of(rest)


@dataclass(frozen=True, slots=True)
class HostRule:
    """Which Host and Origin names are served. ``names`` empty and ``any_host``
    False: loopback names only."""

    names: frozenset[str]
    any_host: bool
    has_token: bool

    def allows(self, host: str) -> bool:
        if not self.has_token:  # no token: only loopback, whatever allowed_hosts says
            return is_loopback_name(host)
        return self.any_host or is_loopback_name(host) or host in self.names


def host_rule(listen: Listen, allowed_hosts: tuple[str, ...], has_token: bool) -> HostRule:
    """``[api] allowed_hosts`` resolved: loopback names, the listen host and the names
    listed; with none listed, any host when a token guards a wildcard listen (0.0.0.0,
    ::) or a Unix socket. Without a token ``allows`` takes loopback names only."""
    names = {h.strip().lower().strip("[]").rstrip(".") for h in allowed_hosts if h.strip()}
    any_host = "*" in names
    wildcard = listen.host is not None and listen.host.lower() in WILDCARD_HOSTS
    if not names and (listen.path or wildcard):
        any_host = True
    if listen.host is not None and not wildcard:
        names.add(listen.host.lower())
    return HostRule(frozenset(names - {"*"}), any_host, has_token)


def request_refusal(rule: HostRule, method: str, host: str | None, origin: str | None,
                    unix: bool = False) -> str | None:
    """Why a request is refused (403), or None. Host must be an allowed name (a
    missing Host — HTTP/1.0, no browser — passes). An Origin header (sent by browsers
    on cross-origin and on POST requests) must name an allowed host; without a token
    for every method, with one for state-changing methods (a foreign page cannot
    read the token, so its GETs get a 401 anyway). ``unix``: no browser reaches a
    Unix socket, and its clients send any Host: only the Origin is checked."""
    if host is not None and not unix:
        name = host_of(host)
        if name is None or not rule.allows(name):
            shown = host if len(host) <= 100 else host[:100] + "…"
            return (f"Host {shown!r} is not served: add it to [api] allowed_hosts"
                    + ("" if rule.has_token else " (with no token, only loopback names "
                       "such as localhost or 127.0.0.1 are)"))
    if origin is not None and (not rule.has_token or method.upper() not in SAFE_METHODS):
        name = origin_host(origin)
        if name is None or not rule.allows(name):
            shown = origin if len(origin) <= 100 else origin[:100] + "…"
            return (f"Origin {shown!r} is not allowed: cross-site requests are refused "
                    "(allowed: loopback names and [api] allowed_hosts)")
    return None
