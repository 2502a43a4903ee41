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

# the plain functions and ints, without ``signal``'s enums (see beat.py)
import _signal  # type: ignore[import-not-found]
import os
import sqlite3
import sys
import time
from collections import namedtuple

from orchestrator.agent import decide
from orchestrator.agent.sessionlib import WAKE_MODES, Message, SessionFolder, remove_tree

TYPE_CHECKING = False  # no typing, dataclasses or argparse on the cold start path (see parse_args)
if TYPE_CHECKING:
    import threading
    from typing import Callable, Sequence

EXIT_CRASH = 3


class StopFlag:
    """``threading.Event``'s ``set``/``is_set``/``wait``, with ``threading`` imported
    only by the first ``wait``: a plain echo never waits on it (the signal handler sets
    it and wakes the session's own select), and ``threading`` (with ``_weakrefset``)
    is ~2 ms of every cold start (issue 28). Safe from a signal handler: ``set``
    raises the flag before it touches the event, and ``wait`` makes the event before
    it reads the flag, so a signal between the two is never lost."""

    __slots__ = ("_flag", "_event")

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None

    def set(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        if self._event is None:
            import threading

            self._event = threading.Event()
        if self._flag:
            self._event.set()
        return self._event.wait(timeout)


def log(message: str) -> None:
    """One plain line on stderr: the agent has no logging dependency."""
    print(f"agent[{os.getpid()}] {message}", file=sys.stderr, flush=True)


class Options(namedtuple("Options", "workspace poll_interval work_seconds heartbeat_interval "
                                    "exit_when_idle hang_on crash_on wake safety_poll "
                                    "idle_heartbeat",
                         defaults=(0.1, 0.0, 1.0, None, None, None, "auto", 5.0, None))):
    """The parsed command line (see ``OPTIONS`` for each one's meaning)."""

    __slots__ = ()
    workspace: str
    poll_interval: float
    work_seconds: float
    heartbeat_interval: float
    exit_when_idle: float | None
    hang_on: str | None
    crash_on: str | None
    wake: str
    safety_poll: float
    idle_heartbeat: float | None


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        import argparse  # only on bad input: argparse is not on the cold start path

        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        import argparse

        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


# flag -> (Options field, type, choices, metavar, help): the one description of the
# command line, read by the quick parser and by argparse (--help, bad input)
OPTIONS: dict[str, tuple[str, Callable[[str], object], tuple[str, ...] | None, str | None, str]] = {
    "--workspace": ("workspace", str, None, None,
                    "session folder (default: current directory; /workspace in a container)"),
    "--poll-interval": ("poll_interval", _positive, None, None,
                        "seconds between polls of inbound.db without inotify (default 0.1)"),
    "--wake": ("wake", str, WAKE_MODES, None,
               "how new work is noticed: inotify on the session folder, 'poll', "
               "or 'auto' (inotify where available; default)"),
    "--safety-poll": ("safety_poll", _positive, None, "S",
                      "with inotify, look at inbound.db every S s anyway, for shares "
                      "that raise no events (default 5)"),
    "--work-seconds": ("work_seconds", _non_negative, None, None,
                       "simulated work per message (default 0)"),
    "--heartbeat-interval": ("heartbeat_interval", _positive, None, None,
                             "seconds between heartbeats while working (default 1.0)"),
    "--exit-when-idle": ("exit_when_idle", _non_negative, None, "S",
                         "exit 0 after S seconds without work (default: never)"),
    "--idle-heartbeat": ("idle_heartbeat", _positive, None, "S",
                         "also heartbeat every S s while waiting for work (a test of "
                         "the host's make-room rule; default: only while working)"),
    "--hang-on": ("hang_on", str, None, "TEXT",
                  "go silent forever on a message whose text contains TEXT"),
    "--crash-on": ("crash_on", str, None, "TEXT",
                   f"exit {EXIT_CRASH} right after claiming a message whose text contains TEXT"),
}


def quick_parse(argv: Sequence[str]) -> dict[str, object] | None:
    """The options of a plain, valid command line (``--flag value`` / ``--flag=value``,
    each flag spelled in full), or None for anything else: help, errors, abbreviations
    and the like go to argparse, which says what is wrong. Why: argparse (with gettext)
    is ~3 ms of every agent start, and the host always passes a plain command line."""
    values: dict[str, object] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        flag, eq, text = args[i].partition("=")
        if flag not in OPTIONS:
            return None
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None  # a missing value (or a negative number: argparse decides)
            text = args[i + 1]
            i += 1
        i += 1
        field, kind, choices, _metavar, _help = OPTIONS[flag]
        if choices is not None and text not in choices:
            return None
        try:
            values[field] = kind(text)
        except Exception:  # noqa: BLE001 - argparse reports it properly
            return None
    return values


def _argparse(argv: Sequence[str] | None) -> dict[str, object]:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.agent",
        description="Reference agent: echoes inbound messages of one session folder.",
    )
    for flag, (field, kind, choices, metavar, text) in OPTIONS.items():
        parser.add_argument(flag, dest=field, type=kind, choices=choices, metavar=metavar,
                            help=text, default=argparse.SUPPRESS)
    return vars(parser.parse_args(argv))


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line (``sys.argv[1:]`` when None); exits 2 with
    argparse's message on bad input, 0 after ``--help``."""
    args = sys.argv[1:] if argv is None else list(argv)
    values = quick_parse(args)
    if values is None:
        values = _argparse(args)
    values.setdefault("workspace", ".")
    return Options(**values)


class Agent:
    """One agent on one session folder, built on ``sessionlib`` (the contract) with
    only the echo and the test behaviours here. ``stop`` is set by SIGTERM/SIGINT."""

    def __init__(self, options: Options, stop: StopFlag | None = None) -> None:
        self.options = options
        self.session = SessionFolder(options.workspace, wake=options.wake,
                                     poll_interval=options.poll_interval,
                                     safety_poll=options.safety_poll)
        self.stop = stop or StopFlag()
        self._last_error: str | None = None
        self._watching = False  # start_watch() done (see _wait_logged)

    def heartbeat(self) -> None:
        self.session.heartbeat()

    def start(self) -> None:
        """Prepare the folder and drop a crashed predecessor's claims (sessionlib.recover)."""
        dropped = self.session.recover(watch=False)  # watched once the due work is done
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

    def _needs_claim(self, message: decide.Inbound) -> bool:
        """Whether answering takes long enough to say so with a claim first (contract
        §6.3). An instant echo does not: its reply and ``completed`` ack are one
        commit anyway, and a separate claim commit (4 fsyncs, ~3 ms) would only delay
        the reply — and, coming ~2 ms before it, hold the host's batch open until the
        reply's commit. Work, attachments to copy, --hang-on and --crash-on claim."""
        options = self.options
        return bool(options.work_seconds > 0 or message.attachments
                    or (options.hang_on is not None and options.hang_on in message.text)
                    or (options.crash_on is not None and options.crash_on in message.text))

    def handle(self, msg: Message) -> bool:
        """Process one message; False when the agent must stop (signal or --hang-on)."""
        session = self.session
        if not msg.trigger:
            session.ack(msg, "completed")
            self.heartbeat()
            log(f"{msg.id} seq={msg.seq} context only -> completed")
            return True
        try:
            message = decide.parse_content(msg.content)
        except decide.MalformedContent as exc:
            out_id = session.reply(msg, {"text": f"error: {exc}"}, status="failed")
            log(f"{msg.id} seq={msg.seq} -> {out_id} failed: {exc}")
            return True
        claimed = self._needs_claim(message)
        if claimed:
            session.claim(msg)
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
        dest = session.outbox_dir(out_id) if message.attachments else None
        try:
            files: list[str] = []
            refused: list[str] = []
            if dest is not None:  # files.py is imported for attachments only, not by an echo
                from orchestrator.agent.files import copy_attachments

                files, refused = copy_attachments(session.workspace, message.attachments,
                                                  dest)
            session.reply(msg, decide.reply_body(decide.reply_text(message.text), files,
                                                 refused), out_id=out_id)
        except BaseException:
            if dest is not None:
                remove_tree(dest, ignore_errors=True)
            raise
        if claimed:  # an instant echo touched .heartbeat just before its reply: a second
            self.heartbeat()  # touch would only hold the host's watch batch open longer
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
            self.session.reply(msg, {"text": f"error: {exc!r}"}, status="failed")
            return True

    # --- loop ---------------------------------------------------------------

    def _wait_logged(self, timeout: float | None, handled: bool = False) -> list[Message]:
        """wait_for_work(), but a DB that is locked or still being created is retried
        quietly: the same error is logged once, not on every look. The first time
        nothing is due, the watch is set up (and said) before the wait. ``handled``:
        every row of the last look was answered (``SessionFolder.wait_for_work``)."""
        try:
            if not self._watching:
                rows = self.session.pending()[0]
                if rows:  # a cold start: answer first, set up the watch after
                    return rows
                self.session.start_watch()
                self._watching = True
                how = ("inotify" if self.session.watching
                       else f"polling every {self.options.poll_interval:g}s")
                log(f"waking on {how}")
            rows = self.session.wait_for_work(timeout, handled=handled)
        except sqlite3.Error as exc:
            if str(exc) != self._last_error:
                log(f"cannot read work yet: {exc}")
                self._last_error = str(exc)
            self.stop.wait(self.options.poll_interval)
            return []
        self._last_error = None
        return rows

    def _beat_while_idle(self, every: float) -> None:
        """--idle-heartbeat: touch .heartbeat every ``every`` s until stopped, work or not."""
        while not self.stop.wait(every):
            self.heartbeat()

    def run(self) -> int:
        self.start()
        log(f"started on {self.session.root}")
        if self.options.idle_heartbeat is not None:
            import threading

            threading.Thread(target=self._beat_while_idle, args=(self.options.idle_heartbeat,),
                             daemon=True, name="idle-heartbeat").start()
        last_work = time.monotonic()
        handled = False
        try:
            while not self.stop.is_set():
                timeout = None
                if self.options.exit_when_idle is not None:
                    timeout = max(0.0, last_work + self.options.exit_when_idle - time.monotonic())
                rows = self._wait_logged(timeout, handled)
                handled = bool(rows)
                for row in rows:
                    if self.stop.is_set() or not self._handle_safely(row):
                        handled = False
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


def _install_signal_handlers(stop: StopFlag, wake: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only set a flag and wake the wait: the current write finishes,
    then the loop exits. Not from another thread (``main`` run by a test): only the
    main thread may set handlers, so there the caller's defaults stay."""

    def handler(_signum: int, _frame: object) -> None:
        stop.set()
        wake()

    for signum in (_signal.SIGTERM, _signal.SIGINT):
        try:
            _signal.signal(signum, handler)
        except ValueError:  # "signal only works in main thread": not ours to change
            return


def main(argv: list[str] | None = None, early_signals: list[int] | None = None) -> int:
    """Entry point of ``python -m orchestrator.agent``; returns the exit code.
    ``early_signals``: SIGTERM/SIGINT received before this (see beat.hold_signals)."""
    options = parse_args(argv)
    stop = StopFlag()
    agent = Agent(options, stop)
    _install_signal_handlers(stop, agent.session.interrupt)
    if early_signals:
        stop.set()
    return agent.run()

