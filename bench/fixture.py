"""Data dirs for the bench: N sessions created the orchestrator's own way, copied per run.

A template per session count is built once with ``Registry`` (registry rows,
container status 'stopped') and ``sessions.create_folder`` for the first session
(folders, inbox/, outbox/, both DBs with the contract schemas); the other
sessions get byte-for-byte copies of that session's two empty DBs, which is
what ``create_folder`` would write for them too, without its ~10 ms of fsyncs
each. NO inbound messages, so no agent is ever due. Each run gets a fresh copy
(a run leaves delivered rows, registry status changes and a jsonl file behind).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import tomli_w

from orchestrator.contract.layout import INBOX, OUTBOX, registry_path, sessions_root
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import create_folder

GROUP = "bench"


def session_ids(n: int) -> list[str]:
    return [f"s{i:05d}" for i in range(n)]


def build_template(path: Path, n: int) -> float:
    t0 = time.monotonic()
    registry = Registry(registry_path(path))
    try:
        registry.ensure_agent_group(GROUP)
        dbs: list[tuple[str, bytes]] = []
        group = sessions_root(path) / GROUP
        for sid in session_ids(n):
            registry.get_or_create_session(
                resolution_key=f"bench:{GROUP}:{sid}", agent_group_id=GROUP,
                messaging_group_id=None, thread_id=None, new_id=sid)
            if not dbs:
                first = create_folder(path, GROUP, sid)
                dbs = [(p.name, p.read_bytes()) for p in (first.inbound_db, first.outbound_db)]
                continue
            _write_folder(str(group / sid), dbs)
    finally:
        registry.close()
    return time.monotonic() - t0


def _write_folder(root: str, dbs: list[tuple[str, bytes]]) -> None:
    """One session folder with byte-for-byte copies of the first one's DBs: one
    ``mkdir`` per folder and one ``open``/``write`` per file (no parents walk, no
    source file opened 20 000 times): the bench's set-up on a shared, busy disk."""
    os.mkdir(root)
    os.mkdir(os.path.join(root, INBOX))
    os.mkdir(os.path.join(root, OUTBOX))
    for name, data in dbs:
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def copy_template(template: Path, data_dir: Path) -> None:
    shutil.copytree(template, data_dir, symlinks=True)


def session_folders(data_dir: Path, n: int) -> list[Path]:
    root = sessions_root(data_dir)
    return [root / GROUP / sid for sid in session_ids(n)]


def config_dict(data_dir: Path, mode: str, poll_interval: float,
                overrides: dict[str, dict] | None = None) -> dict:
    """Defaults everywhere except the data dir, the channel (jsonl) and the watch mode
    (plus ``--set`` overrides, which are for what-if experiments only)."""
    data = {
        "data_dir": str(data_dir),
        "watch": {"mode": mode, "poll_interval": poll_interval},
        "delivery": {"channel": "jsonl", "path": "delivered.jsonl"},
        "log": {"level": "INFO"},
        "api": {"listen": ""},  # the API's own bench is bench/api.py
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return data


def write_config(path: Path, data_dir: Path, mode: str, poll_interval: float,
                 overrides: dict[str, dict] | None = None) -> dict:
    data = config_dict(data_dir, mode, poll_interval, overrides)
    path.write_text(tomli_w.dumps(data))
    return data


def effective_config(mode: str, poll_interval: float, overrides: dict[str, dict] | None):
    """The validated orchestrator Config the runs get (raises ConfigError on bad --set)."""
    from orchestrator.config.load import load_config

    return load_config(config_dict(Path("/bench-data"), mode, poll_interval, overrides),
                       Path("/"))


def parse_override(text: str) -> tuple[str, str, object]:
    """``section.key=value`` with a TOML value (bare words are strings)."""
    import tomllib

    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"--set {text!r}: use SECTION.KEY=VALUE, e.g. watch.step_ms=2")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value
