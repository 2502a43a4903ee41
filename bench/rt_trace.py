"""The bench's eyes on one round trip: the reply's line in the jsonl channel file and,
for a breakdown, the session folder's own inotify events (``ReplyWatch``).

Why from the folder's events: they need no change to the agent or the host (which
is what is measured), and every step leaves one: the host writes ``.agent.pid``
when it has started a local agent, the agent touches ``.heartbeat`` first thing
(a cold start's early beat; a warm agent before it answers), and the reply's
commit makes and deletes ``outbound.db-journal`` (``journal_mode=DELETE``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench import collect
from bench.inotify import IN_DELETE, IN_MODIFY, Inotify

# milestones of one round trip, seen as inotify events in the session folder (no agent
# or host change needed): name -> (file, event mask, which occurrence after the commit)
IN_ATTRIB, IN_CREATE, IN_MOVED_TO = 0x4, 0x100, 0x80
STEPS = ("spawned", "woke", "reply_begin", "reply_commit", "delivered", "host_delivery")


class ReplyWatch:
    """Lines appended to the jsonl channel file, stamped when inotify reports them; with
    ``folder``, also the session folder's events, for a breakdown of each round trip
    (``breakdown``): when the host wrote the agent's ``.agent.pid`` (local start), the
    agent's first ``.heartbeat`` touch (a cold start's early beat: the interpreter runs;
    warm: it has read the message), and the reply's commit (``outbound.db-journal``
    created, then deleted: SQLite's ``journal_mode=DELETE``)."""

    def __init__(self, jsonl: Path, folder: Path | None = None) -> None:
        jsonl.touch()
        self.jsonl = jsonl
        self.ino = Inotify()
        self.jsonl_wd = self.ino.add(jsonl, IN_MODIFY)
        self.fh = open(jsonl, "rb")
        self.fh.seek(0, os.SEEK_END)
        self.buf = b""
        self.seen: dict[str, float] = {}
        self.events: list[tuple[float, str, int]] = []  # (time, name, mask) in the folder
        if folder is not None:
            self.ino.add(folder, IN_ATTRIB | IN_CREATE | IN_DELETE | IN_MOVED_TO)

    def _read(self, events: list) -> None:
        now = time.time()
        for ev in events:
            if ev.wd != self.jsonl_wd and ev.name:
                self.events.append((now, ev.name, ev.mask))
        self.buf += self.fh.read()
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            try:
                reply_to = json.loads(line).get("in_reply_to")
            except ValueError:
                continue
            if reply_to:
                self.seen.setdefault(reply_to, now)

    def wait(self, message_id: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while message_id not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._read(self.ino.read(min(left, 0.5)))
        return self.seen[message_id]

    def drain(self) -> None:
        """Read what is queued and forget the folder's events: a new round trip starts."""
        self._read(self.ino.read(0))
        self.events.clear()

    def breakdown(self, t0: float, t1: float) -> dict[str, float]:
        """ms after ``t0`` (the message's commit) of each milestone seen before ``t1``
        (the delivered line): ``spawned``, ``woke``, ``reply_begin``, ``reply_commit``,
        ``delivered`` (a missing one is left out), and ``host_delivery``: ms from the
        reply's commit to its line. The events are dropped after."""
        evs = [(t, name, mask) for t, name, mask in self.events if t0 <= t <= t1]
        self.events = [e for e in self.events if e[0] > t1]
        out: dict[str, float] = {}

        def first(name: str, mask: int) -> float | None:
            return next((t for t, n, m in evs if n == name and m & mask), None)

        spawned = first(".agent.pid", IN_MOVED_TO)
        woke = first(".heartbeat", IN_ATTRIB | IN_CREATE)
        commits = [t for t, n, m in evs if n == "outbound.db-journal" and m & IN_DELETE]
        commit = commits[-1] if commits else None
        begins = [t for t, n, m in evs if n == "outbound.db-journal" and m & IN_CREATE
                  and (commit is None or t <= commit)]
        for key, t in (("spawned", spawned), ("woke", woke),
                       ("reply_begin", begins[-1] if begins else None),
                       ("reply_commit", commit), ("delivered", t1)):
            if t is not None:
                out[key] = 1000.0 * (t - t0)
        if commit is not None:  # the host's share: the reply's commit → its line
            out["host_delivery"] = 1000.0 * (t1 - commit)
        return out

    def close(self) -> None:
        self.ino.close()
        self.fh.close()


def summarize_steps(samples: list[dict[str, float]]) -> dict[str, dict]:
    """p50 / max (ms after the commit) of each milestone over the samples that saw it."""
    out: dict[str, dict] = {}
    for key in STEPS:
        vals = [s[key] for s in samples if key in s]
        if vals:
            r = collect.summarize_ms([v / 1000.0 for v in vals])
            out[key] = {"n": r["n"], "p50": round(r["p50"], 2), "max": round(r["max"], 2)}
    return out


def steps_line(steps: dict[str, dict]) -> str:
    """``woke 3.1 → reply_commit 6.0 → delivered 9.2 (host 3.2)`` (p50 ms after the
    commit; the host's share: reply commit → line)."""
    host = steps.get("host_delivery")
    return (" → ".join(f"{k} {v['p50']:.1f}" for k, v in steps.items() if k != "host_delivery")
            + (f" (host: reply commit → line {host['p50']:.1f})" if host else ""))
