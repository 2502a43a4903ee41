"""``orchestrator status``: one row per session, as a table or as JSON.

Reads only (the registry and every DB opened read-only, nothing created: it works
on a read-only or full disk): the registry for statuses, times and each session's
chat (channel, platform, thread), each inbound.db for counts,
outbound.db (read-only) to tell claimed messages from waiting ones, and the
``.heartbeat`` file's mtime (the registry records heartbeats only now and then:
the supervisor does not even look at every one).

Everything in a session folder is the agent's, so it is reached the supervisor's
way (``safefs.SessionDir``: no link followed, nothing but a regular file opened, no
wait on a lock, each database's queries bounded by ``safefs.READ_DEADLINE``): a FIFO,
a link or a folder where a file should be costs that session's row an error, never
the command (``orchestrator status``, ``GET /v1/sessions``, the status page).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import groups
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB, sessions_root
from orchestrator.contract.session_status import Status
from orchestrator.host import inbound, outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.support.errors import probe_cause

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.model import Config


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
    # what its agent was started with: [groups.<name>] settings digest, Docker image;
    # settings_current False = the config has changed since (applies at its next start)
    settings: str | None = None
    image: str | None = None
    settings_current: bool | None = None
    # what its agent runs used (issue 26.4): runs, totals (wall_seconds, cpu_seconds; the
    # highest peak_memory_bytes) and last_run {started_at, ended_at, wall_seconds,
    # cpu_seconds, peak_memory_bytes, exit_reason}; None before its first run ended
    usage: dict[str, Any] | None = None


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") if dt else None


def last_heartbeat(folder: SessionDir, recorded: datetime | None) -> datetime | None:
    """The newer of the registry's record and the file itself (``lstat`` by the folder's
    descriptor: never followed); anything but a regular file is Refused."""
    st = folder.regular(HEARTBEAT)
    if st is None:
        return recorded
    seen = datetime.fromtimestamp(st.st_mtime, timezone.utc)
    return max(seen, recorded) if recorded else seen


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_session(data_dir: Path, agent_group: str, session_id: str,
                 recorded: datetime | None) -> tuple[inbound.Counts, datetime | None, str | None]:
    """(counts, last heartbeat, one-line error or None) of one session, contained: its
    files are opened through ``SessionDir`` and any failure is that session's error."""
    counts, heartbeat, errors = inbound.Counts(), recorded, []
    try:
        folder = SessionDir(data_dir, agent_group, session_id)
    except FileNotFoundError:
        return counts, heartbeat, f"sessions/{agent_group}/{session_id}/{INBOUND_DB} is missing"
    except Exception as exc:  # noqa: BLE001 - one bad session must not hide the others
        return counts, heartbeat, one_line(exc)
    with folder:
        try:
            heartbeat = last_heartbeat(folder, recorded)
        except Exception as exc:  # noqa: BLE001 - the counts are still worth reading
            errors.append(one_line(exc))
        try:
            if folder.lstat(INBOUND_DB) is None:  # opening it would create an empty file
                raise FileNotFoundError(f"{folder.where}/{INBOUND_DB} is missing")
            claimed = outbound.processing_ids(folder.reader(OUTBOUND_DB))
            counts = inbound.status_counts(folder.reader(INBOUND_DB), claimed)
        except Exception as exc:  # noqa: BLE001 - one bad session must not hide the others
            errors.insert(0, one_line(exc))
    return counts, heartbeat, "; ".join(errors) or None


def is_paused(status: str, reason: str | None) -> bool:
    """The supervisor records a pause as the reason of the status ``idle``
    ("paused after …"), keeping the contract's three statuses; a resume or any
    other change replaces that reason."""
    return status == Status.IDLE and (reason or "").startswith("paused")


def queue_positions(sessions: list, now: datetime) -> dict[str, tuple[int, float]]:
    """{session: (position, seconds waited)} for the sessions waiting for a slot, in the
    supervisor's own order (oldest due work first, then session id)."""
    waiting = sorted((s.queued_since, s.id) for s in sessions
                     if s.queued_since is not None and s.container_status == Status.STOPPED)
    return {sid: (i + 1, max(0.0, round((now - since).total_seconds(), 1)))
            for i, (since, sid) in enumerate(waiting)}


def collect(data_dir: Path, registry: Registry, cfg: "Config | None" = None,
            only: set[str] | None = None, sessions: list | None = None) -> list[StatusRow]:
    """Every session's row; ``only``: just these sessions' (their folders alone read);
    ``sessions``: ``registry.sessions()`` when the caller has just read it."""
    rows = []
    started = registry.agent_settings()
    usage = registry.run_usage()
    routes = registry.routes()
    sessions = registry.sessions() if sessions is None else sessions
    queued = queue_positions(sessions, datetime.now(timezone.utc))
    for s in sessions:
        if only is not None and s.id not in only:
            continue
        counts, heartbeat, error = read_session(data_dir, s.agent_group_id, s.id,
                                                s.last_heartbeat)
        run = started.get(s.id, {})
        current = (run.get("digest") == groups.resolve(cfg, s.agent_group_id).digest
                   if cfg is not None and run else None)
        channel_type, platform_id, thread_id = routes.get(s.id, (None, None, s.thread_id))
        position, waited = queued.get(s.id, (None, None))
        rows.append(StatusRow(s.agent_group_id, s.id, s.container_status, s.status_reason,
                              counts.pending, counts.processing, counts.failed, counts.completed,
                              _iso(heartbeat),
                              _iso(s.last_active), error,
                              channel_type=channel_type, platform_id=platform_id,
                              thread_id=thread_id, queue_position=position, queued_for=waited,
                              settings=run.get("digest"), image=run.get("image"),
                              settings_current=current, usage=usage.get(s.id)))
    return rows


def settings_cell(r: StatusRow) -> str | None:
    """The settings digest (and image) of a live agent; ``*``: the config has changed
    since it started (it gets the new settings at its next start)."""
    if r.container_status == Status.STOPPED or r.settings is None:
        return None
    stale = "*" if r.settings_current is False else ""
    return f"{r.settings}{stale}" + (f" {r.image}" if r.image else "")


def container_cell(r: StatusRow) -> str:
    """The container status (marked when paused), or its place in the admission queue."""
    if r.queue_position is not None:
        return f"queued #{r.queue_position} ({r.queued_for:.0f}s)"
    if is_paused(r.container_status, r.status_reason):
        return f"{r.container_status} (paused)"
    return r.container_status


COLUMNS = [("AGENT GROUP", "agent_group"), ("SESSION", "session_id"),
           ("CONTAINER", container_cell), ("PENDING", "pending"),
           ("PROCESSING", "processing"), ("FAILED", "failed"),
           ("LAST HEARTBEAT", "last_heartbeat"), ("LAST ACTIVE", "last_active"),
           ("SETTINGS", settings_cell),
           ("CHANNEL", "channel_type"), ("PLATFORM", "platform_id"), ("THREAD", "thread_id")]


def table_lines(rows: list, columns: list[tuple[str, Any]]) -> list[str]:
    """Aligned text columns; a column is an attribute name or a function of the row.
    None prints as ``-``."""
    def cell(r: object, key: Any) -> str:
        value = key(r) if callable(key) else getattr(r, key)
        return "-" if value is None else str(value)

    cells = [[h for h, _ in columns]] + [[cell(r, k) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def render_table(rows: list[StatusRow]) -> str:
    if not rows:
        return "no sessions yet (create one with: orchestrator send --group NAME TEXT)"
    lines = table_lines(rows, COLUMNS)
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
