"""Every fake the tests share: stand-ins for a project protocol (a Channel, a Runtime,
the watchfiles binding, stdin) that record what they are given and fail on cue.

Everything else in the tests is real (processes, SQLite, inotify); a fake is used only
where a test needs an outcome on cue or a call it cannot see otherwise. A fake that is
only a few lines inside one test (a fixed ``uuid4``, a stop event that counts) stays in
that test.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.channels import ChannelBase, DeliveryError, Failure, Reply
from orchestrator.runtime.base import AgentHandle, Runtime, RuntimeUnavailable, SessionRef

# --- channels ------------------------------------------------------------------------------


@dataclass
class FakeChannel(ChannelBase):
    """A Channel that fails on cue: ``fail`` maps a reply id to how many attempts fail
    (``None`` = always), ``boom`` makes it raise a non-DeliveryError (a channel bug)."""

    fail: dict[str, int | None] = field(default_factory=dict)
    boom: bool = False
    name: str = "fake"
    calls: list[str] = field(default_factory=list)
    taken: list[Reply] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def already_delivered(self, message_id: str) -> bool:
        if self.boom and message_id in self.fail and self.fail[message_id] is None:
            self.calls.append(message_id)  # an attempt, failed by a lookup bug
            raise KeyError("lookup bug")
        return any(r.message_id == message_id for r in self.taken)

    async def deliver(self, reply: Reply) -> str | None:
        self.calls.append(reply.message_id)
        if reply.message_id in self.fail:
            left = self.fail[reply.message_id]
            if left is None or left > 0:
                if left is not None:
                    self.fail[reply.message_id] = left - 1
                if self.boom:
                    raise RuntimeError("channel bug")
                raise DeliveryError("platform said no")
        self.taken.append(reply)
        return f"pm-{reply.message_id}"

    async def report_failure(self, failure: Failure) -> None:
        self.failures.append(failure)

    def close(self) -> None:
        pass


@dataclass
class RecordingChannel(ChannelBase):
    """A Channel that records every reply and failure record with its arrival time."""

    name: str = "recording"
    taken: dict[str, float] = field(default_factory=dict)  # reply id -> monotonic time
    replies: list[Reply] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def already_delivered(self, message_id: str) -> bool:
        return message_id in self.taken  # like jsonl: it remembers what it took

    async def deliver(self, reply: Reply) -> str | None:
        self.taken.setdefault(reply.message_id, time.monotonic())
        self.replies.append(reply)
        return None

    async def report_failure(self, failure: Failure) -> None:
        self.failures.append(failure)

    def close(self) -> None:
        pass

    def count(self, mid: str) -> int:
        return sum(1 for r in self.replies if r.message_id == mid)


# --- runtimes ------------------------------------------------------------------------------


@dataclass
class FakeRuntime:
    """A Runtime that starts nothing: ``fail`` is raised by the next start/stop/kill."""

    name: str = "fake"
    fail: Exception | None = None
    alive: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    listed: bool = True

    def _call(self, what: str, session_id: str) -> None:
        self.calls.append((what, session_id))
        if self.fail is not None:
            raise self.fail

    async def recover(self) -> list[AgentHandle]:
        return []

    async def start(self, session: SessionRef) -> AgentHandle:
        self._call("start", session.session_id)
        self.alive.add(session.session_id)
        return AgentHandle(session.agent_group, session.session_id, f"fake-{session.session_id}")

    async def stop(self, session_id: str, grace: float) -> None:
        self._call("stop", session_id)
        self.alive.discard(session_id)

    async def kill(self, session_id: str) -> None:
        self._call("kill", session_id)
        self.alive.discard(session_id)

    async def pause(self, session_id: str) -> None:
        self._call("pause", session_id)

    async def resume(self, session_id: str) -> None:
        self._call("resume", session_id)

    def is_paused(self, session_id: str) -> bool:
        return False

    async def ping(self) -> None:
        pass

    async def reconcile(self) -> None:
        pass

    def is_running(self, session_id: str) -> bool:
        return session_id in self.alive

    def running(self) -> list[AgentHandle]:
        return [AgentHandle("g", sid, f"fake-{sid}") for sid in sorted(self.alive)]

    async def close(self) -> None:
        pass


class LiveRuntime:
    """A runtime that only answers "who is running" (the gate asks nothing else)."""

    def __init__(self, *session_ids: str) -> None:
        self.ids = set(session_ids)
        self.listed = True

    def is_running(self, session_id: str) -> bool:
        return session_id in self.ids

    def running(self) -> list[AgentHandle]:
        return [AgentHandle("g", sid, sid) for sid in sorted(self.ids)]


class OutageRuntime:
    """A real LocalRuntime behind a switch: while ``down``, starts are refused the way
    Docker refuses them with its daemon gone; ``back()`` is the daemon returning."""

    def __init__(self, inner: Runtime, on_available: Callable[[], None]) -> None:
        self.inner, self.on_available, self.down = inner, on_available, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def start(self, session: SessionRef) -> AgentHandle:
        if self.down:
            raise RuntimeUnavailable("test outage: runtime down")
        return await self.inner.start(session)

    def back(self) -> None:
        self.down = False
        self.on_available()


class StuckStopRuntime:
    """A real LocalRuntime whose stop never returns for the sessions in ``stuck``: a
    kubelet or a daemon that never confirms an agent's end (the agent keeps running;
    ``reap_agents`` ends it after the test)."""

    def __init__(self, inner: Runtime) -> None:
        self.inner, self.stuck = inner, set[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def stop(self, session_id: str, grace: float) -> None:
        if session_id in self.stuck:
            await asyncio.Event().wait()
        await self.inner.stop(session_id, grace)


# --- the rest ------------------------------------------------------------------------------


class FakeNotify:
    """Stands in for ``FolderWatch`` (an ``inotify_thread.Notifier``): scripted ``watch``
    results (a set of changes, a result string, or an exception to raise), no inotify
    instance of its own. Each instance takes the next script; once a script is used
    up it waits for the stop event, as the real one does."""

    scripts: list[list] = []
    made: list[Path] = []
    fd = None

    def __init__(self, root: Path) -> None:
        FakeNotify.made.append(root)
        self.script = FakeNotify.scripts.pop(0) if FakeNotify.scripts else []

    def watched_inodes(self) -> set[int] | None:
        return None

    def take_lost(self) -> str | None:
        return None

    def counts(self) -> tuple[int, int]:
        return (0, 0)

    def shortfall(self) -> None:
        return None

    def watch(self, *, debounce_ms: int, step_ms: int, timeout_ms: int, stop_event) -> object:
        deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
        while not self.script:
            if stop_event.is_set():
                return "stop"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            time.sleep(0.005)
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        if isinstance(item, float):  # a stall: this process did not run for that long
            time.sleep(item)
            stop_event.is_set()
            return self.watch(debounce_ms=debounce_ms, step_ms=step_ms, timeout_ms=timeout_ms,
                              stop_event=stop_event)
        return item

    def __enter__(self) -> "FakeNotify":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeStdin:
    """``sys.stdin`` with only the binary ``buffer`` the CLI reads from."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)
