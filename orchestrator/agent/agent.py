"""The reference agent: the agent side of the session-folder contract, nothing more.

It echoes every triggering inbound message, copies its attachments back out,
and can be told to hang, crash or work slowly so the orchestrator's liveness,
retry and delivery paths can be exercised against a real process.

It runs unchanged as a container entrypoint (``/workspace`` with inbound.db
bind-mounted read-only) and as a local process (cwd = session folder), so it
is stdlib-only and opens inbound.db read-only, freshly, for every poll
(docs/contract.md §2, invariants 1-4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator import layout
from orchestrator.agent import decide
from orchestrator.agent.files import copy_attachments
from orchestrator.store import schema

EXIT_CRASH = 3
_IN_CHUNK = 500  # bound parameters per IN (...) query, well under SQLite's limit


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
                        help="seconds between polls of inbound.db (default 0.1)")
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
    )


class Agent:
    """One agent on one session folder. ``stop`` is set by SIGTERM/SIGINT."""

    def __init__(self, options: Options, stop: threading.Event | None = None) -> None:
        self.options = options
        self.workspace = options.workspace.resolve()
        self.paths = layout.SessionPaths(self.workspace)
        self.stop = stop or threading.Event()
        self._last_error: str | None = None

    # --- files --------------------------------------------------------------

    def heartbeat(self) -> None:
        """Create ``.heartbeat`` if missing and bump its mtime, never through a symlink."""
        path = self.paths.heartbeat
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError:
            if not path.is_symlink():
                raise
            path.unlink()  # ours to own; a planted symlink is replaced, not followed
            fd = os.open(path, flags, 0o644)
        try:
            os.utime(fd)
        finally:
            os.close(fd)

    # --- start --------------------------------------------------------------

    def start(self) -> None:
        """Prepare outbound.db and outbox/, and drop a crashed predecessor's claims.

        A leftover ``processing`` ack belongs to an agent that died mid-message;
        deleting it makes the message pending-and-unacked again, so it is redone.
        """
        if not self.workspace.is_dir():
            raise SystemExit(f"workspace {self.workspace} is not a directory")
        outbox = self.paths.outbox
        if outbox.is_symlink():
            raise SystemExit(f"refusing to use {outbox}: it is a symlink")
        outbox.mkdir(exist_ok=True)
        schema.init_outbound(self.paths.outbound_db)
        with schema.opened(self.paths.outbound_db) as conn, schema.transaction(conn):
            dropped = conn.execute(
                "DELETE FROM processing_ack WHERE status = 'processing'"
            ).rowcount
            written = {row[0] for row in conn.execute("SELECT id FROM messages_out")}
        if dropped:
            log(f"deleted {dropped} leftover processing ack(s)")
        self._remove_orphan_outbox_dirs(written)
        self.heartbeat()

    def _remove_orphan_outbox_dirs(self, written: set[str]) -> None:
        """Remove ``outbox/out-*`` folders of replies a predecessor never wrote.

        Files are copied before their row is committed; a crash in between
        leaves a folder no row will ever name (ids are fresh each time).
        """
        for entry in os.scandir(self.paths.outbox):
            if (
                entry.name.startswith("out-")
                and entry.name not in written
                and entry.is_dir(follow_symlinks=False)
            ):
                shutil.rmtree(entry.path, ignore_errors=True)
                log(f"removed orphan outbox/{entry.name}")

    # --- reading ------------------------------------------------------------

    def fetch_work(self) -> list[dict[str, Any]]:
        """The due, unacked rows, from a fresh read-only connection to inbound.db."""
        inbound = self.paths.inbound_db
        if not inbound.exists():
            return []
        with schema.opened(inbound, readonly=True) as conn:
            rows = [
                dict(row)
                for row in conn.execute(
                    'SELECT id, seq, kind, status, process_after, "trigger", platform_id, '
                    "channel_type, thread_id, content FROM messages_in "
                    "WHERE status = 'pending' AND kind != 'system' ORDER BY seq"
                )
            ]
        if not rows:
            return []
        acked = self._acked_ids([row["id"] for row in rows])
        return list(decide.select_work(rows, acked, schema.utcnow()))

    def _acked_ids(self, ids: list[str]) -> set[str]:
        acked: set[str] = set()
        with schema.opened(self.paths.outbound_db) as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                acked.update(
                    row[0]
                    for row in conn.execute(
                        f"SELECT message_id FROM processing_ack WHERE message_id IN ({marks})", chunk
                    )
                )
        return acked

    def _max_inbound_seq(self) -> int | None:
        with schema.opened(self.paths.inbound_db, readonly=True) as conn:
            return conn.execute("SELECT MAX(seq) FROM messages_in").fetchone()[0]

    # --- writing ------------------------------------------------------------

    @staticmethod
    def _set_ack(conn: sqlite3.Connection, message_id: str, status: str) -> None:
        conn.execute(
            "INSERT INTO processing_ack (message_id, status, status_changed) VALUES (?, ?, ?) "
            "ON CONFLICT(message_id) DO UPDATE SET status = excluded.status, "
            "status_changed = excluded.status_changed",
            (message_id, status, schema.now_ts()),
        )

    def ack(self, message_id: str, status: str) -> None:
        with schema.opened(self.paths.outbound_db) as conn, schema.transaction(conn):
            self._set_ack(conn, message_id, status)

    def write_reply(self, row: dict[str, Any], out_id: str, content: str, status: str) -> int:
        """Insert the reply and close the ack in ONE transaction; return the reply's seq."""
        with schema.opened(self.paths.outbound_db) as conn, schema.transaction(conn):
            max_out = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()[0]
            seq = decide.next_odd_seq(self._max_inbound_seq(), max_out)
            conn.execute(
                "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id, "
                "channel_type, thread_id, content) VALUES (?, ?, ?, ?, 'chat', ?, ?, ?, ?)",
                (out_id, seq, row["id"], schema.now_ts(), row["platform_id"],
                 row["channel_type"], row["thread_id"], content),
            )
            self._set_ack(conn, row["id"], status)
        return seq

    # --- one message --------------------------------------------------------

    def _work(self) -> bool:
        """Simulate work, heartbeating meanwhile; False if asked to stop."""
        deadline = time.monotonic() + self.options.work_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.stop.wait(min(self.options.heartbeat_interval, remaining)):
                return False
            self.heartbeat()
        return True

    def handle(self, row: dict[str, Any]) -> bool:
        """Process one row; False when the agent must stop (signal or --hang-on)."""
        message_id = row["id"]
        if not row["trigger"]:
            self.ack(message_id, "completed")
            self.heartbeat()
            log(f"{message_id} seq={row['seq']} context only -> completed")
            return True
        self.ack(message_id, "processing")
        try:
            message = decide.parse_content(row["content"])
        except decide.MalformedContent as exc:
            out_id = decide.new_out_id()
            seq = self.write_reply(row, out_id, decide.error_content(str(exc)), "failed")
            log(f"{message_id} seq={row['seq']} -> {out_id} seq={seq} failed: {exc}")
            return True
        if self.options.hang_on is not None and self.options.hang_on in message.text:
            log(f"{message_id} seq={row['seq']} claimed; hanging (--hang-on)")
            self.stop.wait()  # no heartbeat since the claim: the host's claim rule applies
            return False
        self.heartbeat()
        if self.options.crash_on is not None and self.options.crash_on in message.text:
            log(f"{message_id} seq={row['seq']} claimed; crashing (--crash-on)")
            os._exit(EXIT_CRASH)
        if not self._work():
            log(f"{message_id} seq={row['seq']} interrupted; claim left for the host")
            return False
        out_id = decide.new_out_id()
        dest = self.paths.outbox_dir(out_id)
        try:
            files, refused = copy_attachments(self.workspace, message.attachments, dest)
            content = decide.reply_content(decide.reply_text(message.text), files, refused)
            seq = self.write_reply(row, out_id, content, "completed")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        self.heartbeat()
        extra = f" files={len(files)}" + (f" refused={len(refused)}" if refused else "")
        log(f"{message_id} seq={row['seq']} -> {out_id} seq={seq} completed{extra}")
        return True

    def _handle_safely(self, row: dict[str, Any]) -> bool:
        """handle(), turning an unexpected error into a 'failed' ack with an error reply.

        If even that cannot be written, the error propagates and the agent exits
        non-zero: the host then treats the claim as a crash and retries with backoff.
        """
        try:
            return self.handle(row)
        except Exception as exc:  # noqa: BLE001 - one bad message must not kill the loop
            log(f"{row['id']} error: {exc!r}")
            self.write_reply(row, decide.new_out_id(), decide.error_content(repr(exc)), "failed")
            return True

    # --- loop ---------------------------------------------------------------

    def _fetch_logged(self) -> list[dict[str, Any]]:
        """fetch_work(), but a DB that is locked or still being created is retried
        quietly: the same error is logged once, not on every poll."""
        try:
            rows = self.fetch_work()
        except sqlite3.Error as exc:
            if str(exc) != self._last_error:
                log(f"cannot read work yet: {exc}")
                self._last_error = str(exc)
            return []
        self._last_error = None
        return rows

    def run(self) -> int:
        self.start()
        log(f"started on {self.workspace}")
        last_work = time.monotonic()
        while not self.stop.is_set():
            rows = self._fetch_logged()
            for row in rows:
                if self.stop.is_set() or not self._handle_safely(row):
                    break
            if rows:
                last_work = time.monotonic()
                continue
            idle_for = time.monotonic() - last_work
            if self.options.exit_when_idle is not None and idle_for >= self.options.exit_when_idle:
                log(f"idle for {idle_for:.1f}s; exiting")
                return 0
            self.stop.wait(self.options.poll_interval)
        log("stopping on signal")
        return 0


def _install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT only set a flag: the current write finishes, then the loop exits."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m orchestrator.agent``; returns the exit code."""
    options = parse_args(argv)
    stop = threading.Event()
    _install_signal_handlers(stop)
    return Agent(options, stop).run()
