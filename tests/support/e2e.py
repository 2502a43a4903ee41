"""Shared fixtures and helpers for the supervisor-level tests.

Everything is real: the reference agent runs as a subprocess, the session
folders are watched with inotify, every DB is a real SQLite file. The pieces:

- ``make_config(tmp_path, ...)``: a Config with short lifecycle windows and the
  reference agent as the local runtime command;
- ``Client``: the "other process" side (what ``orchestrator send`` does): its
  own registry connection, ``Sessions`` to resolve sessions and write messages;
- ``supervised(cfg)``: runs a ``Supervisor`` in the test's event loop (the test
  is an async function, run by the anyio plugin) and shuts it down cleanly;
- ``OrchestratorProcess``: ``python -m orchestrator run`` as a real process (for
  SIGKILL and restart tests);
- ``processes_mentioning`` / ``agent_pids``: live processes naming a folder (the
  ``reap_agents`` fixture in conftest.py kills what a test left running).

Waiting is ``helpers.until`` (async) or ``helpers.wait_for`` (sync).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, TypeVar

from orchestrator.channels.jsonl import read_lines
from orchestrator.cli.compose import Service, assembled
from orchestrator.config.load import load_config
from orchestrator.config.model import Config
from orchestrator.contract.layout import SessionPaths, registry_path
from orchestrator.engine.supervisor import Supervisor
from orchestrator.host.registry import Registry, SessionRow
from orchestrator.host.sessions import MessagingGroup, Sessions
from tests.support.helpers import wait_for

T = TypeVar("T")

AGENT = ["{python}", "-m", "orchestrator.agent", "--poll-interval", "0.02",
         "--heartbeat-interval", "0.1"]


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(tmp_path: Path, *, agent_args: list[str] | None = None,
                command: list[str] | None = None, **sections: Any) -> dict:
    """The TOML-shaped dict for a test config (also written to disk for subprocess runs)."""
    base = {
        "data_dir": str(tmp_path / "data"),
        "runtime": {"command": list(command or AGENT) + list(agent_args or []),
                    "on_shutdown": "stop", "stop_grace": 2.0},
        "lifecycle": {"idle_after": 0.5, "stop_idle_after": 0.5, "claim_stuck": 1.0,
                      "backoff_base": 0.2, "max_tries": 3},
        "watch": {"sweep_interval": 5.0},
        "delivery": {"retry_base": 0.1},
        "api": {"listen": "127.0.0.1:0"},  # an ephemeral port: tests run side by side
    }
    return _merge(base, sections)


def make_config(tmp_path: Path, **kwargs: Any) -> Config:
    return load_config(config_dict(tmp_path, **kwargs), tmp_path)


# --- the sending side ---------------------------------------------------------------


class Client:
    """What another process (the CLI, a chat adapter) does: resolve and write."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = Registry(registry_path(cfg.data_dir))
        self.sessions = Sessions(cfg.data_dir, self.registry, cfg.sessions.max_attachment_bytes)

    def session(self, group: str, *, channel: str = "cli", platform: str = "local",
                thread: str | None = None, mode: str = "shared") -> SessionRow:
        return self.sessions.resolve(group, MessagingGroup(channel, platform), thread, mode)

    def send(self, group: str, text: str, *, files: dict[str, bytes] | None = None,
             **where: Any) -> tuple[SessionRow, str]:
        """As ``orchestrator send``: the message keeps its own chat, whatever the mode."""
        row = self.session(group, **where)
        content: dict[str, Any] = {"text": text}
        if files:
            content["attachments"] = [{"name": n, "data": base64.b64encode(d).decode()}
                                      for n, d in files.items()]
        chat = (where.get("channel", "cli"), where.get("platform", "local"), where.get("thread"))
        mid, _ = self.sessions.write_message(row, content, routing=chat)
        return row, mid

    def paths(self, row: SessionRow) -> SessionPaths:
        return self.sessions.paths(row)

    def statuses(self, session_id: str) -> list[tuple[str, str]]:
        """The registry's status log of a session: [(new status, reason), ...]."""
        return [(c["new"], c["reason"]) for c in self.registry.status_changes(session_id)]

    def milestones(self, session_id: str) -> list[dict]:
        """The status log without idle/running flicker (see ``milestones``)."""
        return milestones(self.registry.status_changes(session_id))

    def container_status(self, session_id: str) -> str:
        row = self.registry.session(session_id)
        assert row is not None
        return row.container_status

    def close(self) -> None:
        self.registry.close()


def milestones(changes: list[dict]) -> list[dict]:
    """Status changes that are events — starts, adoptions, stops — without the
    idle/running ("active") flicker in between. On two loaded cores an agent's
    start-up can outlast ``idle_after``, so a brief 'idle' before its first
    heartbeat is the status following evidence, not what these tests are about;
    tests that care about 'idle' look at it explicitly."""
    return [c for c in changes
            if c["new"] != "idle" and (c["new"], c["reason"]) != ("running", "active")]


def pairs(changes: list[dict]) -> list[tuple[str, str]]:
    return [(c["new"], c["reason"]) for c in changes]


def replies(cfg: Config) -> list[dict]:
    """Every reply line of the jsonl channel's file (not its failure records)."""
    return [r for r in read_lines(cfg.delivery.path) if r.get("type") != "failure"]


def failures(cfg: Config) -> list[dict]:
    """The failure records (``"type": "failure"``) of the jsonl channel's file."""
    return [r for r in read_lines(cfg.delivery.path) if r.get("type") == "failure"]


def reply_counts(cfg: Config) -> Counter:
    return Counter(r["message_id"] for r in replies(cfg))


def replies_to(cfg: Config, message_id: str) -> list[dict]:
    return [r for r in replies(cfg) if r["in_reply_to"] == message_id]


# --- waiting and running -------------------------------------------------------------


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    """Run a test body coroutine in a fresh event loop with an overall deadline."""
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def serving(cfg: Config, ready_timeout: float = 30.0,
                  **kwargs: Any) -> AsyncIterator[Service]:
    """The whole orchestrator (``compose.assembled``) serving in this event loop; stopped
    (and checked) on exit."""
    async with assembled(cfg, **kwargs) as service:
        async with _serving(service.supervisor, ready_timeout):
            yield service


@contextlib.asynccontextmanager
async def supervised(cfg: Config, ready_timeout: float = 30.0,
                     **kwargs: Any) -> AsyncIterator[Supervisor]:
    """As ``serving``, for tests that need only the engine."""
    async with serving(cfg, ready_timeout, **kwargs) as service:
        yield service.supervisor


@contextlib.asynccontextmanager
async def _serving(sup: Supervisor, ready_timeout: float) -> AsyncIterator[None]:
    task = asyncio.create_task(sup.serve(), name="supervisor")
    ready = asyncio.create_task(sup.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=ready_timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises what serve() raised
        raise AssertionError("supervisor ended before it was ready")
    if ready not in done:
        ready.cancel()
        sup.stop_event.set()
        await asyncio.wait_for(task, 30)
        raise AssertionError(f"supervisor not ready within {ready_timeout:g}s")
    try:
        yield
        assert not task.done(), "the supervisor ended on its own"
    finally:
        sup.stop_event.set()
        await asyncio.wait_for(task, 30)


# --- processes ------------------------------------------------------------------------


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) pids whose command line contains ``text``."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        if text in cmd and stat[stat.rfind(")") + 2:].split()[0] != "Z":
            found.append(int(entry))
    return found


def agent_pids(folder: Path) -> list[int]:
    """Agent processes running on one session folder (``--workspace <folder>``)."""
    return processes_mentioning(f"--workspace {folder}")


class OrchestratorProcess:
    """``python -m orchestrator run --config FILE`` as a real process (SIGKILL is real)."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "run", "--config", str(config_file)],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                cwd=config_file.parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self) -> None:
        wait_for(lambda: "orchestrator up" in self.text() or self.proc.poll() is not None,
                 timeout=30, message="orchestrator start-up")
        assert self.proc.poll() is None, self.text()

    def end(self, sig: int, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"orchestrator did not end on {sig}:\n{self.text()}") from None
