#!/usr/bin/env python3
"""Regenerate ``sessions.example/``: a small, real session tree made by the project's code.

    .venv/bin/python scripts/make_example.py [--out DIR]

What it builds (one agent group ``main``, two sessions):

- ``sess-example-chat`` (mode ``shared``, chat cli/local): the host wrote one
  message with an attachment and, before waking the agent, the default route and
  destinations. The "agent" (plain SQL below, exactly what an agent does) claimed
  the message, touched ``.heartbeat``, wrote two replies with odd seqs — one with a
  file in ``outbox/`` — recorded its session and tool state, and acked the message
  ``completed``. The host then mirrored the ack into ``messages_in.status`` and
  delivered the first reply (a ``delivered`` row; that reply had no files). The
  second reply is still waiting for delivery, so its outbox file is still there.
- ``sess-example-thread`` (mode ``per-thread``, slack C0EXAMPLE thread t-42): one
  pending message the host has written; no agent has run yet.

Host-side writes go through the project's own functions (registry, sessions,
store.inbound, attachments). The registry is built in a temporary folder and not
kept: it is the host's private database, not part of the session-folder
contract. Ids are fixed and the clock is pinned (``schema.utcnow`` is replaced by
a fixed UTC time while the script runs), so running the script again reproduces
the same rows.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sqlite3
import sys
import tempfile
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from orchestrator.contract import layout, schema
from orchestrator.host import inbound, outbound
from orchestrator.host.registry import Registry, SessionRow
from orchestrator.host.sessions import Sessions, create_folder, resolution_key

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "sessions.example"
KEEP = {"README.md"}  # hand-written files in the output folder that are not regenerated

GROUP = "main"
CHAT = "sess-example-chat"
THREAD = "sess-example-thread"
CLOCK = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)

NOTES = (b"Meeting notes, 1 June\n"
         b"- ship the orchestrator sidecar\n"
         b"- agents stop themselves when idle\n")
SUMMARY = b"Summary: ship the sidecar; idle agents stop on their own.\n"


@contextmanager
def pinned_clock(when: datetime) -> Iterator[None]:
    """Every host timestamp written while this is active is ``when``."""
    real = schema.utcnow
    schema.utcnow = lambda: when  # type: ignore[assignment]
    try:
        yield
    finally:
        schema.utcnow = real  # type: ignore[assignment]


def session(registry: Registry, data_dir: Path, mode: str, channel: str, platform: str,
            thread: str | None, session_id: str) -> SessionRow:
    """What Sessions.resolve does, but with a fixed session id instead of a random one."""
    registry.ensure_agent_group(GROUP)
    mg = registry.ensure_messaging_group(channel, platform)
    row, _ = registry.get_or_create_session(
        resolution_key=resolution_key(mode, GROUP, mg, thread), agent_group_id=GROUP,
        messaging_group_id=None if mode == "agent-shared" else mg,
        thread_id=thread if mode == "per-thread" else None, new_id=session_id)
    create_folder(data_dir, GROUP, row.id)
    return row


def agent_turn(paths: layout.SessionPaths) -> None:
    """What an agent does with msg-0001, as plain SQL against its own outbound.db."""
    with closing(sqlite3.connect(f"{paths.inbound_db.resolve().as_uri()}?mode=ro",
                                 uri=True)) as ro:
        (max_in,) = ro.execute("SELECT MAX(seq) FROM messages_in").fetchone()

    def next_odd(conn: sqlite3.Connection) -> int:
        (max_out,) = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()
        top = max(max_in or 0, max_out or 0)
        return top + 1 if top % 2 == 0 else top + 2

    with closing(sqlite3.connect(paths.outbound_db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO processing_ack VALUES ('msg-0001', 'processing', "
                     "'2024-06-01 12:00:01')")
        conn.execute("COMMIT")
        paths.heartbeat.touch()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
            " channel_type, thread_id, content) VALUES (?,?,?,?,?,?,?,?,?)",
            ("out-0001", next_odd(conn), "msg-0001", "2024-06-01 12:00:02", "chat", "local",
             "cli", None, json.dumps({"text": "Reading your notes now."})))
        conn.execute("COMMIT")
        out_dir = paths.outbox / "out-0002"
        out_dir.mkdir()
        (out_dir / "summary.txt").write_bytes(SUMMARY)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
            " channel_type, thread_id, content) VALUES (?,?,?,?,?,?,?,?,?)",
            ("out-0002", next_odd(conn), "msg-0001", "2024-06-01 12:00:03", "chat", "local",
             "cli", None, json.dumps({"text": "Here is the summary.", "files": ["summary.txt"]})))
        conn.execute("INSERT INTO session_state VALUES ('turns', '1', '2024-06-01 12:00:03')")
        conn.execute("INSERT INTO container_state (id, current_tool, tool_declared_timeout_ms,"
                     " tool_started_at, updated_at) VALUES (1, NULL, NULL, NULL,"
                     " '2024-06-01 12:00:03')")
        conn.execute("UPDATE processing_ack SET status='completed',"
                     " status_changed='2024-06-01 12:00:03' WHERE message_id='msg-0001'")
        conn.execute("COMMIT")
    paths.heartbeat.touch()


def build(data_dir: Path) -> None:
    with Registry(data_dir / "orchestrator.db") as registry, pinned_clock(CLOCK):
        sessions = Sessions(data_dir, registry, max_attachment_bytes=1024 * 1024)
        registry.set_destinations(GROUP, [
            {"name": "main-chat", "type": "channel", "display_name": "Local CLI",
             "channel_type": "cli", "platform_id": "local"},
            {"name": "team", "type": "channel", "display_name": "#team on Slack",
             "channel_type": "slack", "platform_id": "C0EXAMPLE"}])

        chat = session(registry, data_dir, "shared", "cli", "local", None, CHAT)
        sessions.write_message(chat, {"text": "Please summarise the attached notes.",
                                      "attachments": [{"name": "notes.txt",
                                                       "data": base64.b64encode(NOTES).decode()}]},
                               routing=sessions.routing_of(chat), message_id="msg-0001")
        sessions.write_routing(chat)  # before every wake
        paths = sessions.paths(chat)
        agent_turn(paths)
        acks = {a.message_id: a.status for a in outbound.read(paths.outbound_db).acks.values()}
        inbound.settle(paths.inbound_db, (), acks)
        inbound.record_delivery(paths.inbound_db, "out-0001", "delivered", "cli-0001",
                                now=datetime(2024, 6, 1, 12, 0, 4, tzinfo=timezone.utc))

        thread = session(registry, data_dir, "per-thread", "slack", "C0EXAMPLE", "t-42", THREAD)
        sessions.write_message(thread, {"text": "Can someone look at the deploy?"},
                               routing=sessions.routing_of(thread), message_id="msg-0002")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder that receives <agent_group>/<session>/ (default: %(default)s)")
    args = parser.parse_args(argv)
    out: Path = args.out
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        build(data_dir)
        out.mkdir(parents=True, exist_ok=True)
        for child in out.iterdir():
            if child.name in KEEP:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for group in layout.sessions_root(data_dir).iterdir():
            shutil.copytree(group, out / group.name, symlinks=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
