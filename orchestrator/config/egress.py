"""Validating a group's ``egress`` and ``egress_credentials`` (the egress gateway).

Pure, like ``load``: a list of ``"host:port"`` entries the group's agents may reach, and
the credentials the gateway injects per upstream host (header, secret file path —
never its content). Every error is one line naming the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from orchestrator.config.sections import ConfigError, EgressCredential

# as load.ENV_NAME / RESERVED_ENV_PREFIX (load imports this module)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIX = "ORCHESTRATOR_"

EGRESS_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}"
                         r"[a-z0-9])?)*$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)
# headers the gateway sets or strips itself: injecting them would break the proxying
HEADERS_NOT_INJECTED = frozenset({"host", "content-length", "transfer-encoding", "connection",
                                  "proxy-authorization", "te", "upgrade", "keep-alive"})
CREDENTIAL_KEYS = {f.name for f in fields(EgressCredential)}


def egress_entry(text: str) -> tuple[str, int] | None:
    """``"host:port"`` (host lower-cased, ``*.`` allowed in front) -> (host, port); None
    when malformed."""
    host, sep, port = text.strip().lower().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return (host, int(port)) if EGRESS_HOST.fullmatch(host) and len(host) <= 253 else None


def egress_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    items = value
    out = []
    for item in items:
        entry = egress_entry(item)
        if entry is None:
            raise ConfigError(f"{where}: {item!r} is not HOST:PORT (e.g. "
                              "\"api.anthropic.com:443\" or \"*.example.com:443\")")
        out.append(f"{entry[0]}:{entry[1]}")
    return tuple(sorted(set(out)))


def egress_credentials(where: str, value: Any, base_dir: Path) -> tuple[EgressCredential, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{where} must be a list of tables, e.g. [{{ host = "
                          "\"api.anthropic.com\", header = \"x-api-key\", secret_file = "
                          "\"/run/secrets/anthropic\" }]")
    out = [_credential(where, t, base_dir) for t in value]
    hosts = [c.host for c in out]
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"{where}: a host appears twice; keep one entry per host")
    return tuple(sorted(out, key=lambda c: c.host))


def _credential(where: str, t: dict[str, Any], base_dir: Path) -> EgressCredential:
    unknown = sorted(set(t) - CREDENTIAL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}: allowed are "
                          f"{', '.join(sorted(CREDENTIAL_KEYS))}")
    for k in ("host", "header", "secret_file"):
        if not isinstance(t.get(k), str) or not t[k]:
            raise ConfigError(f"{where}: each entry needs {k} (a non-empty string)")
    for k in ("prefix", "base_url_env", "key_env"):
        if not isinstance(t.get(k, ""), str):
            raise ConfigError(f"{where} {k} must be a string")
    host = t["host"].strip().lower()
    if not EGRESS_HOST.fullmatch(host) or host.startswith("*."):
        raise ConfigError(f"{where}: host {t['host']!r} must be a host name (no port, "
                          "no wildcard)")
    if not HEADER_NAME.fullmatch(t["header"]) or t["header"].lower() in HEADERS_NOT_INJECTED:
        raise ConfigError(f"{where}: header {t['header']!r} is not a header the gateway "
                          "can inject (e.g. x-api-key or Authorization)")
    if any(c in t.get("prefix", "") for c in "\r\n\x00"):
        raise ConfigError(f"{where}: prefix must be one line")
    for k in ("base_url_env", "key_env"):
        name = t.get(k, "")
        if name and (not ENV_NAME.fullmatch(name)
                     or name.upper().startswith(RESERVED_ENV_PREFIX)):
            raise ConfigError(f"{where} {k}: {name!r} is not a variable name the agent "
                              "may be given")
    secret = str((base_dir / Path(t["secret_file"]).expanduser()).resolve())
    return EgressCredential(host=host, header=t["header"], secret_file=secret,
                            prefix=t.get("prefix", ""), base_url_env=t.get("base_url_env", ""),
                            key_env=t.get("key_env", ""))


def egress_value(where: str, key: str, value: Any, base_dir: Path) -> Any:
    """A group's ``egress`` or ``egress_credentials``, checked."""
    if key == "egress":
        return egress_list(where, value)
    return egress_credentials(where, value, base_dir)


def check_egress_hosts(where: str, egress: tuple[str, ...],
                       creds: tuple[EgressCredential, ...]) -> None:
    """Every credential's host must be one the group may reach (an exact egress entry)."""
    listed = {e.rpartition(":")[0] for e in egress}
    for cred in creds:
        if cred.host not in listed:
            raise ConfigError(f"{where} egress_credentials: host {cred.host!r} is not on "
                              f"{where} egress; add \"{cred.host}:443\" there")
