"""The agent half of the session-folder contract, as a library (stdlib only).

Mount a session folder into your own agent and let this module speak the
contract (docs/contract.md) so your code only
answers messages::

    from orchestrator.agent.sessionlib import SessionFolder

    with SessionFolder("/workspace") as session:   # recovers after a crash
        while True:
            for msg in session.wait_for_work():    # inotify; slow poll behind it
                session.claim(msg)                 # processing ack
                text = msg.body().get("text", "")
                session.reply(msg, f"you said {text}",
                              files={"note.txt": b"hello"})  # outbox/ + row + ack

What each call does, and why:

- ``recover()`` (run by ``with``): creates outbound.db and outbox/, deletes this
  session's leftover ``processing`` acks (their agent died mid-message, so the
  messages become pending again and are redone) and ``outbox/out-*`` folders no
  reply row names (files are written before their row is committed).
  ``recover(watch=False)`` leaves the inotify watch to the first ``wait_for_work``
  that finds nothing due: a cold-started agent answers first (ctypes, which the
  watch needs, is ~3 ms of a start) and misses nothing, since that wait reads
  inbound.db again once the watch is there.
- ``wait_for_work()``: the due, triggered, unacked messages in seq order; blocks
  until there are some. It sleeps on inotify on the session folder (the end of each
  host commit of inbound.db wakes it within a millisecond, through a read-only bind
  mount too; a commit still in progress does not: ``decide.commit_ended``),
  re-reads every ``safety_poll`` s anyway (network and Docker Desktop shares
  raise no event), wakes at the next ``process_after``, and polls every
  ``poll_interval`` where inotify is missing.
- ``claim`` / ``ack``: ``processing_ack`` rows. A claimed message stays yours:
  the host gives it back (tries+1, backoff) only if your process dies.
- ``reply``: files into ``outbox/<out_id>/`` first, then the ``messages_out`` row
  (next odd seq above both tables) and the ack in ONE transaction, so the host
  never sees a reply without its ack or a completed message without its reply.
- ``heartbeat()``: touch ``.heartbeat`` while working; the host's stuck rules kill
  an agent whose claim is older than ``claim_stuck`` with no heartbeat since.

inbound.db is opened read-only and closed after every read, outbound.db is
written with ``journal_mode=DELETE``, never WAL (a WAL's shared memory does not
refresh across a bind mount). An agent that knows nothing of this module (e.g.
NanoClaw's, polling once a second) keeps working: the host needs nothing more.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import namedtuple

from orchestrator.agent import beat, jsontext
from orchestrator.agent.decide import (
    commit_ended,
    new_out_id,
    next_due,
    next_odd_seq,
    select_work,
)
from orchestrator.contract import schema

TYPE_CHECKING = False  # typing and dataclasses stay off the agent's cold start (~8 ms)
if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path
    from typing import Any, Mapping

    from orchestrator.contract import inotify, layout

# The contract's file names (``contract.layout``'s, checked equal by tests/agent): not
# imported from there, because layout imports ``re`` and ``enum`` (~4 ms of a start).
INBOUND_DB = "inbound.db"
OUTBOUND_DB = "outbound.db"
OUTBOX = "outbox"
HEARTBEAT = beat.HEARTBEAT
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@+-")

_IN_CHUNK = 500  # bound parameters per IN (...) query, well under SQLite's limit
_WAKE_NAMES = frozenset({INBOUND_DB, INBOUND_DB + "-journal"})
WAKE_MODES = ("auto", "inotify", "poll")


class Message(namedtuple("Message", "id seq kind trigger process_after platform_id "
                                    "channel_type thread_id content")):
    """One inbound row; ``content`` is the raw JSON text the host wrote."""

    __slots__ = ()
    id: str
    seq: int | None
    kind: str
    trigger: int
    process_after: str | None
    platform_id: str | None
    channel_type: str | None
    thread_id: str | None
    content: Any

    def body(self) -> dict:
        """``content`` parsed: a JSON object as a dict, a JSON string as {"text": ...};
        ValueError for anything else (answer it with ``reply(..., status="failed")``)."""
        data = jsontext.loads(self.content)
        if isinstance(data, str):
            return {"text": data}
        if not isinstance(data, dict):
            raise ValueError(f"content is a JSON {type(data).__name__}, not an object")
        return data


class SessionFolder:
    """The agent's side of one session folder. Not thread-safe except ``interrupt``.

    ``wake``: ``auto`` (inotify where available, else poll), ``inotify`` (fail if
    missing), ``poll``. ``poll_interval`` is the poll period without inotify;
    ``safety_poll`` the re-read period with it.
    """

    def __init__(self, workspace: str | os.PathLike[str], *, wake: str = "auto",
                 poll_interval: float = 0.1, safety_poll: float = 5.0) -> None:
        if wake not in WAKE_MODES:
            raise ValueError(f"wake must be one of {', '.join(WAKE_MODES)}, got {wake!r}")
        # the resolved workspace as a string: the agent's own path work is os.path,
        # because pathlib (with urllib.parse and ipaddress) is ~4 ms of a cold start
        self.root = os.path.realpath(os.fspath(workspace))
        self._outbound = os.path.join(self.root, OUTBOUND_DB)
        self._inbound = os.path.join(self.root, INBOUND_DB)
        self._outbox = os.path.join(self.root, OUTBOX)
        self.wake = wake
        self.poll_interval = poll_interval
        self.safety_poll = safety_poll
        self._watch: inotify.FolderWatch | None = None
        self._watch_tried = False
        self._upcoming: datetime | None = None  # next process_after when work was last returned
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def workspace(self) -> Path:
        """The resolved session folder (a Path, made on first use)."""
        from pathlib import Path

        return Path(self.root)

    @property
    def paths(self) -> layout.SessionPaths:
        """The contract's file names in the folder, as Paths."""
        from orchestrator.contract import layout

        return layout.SessionPaths(self.workspace)

    # --- set-up and recovery ------------------------------------------------------

    def __enter__(self) -> "SessionFolder":
        self.recover()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def recover(self, watch: bool = True) -> int:
        """Prepare outbound.db and outbox/, drop a crashed predecessor's claims and
        orphan outbox folders, heartbeat; start watching unless ``watch`` is False
        (then the first ``wait_for_work`` that finds nothing to do starts it, see
        ``start_watch``). Returns the claims dropped."""
        if not os.path.isdir(self.root):
            raise SystemExit(f"workspace {self.root} is not a directory")
        outbox = self._outbox
        if os.path.islink(outbox):
            raise SystemExit(f"refusing to use {outbox}: it is a symlink")
        self.heartbeat()  # alive as early as possible: the host's idle clock runs from start
        _mkdir(outbox)
        # reply folders left in outbox/ (the host removes each once delivered): only
        # these ids are looked up, not every reply the session ever wrote
        folders = [entry for entry in os.scandir(outbox)
                   if entry.name.startswith("out-") and entry.is_dir(follow_symlinks=False)]
        # schema.init_outbound's work and the clean-up in one connection and transaction
        with schema.opened(self._outbound) as conn, schema.transaction(conn):
            schema.ensure_schema(conn, schema.OUTBOUND_TABLES, schema.OUTBOUND_EXTRA)
            dropped = conn.execute(
                "DELETE FROM processing_ack WHERE status = 'processing'").rowcount
            written = _present(conn, "SELECT id FROM messages_out WHERE id IN ({})",
                               [entry.name for entry in folders])
        for entry in folders:
            if entry.name not in written:
                remove_tree(entry.path, ignore_errors=True)
        if watch:
            self.start_watch()
        return dropped

    def start_watch(self) -> None:
        """Set up the inotify watch (``wake`` auto/inotify; once). A cold-started agent
        answers what is already due first and watches after: inotify loads ctypes
        (~3 ms of a start), and the next ``wait_for_work`` reads inbound.db again
        before it sleeps, so a commit made before the watch existed is not missed."""
        if self.wake == "poll" or self._watch_tried:
            return
        self._watch_tried = True
        from orchestrator.contract import inotify  # with select and struct: after the reply

        self._watch = inotify.open_watch(self.root, _WAKE_NAMES)
        if self._watch is None and self.wake == "inotify":
            raise OSError(f"inotify is not available on {self.root}")

    @property
    def watching(self) -> bool:
        """True when inotify wakes this agent (False: it polls)."""
        return self._watch is not None

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # --- liveness ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Create ``.heartbeat`` if missing and bump its mtime, never through a symlink."""
        beat.touch(os.path.join(self.root, HEARTBEAT))

    # --- reading -------------------------------------------------------------------

    def pending(self) -> tuple[list[Message], datetime | None]:
        """(due, triggered-or-not, unacked messages in seq order; when the next
        not-yet-due one becomes due). One fresh read-only look at inbound.db."""
        inbound = self._inbound
        if not os.path.exists(inbound):
            return [], None
        with schema.opened(inbound, readonly=True) as conn:
            rows = [dict(row) for row in conn.execute(
                'SELECT id, seq, kind, status, process_after, "trigger", platform_id, '
                "channel_type, thread_id, content FROM messages_in "
                "WHERE status = 'pending' AND kind != 'system' ORDER BY seq")]
        if not rows:
            return [], None
        acked = self._acked_ids([row["id"] for row in rows])
        now = schema.utcnow()
        due = [Message(r["id"], r["seq"], r["kind"], r["trigger"], r["process_after"],
                       r["platform_id"], r["channel_type"], r["thread_id"], r["content"])
               for r in select_work(rows, acked, now)]
        return due, next_due(rows, acked, now)

    def _acked_ids(self, ids: list[str]) -> set[str]:
        with schema.opened(self._outbound) as conn:
            return _present(conn, "SELECT message_id FROM processing_ack "
                                  "WHERE message_id IN ({})", ids)

    # --- waiting -------------------------------------------------------------------

    def wait_for_work(self, timeout: float | None = None, *,
                      handled: bool = False) -> list[Message]:
        """The messages to handle now; blocks until there are some, ``timeout`` s
        pass, or ``interrupt()`` is called (then an empty list).

        ``handled``: every message the previous call returned has been answered or
        acked since. With the inotify watch the first look then waits for a change of
        inbound.db instead of reading at once: a host commit since that call left its
        event queued, so nothing is missed, and the read no longer runs beside the
        host's delivery of the answers just written (it follows that delivery's own
        commit). The next ``process_after`` of that call still bounds the wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        look = not (handled and self._watch is not None)
        upcoming = self._upcoming
        while True:
            if look:
                due, upcoming = self.pending()
                if due:
                    self._upcoming = upcoming
                    return due
            look = True
            if self.wake != "poll" and not self._watch_tried:
                self.start_watch()  # recover(watch=False): watch now, then look again
                continue
            period = self.safety_poll if self._watch is not None else self.poll_interval
            if upcoming is not None:
                period = min(period, max(0.0, (upcoming - schema.utcnow()).total_seconds()))
            if deadline is not None:
                period = min(period, deadline - time.monotonic())
                if period <= 0:
                    return []
            if self.wait_for_change(period) is None:
                return []

    def wait_for_change(self, timeout: float) -> bool | None:
        """Sleep until inbound.db changes (True), ``timeout`` s pass (False) or
        ``interrupt()`` (None). Without inotify it just sleeps (a poll). Events about
        other files of the folder (the agent's own writes) are read and slept through."""
        import select  # a C module of its own: not on the way to a cold start's reply

        fds = [self._wake_r] + ([self._watch.fd] if self._watch is not None else [])
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                ready, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
                return False
            if self._wake_r in ready:
                self._drain_wake()
                return None
            if not ready:
                return False
            if self._watch is not None and self._drain_watch():
                return True

    def _drain_watch(self) -> bool:
        """Read every queued event without blocking; True if one ends a write of
        inbound.db (``decide.commit_ended``; a commit's first events are slept through:
        the look that follows its end finds the rows, not the host's lock)."""
        from orchestrator.contract.inotify import parse_events

        assert self._watch is not None
        hit = False
        while True:
            try:
                buf = os.read(self._watch.fd, 64 * 1024)
            except BlockingIOError:
                return hit
            except InterruptedError:
                continue
            if not buf:
                return hit
            hit = hit or any(commit_ended(mask, name) for mask, name in parse_events(buf))

    def interrupt(self) -> None:
        """Wake a blocked ``wait_for_work`` (safe from a signal handler or a thread)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- writing -------------------------------------------------------------------

    @staticmethod
    def _set_ack(conn: sqlite3.Connection, message_id: str, status: str) -> None:
        conn.execute(
            "INSERT INTO processing_ack (message_id, status, status_changed) VALUES (?, ?, ?) "
            "ON CONFLICT(message_id) DO UPDATE SET status = excluded.status, "
            "status_changed = excluded.status_changed",
            (message_id, status, schema.now_ts()))

    def ack(self, msg: Message | str, status: str) -> None:
        """``processing``, ``completed`` or ``failed`` for one inbound message."""
        message_id = msg if isinstance(msg, str) else msg.id
        with schema.opened(self._outbound) as conn, schema.transaction(conn):
            self._set_ack(conn, message_id, status)

    def claim(self, msg: Message | str) -> None:
        """Take a message: the host counts it as work in progress from now on."""
        self.ack(msg, "processing")

    def outbox_dir(self, out_id: str) -> Path:
        """``outbox/<out_id>/``: where a reply's files go before its row is written."""
        return self.paths.outbox_dir(safe_id(out_id))

    def reply(self, msg: Message, content: str | Mapping[str, Any], *,
              files: Mapping[str, bytes] | None = None, status: str = "completed",
              out_id: str | None = None) -> str:
        """Answer ``msg`` and settle its ack (``status``) in one transaction; return the
        reply's id. ``content``: text, or a JSON object. ``files`` (name → bytes) are
        written to ``outbox/<id>/`` first and listed in ``content["files"]``; files
        already placed there by the caller (pass ``out_id``) are listed by the caller."""
        out_id = out_id or new_out_id()
        body: dict[str, Any] = {"text": content} if isinstance(content, str) else dict(content)
        dest = os.path.join(self._outbox, safe_id(out_id))
        try:
            if files:
                _mkdir(dest)
                for name, data in files.items():
                    if not name or "/" in name or "\x00" in name or name.startswith("."):
                        raise ValueError(f"unsafe outbox file name {name!r}")
                    fd = os.open(os.path.join(dest, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                body["files"] = list(body.get("files") or []) + list(files)
            self._write_reply(msg, out_id, jsontext.dumps(body), status)
        except BaseException:
            remove_tree(dest, ignore_errors=True)
            raise
        return out_id

    def _write_reply(self, msg: Message, out_id: str, content: str, status: str) -> int:
        with schema.opened(self._outbound) as conn, schema.transaction(conn):
            max_out = conn.execute("SELECT MAX(seq) FROM messages_out").fetchone()[0]
            with schema.opened(self._inbound, readonly=True) as inbound:
                max_in = inbound.execute("SELECT MAX(seq) FROM messages_in").fetchone()[0]
            seq = next_odd_seq(max_in, max_out)
            conn.execute(
                "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id, "
                "channel_type, thread_id, content) VALUES (?, ?, ?, ?, 'chat', ?, ?, ?, ?)",
                (out_id, seq, msg.id, schema.now_ts(), msg.platform_id, msg.channel_type,
                 msg.thread_id, content))
            self._set_ack(conn, msg.id, status)
        return seq


def _present(conn: sqlite3.Connection, sql: str, ids: list[str]) -> set[str]:
    """The first column of ``sql`` (its ``{}`` an IN list) over ``ids``, ``_IN_CHUNK``
    parameters a query; no query at all for no ids."""
    found: set[str] = set()
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start:start + _IN_CHUNK]
        found.update(row[0] for row in conn.execute(sql.format(",".join("?" * len(chunk))),
                                                    chunk))
    return found


def safe_id(value: str) -> str:
    """``value`` if ``layout.validate_id`` accepts it as a message id: the agent's own
    ``out-<hex>`` ids are checked without ``re``; anything else (an ``out_id`` a
    caller chose) goes to ``layout.validate_id``, which raises ``InvalidId``."""
    if (isinstance(value, str) and 0 < len(value) <= 128 and value[0].isascii()
            and value[0].isalnum() and ".." not in value and _ID_CHARS.issuperset(value)):
        return value
    from orchestrator.contract import layout

    return layout.validate_id(value, "message id")


def _mkdir(path: str) -> None:
    """``Path.mkdir(exist_ok=True)``: a folder already there is fine, anything else
    in its place is an error."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def remove_tree(path: object, ignore_errors: bool = True) -> None:
    """shutil.rmtree, imported on first use: most agent runs never remove anything,
    and shutil (with its compression modules) is a noticeable part of a cold start."""
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)  # type: ignore[arg-type]
