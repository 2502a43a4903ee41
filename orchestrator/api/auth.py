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
