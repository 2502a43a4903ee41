"""A test agent that behaves like NanoClaw v2's container agent-runner (stdlib only).

Written from NanoClaw's runner's observable behaviour (not its code), with the model
call replaced by a slow echo, so the orchestrator can be tested against what that
runner does to a session folder:

- on start it deletes its leftover ``processing`` acks; it touches ``.heartbeat``
  only on "stream events" (the model's init and each result), never while the
  model is silent or a tool runs;
- it polls ``messages_in`` (read-only, fresh connection) for pending, due rows —
  due by SQLite's ``datetime(process_after) <= datetime('now')`` — not acked, not
  ``system``; the first batch is claimed ``processing`` and opens one long-lived
  "query"; every later message is claimed, pushed into that query and acked
  ``completed`` at once, long before it is answered;
- the model handles one prompt at a time: ``--silent`` seconds without a sound,
  then a result, after which the first batch is acked ``completed``;
- it answers only to ``destinations``: the sender's chat is looked up by
  (channel_type, platform_id), the first matching row; no row, no reply (dropped);
  the reply's thread and ``in_reply_to`` come from the newest inbound message of
  that chat (not the message answered);
- ``tool:N`` runs a "tool" for N silent seconds with ``container_state.current_tool``
  set; ``ask`` writes a question card and waits (tool set) for a ``system`` row whose
  content matches ``%"questionId":"<id>"%``, then acks it and answers with its
  ``selectedOption``; attachments are read from ``/workspace/<localPath>`` (here: the
  session folder); ``die`` exits with code 3 before answering, on its first try;
  ``/workspace/agent/container.json``'s ``assistantName`` signs every answer.

Each answer says ``answer to <message id>`` so a test can count answers exactly
without trusting ``in_reply_to``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


def log(text: str) -> None:
    print(f"nanoclaw-like[{os.getpid()}] {text}", file=sys.stderr, flush=True)


@dataclass
class Prompt:
    rows: list[dict]
    initial: bool


class Folder:
    """The session folder as NanoClaw's runner opens it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbound = root / "inbound.db"
        self.lock = threading.Lock()  # one outbound writer at a time (two threads)

    def read_in(self, sql: str, args: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(self.inbound.resolve().as_uri() + "?mode=ro", uri=True,
                               timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def write_out(self, sql: str, args: tuple = (), many: list[tuple] | None = None) -> None:
        with self.lock:
            conn = sqlite3.connect(self.root / "outbound.db", timeout=5, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("BEGIN IMMEDIATE")
                if many is not None:
                    conn.executemany(sql, many)
                else:
                    conn.execute(sql, args)
                conn.execute("COMMIT")
            finally:
                conn.close()

    def read_out(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.root / "outbound.db", timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def heartbeat(self) -> None:
        path = self.root / ".heartbeat"
        try:
            os.utime(path)
        except FileNotFoundError:
            path.write_text("")

    def ack(self, ids: list[str], status: str) -> None:
        self.write_out("INSERT OR REPLACE INTO processing_ack (message_id, status, status_changed)"
                       " VALUES (?, ?, datetime('now'))", many=[(i, status) for i in ids])

    def tool(self, name: str | None) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self.write_out("INSERT INTO container_state (id, current_tool, tool_declared_timeout_ms,"
                       " tool_started_at, updated_at) VALUES (1, ?, NULL, ?, ?) ON CONFLICT(id)"
                       " DO UPDATE SET current_tool=excluded.current_tool,"
                       " tool_started_at=excluded.tool_started_at, updated_at=excluded.updated_at",
                       (name, now if name else None, now))

    def write_message(self, kind: str, content: dict, channel_type: str | None,
                      platform_id: str | None, thread_id: str | None,
                      in_reply_to: str | None, out_id: str | None = None) -> str:
        out_id = out_id or f"msg-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        (max_in,) = self.read_in("SELECT COALESCE(MAX(seq), 0) AS m FROM messages_in")[0].values()
        with self.lock:
            conn = sqlite3.connect(self.root / "outbound.db", timeout=5, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                (max_out,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_out").fetchone()
                top = max(max_in, max_out)
                seq = top + 1 if top % 2 == 0 else top + 2
                conn.execute(
                    "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id,"
                    " channel_type, thread_id, content) VALUES (?,?,?,datetime('now'),?,?,?,?,?)",
                    (out_id, seq, in_reply_to, kind, platform_id, channel_type, thread_id,
                     json.dumps(content)))
                conn.execute("COMMIT")
            finally:
                conn.close()
        return out_id

    def pending(self) -> list[dict]:
        rows = self.read_in(
            "SELECT * FROM messages_in WHERE status = 'pending' AND (process_after IS NULL OR"
            " datetime(process_after) <= datetime('now')) ORDER BY seq DESC LIMIT 10")
        acked = {r[0] for r in self.read_out("SELECT message_id FROM processing_ack")}
        return [r for r in reversed(rows) if r["id"] not in acked and r["kind"] != "system"]

    def destination_for(self, channel_type: str | None, platform_id: str | None) -> dict | None:
        if not channel_type or not platform_id:
            return None
        rows = self.read_in("SELECT * FROM destinations WHERE type = 'channel' AND"
                            " channel_type = ? AND platform_id = ?", (channel_type, platform_id))
        return rows[0] if rows else None


class Model:
    """The slow echo standing in for the model, one prompt at a time (a thread)."""

    def __init__(self, folder: Folder, silent: float) -> None:
        self.folder = folder
        self.silent = silent
        # NanoClaw's runner reads its settings from the group folder's container.json
        settings = folder.root / "agent" / "container.json"
        self.name = (json.loads(settings.read_text()).get("assistantName", "?")
                     if settings.is_file() else "?")
        self.prompts: queue.Queue[Prompt] = queue.Queue()

    def run(self) -> None:
        self.folder.heartbeat()  # the "init" stream event
        while True:
            prompt = self.prompts.get()
            time.sleep(self.silent)  # the model thinks without a sound
            answers = [self.answer(row) for row in prompt.rows]
            self.folder.heartbeat()  # the "result" stream event
            if prompt.initial:
                self.folder.ack([r["id"] for r in prompt.rows], "completed")
            for row, text in zip(prompt.rows, answers, strict=False):
                self.send(row, text)

    def answer(self, row: dict) -> str:
        content = json.loads(row["content"])
        text = content.get("text", "")
        parts = [f"answer to {row['id']}: {text}", f"sender={content.get('sender', 'Unknown')}",
                 f"by {self.name}"]
        if text.startswith("tool:"):
            self.folder.tool("Bash")
            time.sleep(float(text.split(":", 1)[1]))  # silent: no heartbeat while it runs
            self.folder.tool(None)
            parts.append("tool done")
        if text == "ask":
            parts.append(f"chose {self.ask(row)}")
        if text == "die" and row["tries"] == 0:
            log(f"{row['id']}: dying before the answer")
            os._exit(3)
        for att in content.get("attachments") or []:
            data = (self.folder.root / att["localPath"]).read_bytes()
            parts.append(f"read {att['name']} ({len(data)} bytes): {data.decode()}")
        return " | ".join(parts)

    def ask(self, row: dict) -> str:
        question_id = f"msg-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        routing = (self.folder.read_in("SELECT * FROM session_routing WHERE id = 1") or [{}])[0]
        self.folder.tool("mcp__nanoclaw__ask_user_question")
        self.folder.write_message(
            "chat-sdk", {"type": "ask_question", "questionId": question_id, "title": "Pick",
                         "question": "yes or no?", "options": ["yes", "no"]},
            routing.get("channel_type"), routing.get("platform_id"), routing.get("thread_id"),
            None, out_id=question_id)
        while True:
            rows = self.folder.read_in("SELECT * FROM messages_in WHERE status = 'pending' AND"
                                       " content LIKE ?", (f'%"questionId":"{question_id}"%',))
            acked = {r[0] for r in self.folder.read_out("SELECT message_id FROM processing_ack")}
            rows = [r for r in rows if r["id"] not in acked]
            if rows:
                self.folder.ack([rows[0]["id"]], "completed")
                self.folder.tool(None)
                return json.loads(rows[0]["content"])["selectedOption"]
            time.sleep(0.2)

    def send(self, row: dict, text: str) -> None:
        dest = self.folder.destination_for(row["channel_type"], row["platform_id"])
        if dest is None:
            log(f"no destination for {row['channel_type']}:{row['platform_id']}; dropped")
            return
        newest = self.folder.read_in(
            "SELECT id, thread_id FROM messages_in WHERE channel_type = ? AND platform_id = ?"
            " ORDER BY seq DESC LIMIT 1", (dest["channel_type"], dest["platform_id"]))
        thread, in_reply_to = ((newest[0]["thread_id"], newest[0]["id"]) if newest
                               else (None, row["id"]))
        self.folder.write_message("chat", {"text": text}, dest["channel_type"],
                                  dest["platform_id"], thread, in_reply_to)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--silent", type=float, default=1.5)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    folder = Folder(args.workspace)
    folder.write_out("DELETE FROM processing_ack WHERE status = 'processing'")
    model: Model | None = None
    while True:
        rows = folder.pending()
        if model is None:
            if any(r["trigger"] == 1 for r in rows):
                folder.ack([r["id"] for r in rows], "processing")
                model = Model(folder, args.silent)
                model.prompts.put(Prompt(rows, initial=True))
                threading.Thread(target=model.run, daemon=True).start()
        elif rows:  # a follow-up: claimed, pushed into the running query, acked at once
            ids = [r["id"] for r in rows]
            folder.ack(ids, "processing")
            model.prompts.put(Prompt(rows, initial=False))
            folder.ack(ids, "completed")
        time.sleep(args.poll)


if __name__ == "__main__":
    raise SystemExit(main())
