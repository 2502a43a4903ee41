"""Per-session gateway tokens: minted when an agent starts, revoked when it stops.

A token is 32 random bytes (``secrets.token_urlsafe``), useless anywhere but at the
gateway. Only its SHA-256 is kept — in memory and in ``<data_dir>/gateway/tokens.json``
(0600, replaced atomically) — so that an agent left running across an orchestrator
restart (``on_shutdown = "leave"``) keeps a working token: at start-up the book is read
back, and once the runtime has listed the agents it adopts (``keep_only``) every other
token is forgotten. Revoked tokens are remembered (hash only, bounded) so the gateway
can tell "revoked" (407, the session stopped) from "unknown".
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from orchestrator.rules.egress import TokenState

MAX_REVOKED = 10_000


@dataclass(frozen=True)
class Holder:
    group: str
    session_id: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenBook:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._live: dict[str, Holder] = {}  # sha256(token) -> holder
        self._by_session: dict[str, str] = {}  # session id -> sha256(token)
        self._tokens: dict[str, str] = {}  # session id -> token (minted by this process)
        self._revoked: OrderedDict[str, None] = OrderedDict()
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
            rows = [(str(d), str(g), str(s)) for d, (g, s) in data.items()]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("gateway tokens {} unreadable ({}); agents adopted from before "
                           "this start must be restarted to reach the gateway", self.path, exc)
            return
        for digest, group, session_id in rows:
            self._live[digest] = Holder(group, session_id)
            self._by_session[session_id] = digest

    def _save(self) -> None:
        if self.path is None:
            return
        data = {d: [h.group, h.session_id] for d, h in self._live.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def mint(self, group: str, session_id: str) -> str:
        """The session's token: a new one, unless its agent already holds a live one
        (a start that found its container still running: the agent keeps its token)."""
        token = self._tokens.get(session_id)
        if token is not None and self._by_session.get(session_id) == _digest(token):
            return token
        self._drop(session_id)
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        self._live[digest] = Holder(group, session_id)
        self._by_session[session_id] = digest
        self._tokens[session_id] = token
        self._save()
        return token

    def _drop(self, session_id: str) -> bool:
        digest = self._by_session.pop(session_id, None)
        self._tokens.pop(session_id, None)
        if digest is None:
            return False
        self._live.pop(digest, None)
        self._revoked[digest] = None
        while len(self._revoked) > MAX_REVOKED:
            self._revoked.popitem(last=False)
        return True

    def revoke(self, session_id: str) -> None:
        if self._drop(session_id):
            self._save()

    def keep_only(self, session_ids: set[str]) -> None:
        """After the runtime listed its agents: forget the tokens of every other session."""
        gone = [s for s in self._by_session if s not in session_ids]
        for session_id in gone:
            self._drop(session_id)
        if gone:
            self._save()

    def check(self, token: str | None) -> tuple[TokenState, Holder | None]:
        if not token:
            return TokenState.MISSING, None
        digest = _digest(token)
        holder = self._live.get(digest)
        if holder is not None:
            return TokenState.VALID, holder
        return (TokenState.REVOKED if digest in self._revoked else TokenState.UNKNOWN), None

    def live_sessions(self) -> set[str]:
        return set(self._by_session)
