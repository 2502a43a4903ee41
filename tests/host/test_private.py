"""Host-written files are private whatever the umask; delivered files lose setuid/setgid.

Real files under a real umask (0o022, the usual one that made 0644/0755 before),
modes read back with ``os.stat``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loguru import logger

from orchestrator.api.events import EventStore
from orchestrator.channels.base import Reply
from orchestrator.channels.jsonl import JsonlChannel
from orchestrator.contract.layout import delivered_root, registry_path, sessions_root
from orchestrator.engine.reply_files import move_files
from orchestrator.host.data_lock import lock_data_dir
from orchestrator.host.private import tighten_data_dir
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import MessagingGroup, Sessions


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


def test_host_files_and_folders_are_private_under_umask_022(tmp_path: Path,
                                                             umask_022: None) -> None:
    data = tmp_path / "data"
    lock = lock_data_dir(data)
    try:
        with Registry(registry_path(data)) as registry:
            sessions = Sessions(data, registry, 1 << 20)
            row = sessions.resolve("grp", MessagingGroup("chat", "room"), None, "shared")
            folder = sessions.paths(row)
            sessions.write_message(row, {"text": "hi"})
        events = EventStore(data / "events.db")
        events.append("x", {})
        events.close()
    finally:
        lock.release()
    for d in (data, sessions_root(data), sessions_root(data) / "grp", folder.root,
              folder.inbox, folder.outbox):
        assert mode(d) == 0o700, d
    for f in (registry_path(data), data / "events.db", data / "orchestrator.lock",
              folder.inbound_db, folder.outbound_db):
        assert mode(f) == 0o600, f
    for extra in data.glob("*-wal"):
        assert mode(extra) == 0o600, extra


def test_jsonl_channel_file_is_private(tmp_path: Path, umask_022: None) -> None:
    import asyncio

    path = tmp_path / "out" / "replies.jsonl"
    channel = JsonlChannel(path)
    asyncio.run(channel.deliver(Reply(
        message_id="r1", session_id="s", agent_group="g", seq=1, kind="chat", in_reply_to=None,
        channel_type="c", platform_id="p", thread_id=None, timestamp="t", content={"text": "hi"})))
    channel.close()
    assert mode(path) == 0o600 and mode(path.parent) == 0o700


def test_an_existing_data_dir_is_tightened_once_and_logged(tmp_path: Path,
                                                           umask_022: None) -> None:
    data = tmp_path / "data"
    (sessions_root(data) / "grp").mkdir(parents=True)
    (delivered_root(data) / "r1").mkdir(parents=True)
    (delivered_root(data) / "r1" / "a.txt").write_text("A")
    registry_path(data).write_text("")
    jsonl = tmp_path / "replies.jsonl"
    jsonl.write_text("")
    assert mode(registry_path(data)) == 0o644 and mode(data) == 0o755
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    try:
        changed = tighten_data_dir(data, (jsonl,))
        again = tighten_data_dir(data, (jsonl,))
    finally:
        logger.remove(sink)
    assert again == [] and len(lines) == 1 and "made 8 path(s) private" in lines[0]
    assert set(changed) == {data, registry_path(data), jsonl, sessions_root(data),
                            sessions_root(data) / "grp", delivered_root(data),
                            delivered_root(data) / "r1", delivered_root(data) / "r1" / "a.txt"}
    for d in (data, sessions_root(data), sessions_root(data) / "grp", delivered_root(data),
              delivered_root(data) / "r1"):
        assert mode(d) == 0o700, d
    for f in (registry_path(data), jsonl, delivered_root(data) / "r1" / "a.txt"):
        assert mode(f) == 0o600, f


def test_a_setuid_file_from_an_outbox_arrives_in_delivered_without_the_bit(
        tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    with Registry(registry_path(data)) as registry:
        row = Sessions(data, registry, 1 << 20).resolve("grp", None, None, "agent-shared")
    outbox = sessions_root(data) / "grp" / row.id / "outbox" / "r1"
    outbox.mkdir(parents=True)
    for name, bits in (("suid", 0o4755), ("sgid", 0o2755), ("sticky", 0o1644)):
        (outbox / name).write_bytes(b"#!/bin/sh\nid\n")
        os.chmod(outbox / name, bits)
        assert mode(outbox / name) == bits
    with SessionDir(data, "grp", row.id) as folder:
        moved = move_files(folder, data, "r1", ["suid", "sgid", "sticky"])
    assert [mode(p) for p in moved] == [0o700, 0o700, 0o600]
    assert mode(delivered_root(data)) == 0o700 and mode(delivered_root(data) / "r1") == 0o700
