"""The registry's schema: its tables and the ordered migrations that build them.

Separate from ``registry.py`` (the connection and the session rows) because it is the
one part that must never change once shipped: migration k takes ``orchestrator.db``
to version k (``schema_version``), and backups and upgrades are checked against
``SCHEMA_VERSION``. Keeping the DDL here keeps every change to the file's layout in
one short, append-only place.
"""

from __future__ import annotations

from orchestrator.contract.session_status import Status, sql_list
from orchestrator.host.schema_version import Migration, add_column, script

DDL = f"""
CREATE TABLE IF NOT EXISTS agent_groups (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messaging_groups (
    id TEXT PRIMARY KEY, channel_type TEXT NOT NULL, platform_id TEXT NOT NULL,
    created_at TEXT NOT NULL, UNIQUE (channel_type, platform_id));
CREATE TABLE IF NOT EXISTS destinations (
    agent_group_id TEXT NOT NULL, name TEXT NOT NULL, display_name TEXT, type TEXT NOT NULL,
    channel_type TEXT, platform_id TEXT, target_agent_group_id TEXT,
    PRIMARY KEY (agent_group_id, name));
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    agent_group_id TEXT NOT NULL REFERENCES agent_groups(id),
    messaging_group_id TEXT REFERENCES messaging_groups(id),
    thread_id TEXT,
    resolution_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'active',
    container_status TEXT NOT NULL DEFAULT '{Status.STOPPED.value}'
        CHECK (container_status IN ({sql_list()})),
    status_reason TEXT,
    last_active TEXT,
    last_heartbeat TEXT,
    created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS idx_sessions_group ON sessions(agent_group_id);
CREATE TABLE IF NOT EXISTS status_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, at TEXT NOT NULL,
    old TEXT, new TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS group_chats (
    agent_group_id TEXT NOT NULL, channel_type TEXT NOT NULL, platform_id TEXT NOT NULL,
    thread_id TEXT NOT NULL DEFAULT '', first_seen TEXT NOT NULL,
    PRIMARY KEY (agent_group_id, channel_type, platform_id, thread_id));
CREATE TABLE IF NOT EXISTS delivery_attempts (
    session_id TEXT NOT NULL, message_out_id TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_attempt_at TEXT, last_error TEXT, PRIMARY KEY (session_id, message_out_id));
CREATE TABLE IF NOT EXISTS manual_destinations (
    agent_group_id TEXT NOT NULL, name TEXT NOT NULL, display_name TEXT, type TEXT NOT NULL
        CHECK (type IN ('channel', 'agent')),
    channel_type TEXT, platform_id TEXT, target_agent_group_id TEXT, created_at TEXT NOT NULL,
    PRIMARY KEY (agent_group_id, name));
CREATE TABLE IF NOT EXISTS agent_settings (
    session_id TEXT PRIMARY KEY, agent_group_id TEXT NOT NULL, digest TEXT NOT NULL,
    image TEXT, started_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS session_state (
    session_id TEXT PRIMARY KEY, state TEXT NOT NULL, saved_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, agent_group_id TEXT NOT NULL,
    recurrence TEXT NOT NULL, timezone TEXT NOT NULL, created_at TEXT NOT NULL,
    cancelled_at TEXT);
"""

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS agent_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
    agent_group_id TEXT NOT NULL, started_at TEXT, ended_at TEXT NOT NULL,
    wall_seconds REAL, cpu_seconds REAL, peak_memory_bytes INTEGER, exit_reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS idx_agent_runs_session ON agent_runs(session_id);
"""


# One row per session being archived or deleted (``host.removals``): written, with the
# session's registry rows, in the transaction that takes those rows out of ``sessions``;
# removed when the removal is complete. A row left by a crash is finished or undone at
# the next start (``host.retention.recover``).
REMOVALS_DDL = """
CREATE TABLE IF NOT EXISTS removals (
    session_id TEXT PRIMARY KEY, agent_group_id TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('archive', 'delete')),
    rows TEXT NOT NULL, started_at TEXT NOT NULL);
"""


# The registry's schema versions, in order (``schema_version``): migration k takes the
# file to version k (PRAGMA user_version). Append only; never change one that shipped.
# Each also holds on a file from before versions (version 0, some columns there).
MIGRATIONS: tuple[Migration, ...] = (
    script(DDL),  # 1: the tables as they were when versions began
    lambda c: add_column(c, "sessions", "queued_since", "TEXT"),  # 2: admission queue
    script(RUNS_DDL),  # 3: what each agent run used (issue 26.4)
    # 4: a session's status log read by its id (the console's timeline, status) without
    # a scan of every session's changes
    script("CREATE INDEX IF NOT EXISTS idx_status_changes_session"
           " ON status_changes(session_id, id);"),
    script(REMOVALS_DDL),  # 5: retention's journal of archives and deletions (issue 26.1)
)
SCHEMA_VERSION = len(MIGRATIONS)
