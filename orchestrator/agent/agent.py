"""The reference agent: the agent side of the session-folder contract, nothing more.

It echoes every triggering inbound message, copies its attachments back out,
and can be told to hang, crash or work slowly so the orchestrator's liveness,
retry and delivery paths can be exercised against a real process.

It runs unchanged as a container entrypoint (``/workspace`` with inbound.db
bind-mounted read-only) and as a local process (cwd = session folder), so it
is stdlib-only. The contract itself (waiting on inotify, claims, replies,
recovery) is ``sessionlib``, the library other agents can use too; this module
adds the CLI and the echo (docs/contract.md §2, invariants 1-4).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from orchestrator.agent import decide
from orchestrator.agent.files import copy_attachments
from orchestrator.agent.sessionlib import WAKE_MODES, Message, SessionFolder, remove_tree

EXIT_CRASH = 3


def log(message: str) -> None:
    """One plain line on stderr: the agent has no logging dependency."""
    print(f"agent[{os.getpid()}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Options:
    workspace: Path
    poll_interval: float = 0.1
    work_seconds: float = 0.0
    heartbeat_interval: float = 1.0
    exit_when_idle: float | None = None
    hang_on: str | None = None
    crash_on: str | None = None
    wake: str = "auto"
    safety_poll: float = 5.0


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.agent",
        description="Reference agent: echoes inbound messages of one session folder.",
    )
    parser.add_argument("--workspace", type=Path, default=Path("."),
                        help="session folder (default: current directory; /workspace in a container)")
    parser.add_argument("--poll-interval", type=_positive, default=0.1,
                        help="seconds between polls of inbound.db without inotify (default 0.1)")
    parser.add_argument("--wake", choices=WAKE_MODES, default="auto",
                        help="how new work is noticed: inotify on the session folder, 'poll', "
                             "or 'auto' (inotify where available; default)")
    parser.add_argument("--safety-poll", type=_positive, default=5.0, metavar="S",
                        help="with inotify, look at inbound.db every S s anyway, for shares "
                             "that raise no events (default 5)")
    parser.add_argument("--work-seconds", type=_non_negative, default=0.0,
                        help="simulated work per message (default 0)")
    parser.add_argument("--heartbeat-interval", type=_positive, default=1.0,
                        help="seconds between heartbeats while working (default 1.0)")
    parser.add_argument("--exit-when-idle", type=_non_negative, default=None, metavar="S",
                        help="exit 0 after S seconds without work (default: never)")
    parser.add_argument("--hang-on", metavar="TEXT", default=None,
                        help="go silent forever on a message whose text contains TEXT")
    parser.add_argument("--crash-on", metavar="TEXT", default=None,
                        help=f"exit {EXIT_CRASH} right after claiming a message whose text contains TEXT")
    ns = parser.parse_args(argv)
    return Options(
        workspace=ns.workspace,
        poll_interval=ns.poll_interval,
        work_seconds=ns.work_seconds,
        heartbeat_interval=ns.heartbeat_interval,
        exit_when_idle=ns.exit_when_idle,
        hang_on=ns.hang_on,
        crash_on=ns.crash_on,
        wake=ns.wake,
        safety_poll=ns.safety_poll,
    )


class Agent:
    """One agent on one session folder, built on ``sessionlib`` (the contract) with
    only the echo and the test behaviours here. ``stop`` is set by SIGTERM/SIGINT."""

    def __init__(self, options: Options, stop: threading.Event | None = None) -> None:
        self.options = options
        self.session = SessionFolder(options.workspace, wake=options.wake,
                                     poll_interval=options.poll_interval,
                                     safety_poll=options.safety_poll)
        self.workspace = self.session.workspace
        self.paths = self.session.paths
        self.stop = stop or threading.Event()
        self._last_error: str | None = None

    def heartbeat(self) -> None:
        self.session.heartbeat()

    def start(self) -> None:
        """Prepare the folder and drop a crashed predecessor's claims (sessionlib.recover)."""
        dropped = self.session.recover()
        if dropped:
            log(f"deleted {dropped} leftover processing ack(s)")

    # --- one message --------------------------------------------------------

    def _work(self) -> bool:
        """Simulate work, heartbeating meanwhile; False if asked to stop."""
        deadline = time.monotonic() + self.options.work_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.stop.wait(min(self.options.heartbeat_interval, remaining)):
                return False
            self.heartbeat()
        return True

    def handle(self, msg: Message) -> bool:
        """Process one message; False when the agent must stop (signal or --hang-on)."""
        session = self.session
        if not msg.trigger:
            session.ack(msg, "completed")
            self.heartbeat()
            log(f"{msg.id} seq={msg.seq} context only -> completed")
            return True
        session.claim(msg)
        try:
            message = decide.parse_content(msg.content)
        except decide.MalformedContent as exc:
            out_id = session.reply(msg, json.loads(decide.error_content(str(exc))),
                                   status="failed")
            log(f"{msg.id} seq={msg.seq} -> {out_id} failed: {exc}")
            return True
        if self.options.hang_on is not None and self.options.hang_on in message.text:
            log(f"{msg.id} seq={msg.seq} claimed; hanging (--hang-on)")
            self.stop.wait()  # no heartbeat since the claim: the host's claim rule applies
            return False
        self.heartbeat()
        if self.options.crash_on is not None and self.options.crash_on in message.text:
            log(f"{msg.id} seq={msg.seq} claimed; crashing (--crash-on)")
            os._exit(EXIT_CRASH)
        if not self._work():
            log(f"{msg.id} seq={msg.seq} interrupted; claim left for the host")
            return False
        out_id = decide.new_out_id()
        dest = session.outbox_dir(out_id)
        try:
            files, refused = copy_attachments(self.workspace, message.attachments, dest)
            content = json.loads(decide.reply_content(decide.reply_text(message.text),
                                                      files, refused))
            session.reply(msg, content, out_id=out_id)
        except BaseException:
            remove_tree(dest, ignore_errors=True)
            raise
        self.heartbeat()
        extra = f" files={len(files)}" + (f" refused={len(refused)}" if refused else "")
        log(f"{msg.id} seq={msg.seq} -> {out_id} completed{extra}")
        return True

    def _handle_safely(self, msg: Message) -> bool:
        """handle(), turning an unexpected error into a 'failed' ack with an error reply.

        If even that cannot be written, the error propagates and the agent exits
        non-zero: the host then treats the claim as a crash and retries with backoff.
        """
        try:
            return self.handle(msg)
        except Exception as exc:  # noqa: BLE001 - one bad message must not kill the loop
            log(f"{msg.id} error: {exc!r}")
            self.session.reply(msg, json.loads(decide.error_content(repr(exc))),
                               status="failed")
            return True

    # --- loop ---------------------------------------------------------------

    def _wait_logged(self, timeout: float | None) -> list[Message]:
        """wait_for_work(), but a DB that is locked or still being created is retried
        quietly: the same error is logged once, not on every look."""
        try:
            rows = self.session.wait_for_work(timeout)
        except sqlite3.Error as exc:
            if str(exc) != self._last_error:
                log(f"cannot read work yet: {exc}")
                self._last_error = str(exc)
            self.stop.wait(self.options.poll_interval)
            return []
        self._last_error = None
        return rows

    def run(self) -> int:
        self.start()
        how = "inotify" if self.session.watching else f"polling every {self.options.poll_interval:g}s"
        log(f"started on {self.workspace} (waking on {how})")
        last_work = time.monotonic()
        try:
            while not self.stop.is_set():
                timeout = None
                if self.options.exit_when_idle is not None:
                    timeout = max(0.0, last_work + self.options.exit_when_idle - time.monotonic())
                rows = self._wait_logged(timeout)
                for row in rows:
                    if self.stop.is_set() or not self._handle_safely(row):
                        break
                if rows:
                    last_work = time.monotonic()
                    continue
                idle_for = time.monotonic() - last_work
                if (self.options.exit_when_idle is not None
                        and idle_for >= self.options.exit_when_idle):
                    log(f"idle for {idle_for:.1f}s; exiting")
                    return 0
        finally:
            self.session.close()
        log("stopping on signal")
        return 0


def _install_signal_handlers(stop: threading.Event, wake: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only set a flag and wake the wait: the current write finishes,
    then the loop exits."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(_signum: int, _frame: object) -> None:
        stop.set()
        wake()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def main(argv: list[str] | None = None, early_signals: list[int] | None = None) -> int:
    """Entry point of ``python -m orchestrator.agent``; returns the exit code.
    ``early_signals``: SIGTERM/SIGINT received before this (see beat.hold_signals)."""
    options = parse_args(argv)
    stop = threading.Event()
    agent = Agent(options, stop)
    _install_signal_handlers(stop, agent.session.interrupt)
    if early_signals:
        stop.set()
    return agent.run()

