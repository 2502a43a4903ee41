"""What one pass reads from a session's folder, as a part of ``SessionWorker``.

- ``.heartbeat`` (its mtime, clamped) and the registry's touch of it;
- ``outbound.db``: replies handed to the ``Deliverer``, acks mirrored into
  ``inbound.db``, claims, the running tool and the acked-but-unanswered state,
  every agent value clamped (``_sanitised``) before a rule sees it;
- ``inbound.db``: the due work count.

A mixin only to keep ``session_worker.py`` about the pass and its decisions; it has
no state of its own (``SessionWorker.__init__`` makes ``_marks`` and ``_touches``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Callable

from loguru import logger

from orchestrator.config.groups import AgentSettings
from orchestrator.config.model import Config
from orchestrator.contract import schema
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB
from orchestrator.engine.delivery import Deliverer, DeliveryState
from orchestrator.engine.ports import Notify
from orchestrator.engine.tracked import Tracked
from orchestrator.host import commit_mark, inbound, outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import Sessions
from orchestrator.rules import answers
from orchestrator.rules.agent_values import (
    agent_time,
    claim_time,
    time_from_ns,
    timeout_seconds,
)
from orchestrator.rules.lifecycle import Claim, Observation, last_activity

REGISTRY_TOUCH_EVERY = timedelta(seconds=5)

def _ids(ids: list[str], shown: int = 20) -> str:
    if len(ids) == 1:
        return f"reply {ids[0]}"
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} replies: {', '.join(ids[:shown])}{more}"


def _parse_ts(value: str | None) -> datetime | None:
    try:
        return schema.parse_ts(value)
    except (ValueError, TypeError):
        return None


class ReadsMixin:
    # SessionWorker's, used here (see session_worker.py)
    cfg: Config
    registry: Registry
    sessions: Sessions
    deliverer: Deliverer
    notify: Notify
    _marks: dict[str, tuple[commit_mark.Mark, DeliveryState]]
    # session → (last activity, heartbeat) for the registry, written by ``flush_touches``
    _touches: dict[str, tuple[datetime | None, datetime | None]]

    if TYPE_CHECKING:
        def settings(self, agent_group: str) -> AgentSettings: ...
        def _successor(self, now: datetime) -> Callable[[dict], inbound.NewMessage | None]: ...
        def _observe(self, t: Tracked) -> Observation: ...
        @staticmethod
        def _forget(t: Tracked, why: str) -> None: ...

    def _read_heartbeat(self, t: Tracked, folder: SessionDir, now: datetime) -> None:
        """The .heartbeat mtime, as ``agent_values.agent_time`` allows: an mtime in the
        future reads as the time it was first seen, and the same file (signature) reads
        the same on every pass, so it ages and the stuck rules still apply."""
        sig = folder.signature(HEARTBEAT)
        t.read.sigs["hb"] = sig
        ev = t.evidence
        previous = ev.heartbeat_at if sig == ev.heartbeat_sig else None
        ev.heartbeat_at = agent_time(time_from_ns(sig[0]), now, previous) if sig else None
        ev.heartbeat_sig = sig
        self._touch_registry(t, now)

    def _touch_registry(self, t: Tracked, now: datetime, force: bool = False) -> None:
        """Heartbeats can come at 10 Hz from 100 agents: the registry hears every 5 s,
        and a reply's activity (``force``) at the next ``flush_touches``."""
        touched = t.read.registry_touched
        if not force and touched and now - touched < REGISTRY_TOUCH_EVERY:
            return
        active = last_activity(self._observe(t))
        if t.evidence.heartbeat_at or active:
            self._touches[t.session_id] = (active, t.evidence.heartbeat_at)
            t.read.registry_touched = now

    def flush_touches(self) -> None:
        """The registry's ``last_active``/``last_heartbeat`` of the sessions passed since
        the last flush, in one transaction (the sweep's tick: once a second, and at
        shutdown). Why: a pass that delivered a reply wrote its own registry
        transaction, ~0.1 ms of each one-reply pass; the times are for ``status``, the
        console and retention (days), which a second's delay does not change."""
        if not self._touches:
            return
        rows = [(sid, a, h) for sid, (a, h) in self._touches.items()]
        self._touches.clear()
        try:
            self.registry.touch_many(rows)
        except sqlite3.Error as exc:  # a full disk: the next touches try again
            logger.warning("could not record the activity of {} sessions in the registry: {}",
                           len(rows), exc)

    async def _read_outbound(self, t: Tracked, folder: SessionDir, now: datetime) -> None:
        self._marks.pop(t.session_id, None)  # kept again only once this read is complete
        mark = commit_mark.mark(folder.fd, OUTBOUND_DB)  # before the read (``_quiet``)
        t.read.sigs["out"] = folder.signature(OUTBOUND_DB)
        acks_seen = t.read.acks_seen
        snap = outbound.read(folder.db(OUTBOUND_DB), after_seq=t.delivery.watermark,
                             acks_since=schema.format_ts(acks_seen) if acks_seen else None,
                             max_content_bytes=self.cfg.delivery.max_content_bytes,
                             anchor=t.delivery.anchor)
        snap = self._sanitised(t, snap, now)
        if snap.rewound:
            self._forget(t, "outbound.db rewritten (the last settled row is gone)")
            t.read.sigs["out"] = folder.signature(OUTBOUND_DB)
        settled = {mid: a.status for mid, a in snap.acks.items()
                   if a.status in ("completed", "failed")}
        final = {mid: st for mid, st in settled.items() if mid not in t.read.synced_acks}
        ev = t.evidence
        ev.claims = tuple(Claim(mid, a.status_changed) for mid, a in snap.acks.items()
                          if a.status == "processing")
        ev.tool_timeout = (snap.tool.declared_timeout  # clamped by _sanitised
                           if snap.tool and snap.tool.current_tool else None)
        ev.tool_running = bool(snap.tool and snap.tool.current_tool)
        self._track_answers(t, folder, snap, final, now)
        if snap.messages and snap.messages[-1].seq > t.read.max_seq_seen:
            t.read.max_seq_seen = snap.messages[-1].seq
            ev.last_reply_at = now
        if t.routing is None:
            row = self.registry.session(t.session_id)
            t.routing = self.sessions.routing_of(row) if row else (None, None, None)
        # The acks' mirror goes into the replies' own record commit (an agent writes a
        # reply and its 'completed' ack in one commit; one fsync settles both).
        result = await self.deliverer.run_pass(
            folder=folder, agent_group=t.agent_group, session_id=t.session_id,
            state=t.delivery, messages=snap.messages, routing=t.routing, now=now,
            acks=final, follow_up=self._successor(now))
        # Only once the sync is written: acks older than ``acks_seen`` are never read
        # again, so moving it first would lose an ack whose sync failed.
        stamps = [a.status_changed for a in snap.acks.values() if a.status_changed]
        if stamps:
            newest = max(stamps)
            seen = t.read.acks_seen
            t.read.acks_seen = newest if seen is None else max(seen, newest)
        t.read.synced_acks = set(settled)
        t.delivery_due = result.next_due
        if result.delivered:  # one line per pass, however many replies it delivered
            logger.info("delivered {} of session {}", _ids(result.delivered), t.session_id)
        if result.delivered or result.failed:
            self._notify_replies(t, snap.messages, result, now)
        if result.delivered or final:
            self._touch_registry(t, now, force=True)
        if mark is not None and not snap.rewound and commit_mark.unchanged(
                mark, commit_mark.mark(folder.fd, OUTBOUND_DB)):  # no commit during the read
            self._marks[t.session_id] = (mark, t.delivery)

    def _sanitised(self, t: Tracked, snap: outbound.Snapshot,
                   now: datetime) -> outbound.Snapshot:
        """The agent's numbers and times in this read, clamped (``agent_values``) before
        any rule sees them: ack stamps never later than now; a claim's stamp in the
        future, or none usable, keeps the time the claim was first read at (so it ages
        and the claim rule applies); the declared tool timeout within (0, [lifecycle]
        max_tool_timeout] or none. The one place these values come in."""
        before = {c.message_id: c.claimed_at for c in t.evidence.claims}

        def stamp(a: outbound.Ack) -> datetime | None:
            clamp = claim_time if a.status == "processing" else agent_time
            return clamp(a.status_changed, now, before.get(a.message_id))

        acks = {mid: replace(a, status_changed=stamp(a)) for mid, a in snap.acks.items()}
        tool = snap.tool
        if tool is not None:
            ceiling = self.settings(t.agent_group).lifecycle.max_tool_timeout
            tool = replace(tool, declared_timeout=timeout_seconds(tool.declared_timeout, ceiling),
                           started_at=agent_time(tool.started_at, now))
        return replace(snap, acks=acks, tool=tool)

    def _track_answers(self, t: Tracked, folder: SessionDir, snap: outbound.Snapshot,
                       final: dict[str, str], now: datetime) -> None:
        """Fold this read into the acked-but-unanswered state (see ``answers``)."""
        wait = self.cfg.lifecycle.answer_wait
        horizon = now - timedelta(seconds=wait)
        done = {mid: snap.acks[mid].status_changed for mid, st in final.items()
                if st == "completed" and (snap.acks[mid].status_changed or now) > horizon}
        replies = [answers.Reply(m.in_reply_to, agent_time(_parse_ts(m.timestamp), now))
                   for m in snap.messages
                   if m.seq > t.read.max_seq_seen and answers.is_answer(m.content)]
        ev = t.evidence
        claimed = {c.message_id for c in ev.claims}
        named = {r.in_reply_to for r in replies if r.in_reply_to is not None} - claimed
        if done or named:
            # Context-only and system rows need no answer, and a reply naming one answers
            # nothing by it: NanoClaw names the chat's newest row, which after a question
            # is the system row carrying its answer — the prompt that asked still waits
            # for this very reply, so the hint is dropped and the reply pairs as unnamed.
            keep = inbound.triggering(folder.db(INBOUND_DB), set(done) | named)
            done = {mid: at for mid, at in done.items() if mid in keep}
            replies = [r if r.in_reply_to is None or r.in_reply_to in keep
                       or r.in_reply_to in claimed else replace(r, in_reply_to=None)
                       for r in replies]
        if not done and not replies and not ev.answers.groups and not ev.claims:
            return
        ev.answers = answers.step(ev.answers, now=now, answer_wait=wait,
                                  claims={c.message_id: c.claimed_at for c in ev.claims},
                                  completed=done, replies=replies)
        if ev.answers.expired:
            logger.warning("session {}: no reply to {} within answer_wait ({:g}s): taken as "
                           "answered by silence", t.session_id, ", ".join(sorted(
                               ev.answers.expired)), wait)

    def _read_inbound(self, t: Tracked, folder: SessionDir, now: datetime) -> None:
        t.read.sigs["in"] = folder.signature(INBOUND_DB)
        t.evidence.counted(*inbound.due_state(folder.db(INBOUND_DB), now))

    def _notify_replies(self, t: Tracked, messages: list, result, now: datetime) -> None:
        by_id = {m.id: m for m in messages}
        for kind, ids in (("reply_delivered", result.delivered), ("reply_failed", result.failed)):
            for mid in ids:
                m = by_id.get(mid)
                try:
                    committed = schema.parse_ts(m.timestamp if m else None)  # the agent's
                except (ValueError, TypeError):
                    committed = None
                # in_reply_to and the content text: the API's waiters and SSE events (the
                # hub bounds the content before it is stored)
                self.notify(kind, {
                    "session_id": t.session_id, "agent_group": t.agent_group, "message_id": mid,
                    "delay_seconds": (now - committed).total_seconds() if committed else None,
                    "in_reply_to": m.in_reply_to if m else None,
                    "content_text": m.content if m else None})
