"""Several real ``orchestrator run`` processes as one cluster (issue 23): static
membership, own data dirs and ports, one shared API token. Used by
tests/e2e/test_shards_e2e.py and the bench.

``ShardSet(tmp_path, ["a", "b", "c"])``: ``start(name)`` / ``kill(name)`` (SIGKILL) /
``stop(name)`` (SIGTERM) / ``set_members(names)`` (rewrites every config with a new
member list; restart a shard to apply it). ``sessions(name)`` reads a shard's
registry and every session's inbound.db (read-only, as the supervisor would).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from tests.support.e2e import OrchestratorProcess, config_dict, processes_mentioning
from tests.support.helpers import wait_for

TOKEN = "shard-test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ShardSet:
    def __init__(self, tmp_path: Path, names: list[str], **sections: Any) -> None:
        self.root = tmp_path
        self.sections = sections
        self.token_file = tmp_path / "api-token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.ports: dict[str, int] = {}
        self.procs: dict[str, OrchestratorProcess] = {}
        self.members: list[str] = []
        self.set_members(names)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def set_members(self, names: list[str]) -> None:
        for name in names:
            self.ports.setdefault(name, free_port())
        self.members = list(names)
        for name in names:
            self._write(name)

    def _write(self, name: str) -> None:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        cfg = config_dict(folder, **{
            "api": {"listen": f"127.0.0.1:{self.ports[name]}",
                    "token_file": str(self.token_file)},
            "cluster": {"shard": name, "members": [f"{m}={self.url(m)}" for m in self.members],
                        "peer_timeout": 2.0, "probe_interval": 0.3, "retry_after": 1},
            "runtime": {"max_agents": 1},
            "log": {"level": "INFO"},
            **self.sections})
        (folder / "config.toml").write_text(tomli_w.dumps(cfg))

    def start(self, name: str) -> None:
        folder = self.root / name
        log = folder / f"run-{len(list(folder.glob('run-*.log')))}.log"
        self.procs[name] = OrchestratorProcess(folder / "config.toml", log)

    def wait_up(self, *names: str, timeout: float = 30) -> None:
        for name in names:
            proc = self.procs[name]
            wait_for(lambda p=proc: "orchestrator up" in p.text() or p.proc.poll() is not None,
                     timeout=timeout, message=f"shard {name} start-up")
            assert proc.proc.poll() is None, proc.text()
            wait_for(lambda n=name: self._ready(n), timeout=timeout, message=f"shard {name} ready")

    def _ready(self, name: str) -> bool:
        try:
            return httpx.get(self.url(name) + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, name: str) -> None:
        proc = self.procs[name].proc
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self, name: str) -> None:
        self.procs[name].end(signal.SIGTERM, timeout=60)

    def stop_all(self) -> None:
        """Every shard stopped, and the agents a SIGKILLed one left behind too."""
        for proc in self.procs.values():
            if proc.proc.poll() is None:
                try:
                    proc.end(signal.SIGTERM, timeout=60)
                except AssertionError:
                    pass
        for pid in processes_mentioning(f"--workspace {self.root}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def data_dir(self, name: str) -> Path:
        return self.root / name / "data"

    def sessions(self, name: str) -> dict[str, tuple[str, list[str]]]:
        """session id -> (platform id of its chat, ids of its messages_in)."""
        data = self.data_dir(name)
        out: dict[str, tuple[str, list[str]]] = {}
        with sqlite3.connect(f"file:{data / 'orchestrator.db'}?mode=ro", uri=True) as reg:
            rows = reg.execute("SELECT s.id, s.agent_group_id, m.platform_id FROM sessions s "
                               "JOIN messaging_groups m ON m.id = s.messaging_group_id"
                               ).fetchall()
        for sid, group, platform in rows:
            db = data / "sessions" / group / sid / "inbound.db"
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                ids = [r[0] for r in conn.execute("SELECT id FROM messages_in WHERE "
                                                  "kind = 'chat'")]
            out[sid] = (platform, ids)
        return out

    def event_ids(self, name: str) -> list[int]:
        db = self.data_dir(name) / "events.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")]
