"""Standard Webhooks 1.0 signing (https://www.standardwebhooks.com): the keys, the
headers, and the RFC 3339 times of the payloads.

Every request carries ``webhook-id`` (the reply id, or a stable id of a failure or
event record: a receiver de-duplicates on it), ``webhook-timestamp`` (unix seconds)
and ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``,
one per configured key, space-separated. Because the id is inside the signed
content, a captured request cannot be replayed under another id, and because every
key signs, a receiver that knows any one of them accepts: a key is rotated by adding
the new key, moving receivers over, then removing the old one, with no downtime.

Keys live in files (``[delivery] secret_files``), in the spec's ``whsec_<base64>``
form; the first file is made if missing. A file from before (a plain string, no
prefix) still works: its UTF-8 bytes are the key, i.e. receivers use
``"whsec_" + base64(contents)``. Keys are never logged, only their file names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from orchestrator.contract.schema import parse_ts
from orchestrator.host.secretfile import SecretFileError, ensure_secret, read_secret

PREFIX = "whsec_"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def new_secret() -> str:
    """A fresh key in the spec's form: ``whsec_`` + base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def parse_secret(value: str, where: str) -> tuple[bytes, bool]:
    """The key bytes of a secret file's contents, and whether it is the legacy form
    (no ``whsec_`` prefix: the text itself is the key)."""
    if not value.startswith(PREFIX):
        return value.encode("utf-8"), True
    try:
        key = base64.b64decode(value[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise SecretFileError(f"{where}: not valid base64 after 'whsec_'; write "
                              "'whsec_' + the base64 of the key, or delete the file to "
                              "have a new key made") from None
    if len(key) < 16:
        raise SecretFileError(f"{where}: the key after 'whsec_' is {len(key)} bytes; use "
                              "at least 16 (24 to 64 is usual)")
    return key, False


def load_keys(paths: tuple[str, ...]) -> tuple[bytes, ...]:
    """The signing keys, in the configured order; the first file is created if missing,
    any other must exist (a rotation names a key someone made on purpose)."""
    keys = []
    for i, name in enumerate(paths):
        path = Path(name)
        try:
            value = ensure_secret(path, new_secret) if i == 0 else read_secret(path)
        except FileNotFoundError:
            raise SecretFileError(f"{path}: missing ([delivery] secret_files lists it); "
                                  f"put a key in it (e.g. {PREFIX}<base64 of 32 random "
                                  "bytes>) or remove it from the list") from None
        key, legacy = parse_secret(value, str(path))
        if legacy:
            logger.warning("{}: webhook key without the 'whsec_' prefix (from before "
                           "Standard Webhooks): receivers verify with 'whsec_' + the base64 "
                           "of the file's contents; rewrite the file in that form", path)
        keys.append(key)
    return tuple(keys)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "<msg_id>.<timestamp>." + body>``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode("utf-8") + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signed_headers(keys: tuple[bytes, ...], msg_id: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers: one signature per key."""
    return {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: " ".join(sign(k, msg_id, timestamp, body) for k in keys)}


def rfc3339(value: str | datetime | None) -> str | None:
    """A contract timestamp (``2030-01-01 12:00:00.000``, UTC) as RFC 3339 UTC with a
    ``Z``, milliseconds kept; a text that does not parse (agents write reply stamps)
    is passed on as it is rather than failing the delivery."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            when = parse_ts(value)
        except ValueError:
            return value
        if when is None:
            return value
    else:
        when = value
    when = when.astimezone(timezone.utc) if when.tzinfo else when
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
