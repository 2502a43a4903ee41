"""Failed deliveries retried by hand (``orchestrator deliveries retry``, ``POST
/v1/deliveries/retry``): a reply recorded ``failed`` gets fresh attempts.

A reply is settled once: its ``delivered`` row (status ``failed``) in the session's
inbound.db is what keeps every pass from trying it again. Re-queueing removes those
rows (one transaction per session) and the attempt counts left in the registry, so
the next pass plans the reply like a new one: its files are still in
``delivered/<id>/`` (moved before the first attempt), and the horizon of
``[delivery] retry_horizon`` is counted again from now. A running supervisor forgets
the session's delivery memory (``Supervisor.retry_deliveries``); without one, the
next start reads inbound.db anyway.

The session folder is the agent's: inbound.db is opened by descriptor
(``SessionDir``), never through a link the agent may have planted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from loguru import logger

from orchestrator.contract.layout import INBOUND_DB
from orchestrator.contract.schema import opened, transaction
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir

BUSY_MS = 2000


class UnknownSession(LookupError):
    """``--session`` / ``session_id`` names no session of this orchestrator."""


def _requeue_one(data_dir: Path, agent_group: str, session_id: str) -> list[str]:
    with SessionDir(data_dir, agent_group, session_id) as folder:
        if folder.regular(INBOUND_DB) is None:
            return []
        # off the loop (a thread): waiting a little for a reader's lock is fine here
        with opened(folder.db(INBOUND_DB, busy_ms=BUSY_MS)) as conn, transaction(conn):
            ids = [r[0] for r in conn.execute(
                "SELECT message_out_id FROM delivered WHERE status='failed'")]
            if ids:
                conn.execute("DELETE FROM delivered WHERE status='failed'")
    return ids


def requeue_failed(data_dir: Path, registry: Registry,
                   session_id: str | None = None) -> dict[str, list[str]]:
    """Re-queue the failed replies of one session (or all): session id → reply ids.
    Raises ``UnknownSession`` for an id the registry does not know. A session whose
    folder cannot be opened is logged and skipped (the others still go)."""
    sessions = [(sid, group) for sid, group, _ in registry.session_index()
                if session_id is None or sid == session_id]
    if session_id is not None and not sessions:
        raise UnknownSession(f"no session {session_id!r}; see `orchestrator status`")
    done: dict[str, list[str]] = {}
    for sid, group in sessions:
        try:
            ids = _requeue_one(data_dir, group, sid)
        except (OSError, sqlite3.Error) as exc:  # safefs.Refused (a planted link), a gone
            # folder, a database locked for longer than BUSY_MS: the others still go
            logger.warning("session {}: failed replies not re-queued ({})", sid, exc)
            continue
        for out_id in ids:
            registry.clear_attempts(sid, out_id)
        if ids:
            logger.info("session {}: {} failed repl{} re-queued by hand: {}", sid, len(ids),
                        "y" if len(ids) == 1 else "ies", ", ".join(ids[:10]))
            done[sid] = ids
    return done
