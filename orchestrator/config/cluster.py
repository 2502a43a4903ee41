"""``[cluster] members`` entries: a shard's id and its API base URL (issue 23), and
the rule for a new list read on SIGHUP (``reload_problem``).

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


def reload_problem(old: list[Member], new: list[Member], self_id: str) -> str | None:
    """Why a re-read ``[cluster] members`` list cannot replace ``old`` (None: it can).
    Members may only be appended, in order, and a member's URL may change: placement
    reads the list as the order the shards joined (``rules.placement.possible_holders``),
    and a removed member's conversations would be placed afresh elsewhere (a split)."""
    ids = [m.id for m in new]
    if len(set(ids)) != len(ids):
        return "a shard id is listed twice"
    if self_id not in ids:
        return f"this shard ({self_id}) is not in the list"
    if ids[:len(old)] != [m.id for m in old]:
        return (f"the list must start with the current members in their order "
                f"({', '.join(m.id for m in old)}): members are only ever appended")
    return None
