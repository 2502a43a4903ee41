"""``[cluster] members`` entries: a shard's id and its API base URL (issue 23).

Here, below ``rules``, because the config validates them when it loads and the
placement rules (``rules.placement``) and the API's router use the same record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True, slots=True)
class Member:
    """One shard: a stable id (the node name on Kubernetes) and its API base URL."""

    id: str
    url: str


def parse_member(text: str) -> Member:
    """``"ID=URL"`` (``[cluster] members``) → Member; ValueError names the fix."""
    ident, sep, url = text.partition("=")
    ident, url = ident.strip(), url.strip().rstrip("/")
    if not sep or not MEMBER_ID.fullmatch(ident) or not url.startswith(("http://", "https://")):
        raise ValueError(f"[cluster] members: {text[:100]!r} is not 'ID=http://HOST:PORT' "
                         "(ID: letters, digits, '.', '_', '-')")
    return Member(ident, url)
