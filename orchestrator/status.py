"""``orchestrator status``: one row per session, as a table or as JSON.

Reads only (the registry and every DB opened read-only, nothing created: it works
on a read-only or full disk): the registry for statuses, times and each session's
chat (channel, platform, thread), each inbound.db for counts,
outbound.db (read-only) to tell claimed messages from waiting ones, and the
``.heartbeat`` file's mtime (the registry records heartbeats only now and then:
the supervisor does not even look at every one).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.errors import probe_cause
from orchestrator.layout import SessionPaths, session_paths, sessions_root
from orchestrator.store import inbound, outbound
from orchestrator.store.registry import Registry


@dataclass(frozen=True, slots=True)
class StatusRow:
    agent_group: str
    session_id: str
    container_status: str
    status_reason: str | None
    pending: int
    processing: int
    failed: int
    completed: int
    last_heartbeat: str | None
    last_active: str | None
    error: str | None = None
    channel_type: str | None = None  # the session's chat (its default reply route)
    platform_id: str | None = None
    thread_id: str | None = None
    queue_position: int | None = None  # waiting for an agent slot ([runtime] max_agents)
    queued_for: float | None = None  # seconds its oldest due message has waited


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") if dt else None


def last_heartbeat(paths: SessionPaths, recorded: datetime | None) -> datetime | None:
    """The newer of the registry's record and the file itself (never followed)."""
    try:
        st = os.stat(paths.heartbeat, follow_symlinks=False)
    except OSError:
        return recorded
    if not stat.S_ISREG(st.st_mode):
        return recorded
    seen = datetime.fromtimestamp(st.st_mtime, timezone.utc)
    return max(seen, recorded) if recorded else seen


def is_paused(status: str, reason: str | None) -> bool:
    """The supervisor records a pause as the reason of the status ``idle``
    ("paused after …"), keeping the contract's three statuses; a resume or any
    other change replaces that reason."""
    return status == "idle" and (reason or "").startswith("paused")


def queue_positions(sessions: list, now: datetime) -> dict[str, tuple[int, float]]:
    """{session: (position, seconds waited)} for the sessions waiting for a slot, in the
    supervisor's own order (oldest due work first, then session id)."""
    waiting = sorted((s.queued_since, s.id) for s in sessions
                     if s.queued_since is not None and s.container_status == "stopped")
    return {sid: (i + 1, max(0.0, round((now - since).total_seconds(), 1)))
            for i, (since, sid) in enumerate(waiting)}


def collect(data_dir: Path, registry: Registry) -> list[StatusRow]:
    rows = []
    routes = registry.routes()
    sessions = registry.sessions()
    queued = queue_positions(sessions, datetime.now(timezone.utc))
    for s in sessions:
        paths = session_paths(data_dir, s.agent_group_id, s.id)
        error = None
        counts = inbound.Counts()
        try:
            if not paths.inbound_db.is_file():  # opening it would create an empty file
                raise FileNotFoundError(f"{paths.inbound_db} is missing")
            claimed = outbound.processing_ids(paths.outbound_db)
            counts = inbound.status_counts(paths.inbound_db, claimed)
        except Exception as exc:  # one bad session must not hide the others
            error = str(exc).splitlines()[0]
        rows.append(StatusRow(s.agent_group_id, s.id, s.container_status, s.status_reason,
                              counts.pending, counts.processing, counts.failed, counts.completed,
                              _iso(last_heartbeat(paths, s.last_heartbeat)),
                              _iso(s.last_active), error,
                              *routes.get(s.id, (None, None, s.thread_id)),
                              *queued.get(s.id, (None, None))))
    return rows


COLUMNS = [("AGENT GROUP", "agent_group"), ("SESSION", "session_id"),
           ("CONTAINER", "container_status"), ("PENDING", "pending"),
           ("PROCESSING", "processing"), ("FAILED", "failed"),
           ("LAST HEARTBEAT", "last_heartbeat"), ("LAST ACTIVE", "last_active"),
           ("CHANNEL", "channel_type"), ("PLATFORM", "platform_id"), ("THREAD", "thread_id")]


_CONTAINER = [key for _, key in COLUMNS].index("container_status")


def render_table(rows: list[StatusRow]) -> str:
    if not rows:
        return "no sessions yet (create one with: orchestrator send --group NAME TEXT)"
    cells = [[h for h, _ in COLUMNS]]
    for r in rows:
        cells.append(["-" if getattr(r, k) is None else str(getattr(r, k)) for _, k in COLUMNS])
        if is_paused(r.container_status, r.status_reason):
            cells[-1][_CONTAINER] += " (paused)"
        if r.queue_position is not None:  # the CONTAINER cell: its place in the queue
            cells[-1][_CONTAINER] = f"queued #{r.queue_position} ({r.queued_for:.0f}s)"
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines += [f"! {r.session_id}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def environment_warning(data_dir: Path) -> str | None:
    """One line when ``send`` and ``run`` could not write here (read-only, full disk)."""
    for path in (data_dir, sessions_root(data_dir)):
        if path.is_dir():
            cause = probe_cause(path)
            if cause:
                return f"{path}: {cause}; send and run cannot write there"
    return None


def render_json(rows: list[StatusRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
