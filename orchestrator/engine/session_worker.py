"""One pass over one session: read what changed, deliver, decide, act, set a timer.

The supervisor guarantees at most one pass per session at a time. A pass only
reads what its flags say changed (a heartbeat costs one ``stat``), feeds the
pure rules in ``lifecycle`` and applies the verdict. Slow runtime operations
(start, stop, kill) run as tasks so one slow container never delays another
session's replies; their completion marks the session dirty again.

Heartbeats are muted while they cannot matter. A heartbeat only says "still
alive": for an agent we already call ``running`` it can only push a deadline
(idle, heartbeat ceiling, claim) later, never cause an action. So after a pass
that leaves a session running with a timer set, its id goes into ``muted`` and
the watch thread drops its heartbeats; the next pass (that timer at the latest)
takes it out and re-reads the heartbeat file before deciding anything. A touch
dropped while muted happened before that re-read, so nothing is missed — and
100 agents heartbeating at 1 Hz no longer wake the event loop 100 times a second.
Likewise an event-driven pass over a muted session that would read nothing new is
skipped (``_quiet``): ``inbound.db`` alone (mostly the host's own delivery records),
or ``outbound.db`` with no commit since its last complete read (``host.commit_mark``:
SQLite's file change counter, one ``pread``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Callable, Iterable

from loguru import logger

from orchestrator.channels import Failure
from orchestrator.config import groups
from orchestrator.config.groups import AgentSettings
from orchestrator.config.model import Config
from orchestrator.contract import schema
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import Deliverer, DeliveryState
from orchestrator.engine.ports import (
    Admission,
    EgressPort,
    Mark,
    NoEgress,
    Notify,
    StatusBook,
    Unlimited,
    notify_nobody,
)
from orchestrator.engine.space_watch import SpaceRefused, SpaceWatch
from orchestrator.engine.tracked import Flag, Flags, Tracked, trusted_stamp
from orchestrator.host import commit_mark, inbound, outbound
from orchestrator.host.outbound import OutboundError
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import FolderStat, Refused, SessionDir
from orchestrator.host.sessions import Sessions
from orchestrator.rules import answers, scheduling
from orchestrator.rules.agent_values import (
    agent_time,
    claim_time,
    time_from_ns,
    timeout_seconds,
)
from orchestrator.rules.lifecycle import (
    Action,
    Claim,
    Observation,
    Verdict,
    decide,
    last_activity,
)
from orchestrator.runtime.base import AgentExit, Runtime, RuntimeUnavailable, SessionRef, Usage
from orchestrator.support.errors import host_storage_failure
from orchestrator.watch.muted import Muted

REGISTRY_TOUCH_EVERY = timedelta(seconds=5)
BUSY_RETRY_FIRST = 0.02  # s; a busy database is retried shortly, backing off to …
BUSY_RETRY_MAX = 1.0  # … at most this (its own commit's inotify event comes sooner)


# what a stat-gated look compares with the last pass: (key in sigs, file, flag)
_WATCHED = (("hb", HEARTBEAT, Flag.HEARTBEAT), ("out", OUTBOUND_DB, Flag.OUTBOUND),
            ("in", INBOUND_DB, Flag.INBOUND))
_QUIET = _WATCHED[1:]

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


class SessionWorker:
    """Runs one pass over one session (``process``); the supervisor calls it.

    ``statuses`` writes status changes; ``admission`` may turn a start into a wait
    for a slot; ``notify`` gets status changes, replies delivered/failed, failed
    messages and agent starts (the API's event log and metrics: must not block);
    ``after_pass`` sees every session after its pass (the start-up state book)."""

    def __init__(self, cfg: Config, registry: Registry, sessions: Sessions, runtime: Runtime,
                 deliverer: Deliverer, clock: Callable[[], datetime], mark: Mark, *,
                 statuses: StatusBook | None = None, admission: Admission | None = None,
                 notify: Notify = notify_nobody,
                 after_pass: Callable[[Tracked], None] = lambda t: None,
                 egress: EgressPort | None = None) -> None:
        self.cfg = cfg
        self.egress = egress or NoEgress()  # the gateway's token for each start
        self.registry = registry
        self.sessions = sessions
        self.runtime = runtime
        self.deliverer = deliverer
        self.clock = clock
        self.mark = mark
        self.statuses = statuses or StatusBook(registry, notify)
        self.admission = admission or Unlimited()
        self.notify = notify
        self.after_pass = after_pass
        self.muted = Muted()  # read by the watch thread (set ops are atomic)
        # a muted session's outbound.db as its last complete read found it, and the
        # delivery memory that read left (``_quiet``)
        self._marks: dict[str, tuple[commit_mark.Mark, DeliveryState]] = {}
        self._ops: set[asyncio.Task] = set()
        self._settings: dict[str, AgentSettings] = {}
        self.space = SpaceWatch(cfg, mark, Flag.TIMER)  # quota and reserve (space_watch)

    def settings(self, agent_group: str) -> AgentSettings:
        """The group's effective settings ([groups.<name>] over the global values),
        resolved once per group from the config ``run`` started with."""
        s = self._settings.get(agent_group)
        if s is None:
            s = self._settings[agent_group] = groups.resolve(self.cfg, agent_group)
        return s

    def _successor(self, now: datetime) -> Callable[[dict], inbound.NewMessage | None]:
        """A settled recurring row's next occurrence (written in the same transaction)."""
        zone = self.cfg.sessions.timezone
        return lambda row: scheduling.successor(row, now, zone)

    # --- the pass ---------------------------------------------------------------------

    async def process(self, t: Tracked, flags: Flags) -> None:
        # every log line of the pass (and of the ops it starts) names its session
        with logger.contextualize(session=t.session_id, group=t.agent_group):
            await self._process(t, flags)
        self.after_pass(t)

    async def _process(self, t: Tracked, flags: Flags) -> None:
        now = self.clock()
        if t.restored and flags != Flag.SWEEP:  # skipped at start-up, nothing read yet;
            t.restored = False  # (a rescan's stat-gated SWEEP stays cheap: 10 000 of them)
            flags |= Flag.FULL
        if t.session_id in self.muted:  # unmute first, then read: no touch falls between
            if self._quiet(t, flags):
                return
            self.muted.discard(t.session_id)
            flags |= Flag.HEARTBEAT
        try:
            # the folder by descriptor, reached without following a link: every file of
            # this pass is opened relative to it (safefs); a linked folder is Refused
            with SessionDir(self.cfg.data_dir, t.agent_group, t.session_id) as folder:
                if self._replaced(t, folder):
                    flags |= Flag.FULL
                await self._pass(t, folder, flags, now)
            if t.read.busy:
                logger.debug("session {}: its databases answer again", t.session_id)
                t.read.busy = 0
            if t.said.clear("pass") is not None:
                logger.info("session {}: readable again", t.session_id)
        except (OutboundError, sqlite3.Error, OSError) as exc:
            self._unreadable(t, exc, now)
        except Exception as exc:  # noqa: BLE001 - a bug or a hostile folder: kept to this session
            # (the supervisor runs every pass on one worker task; letting this escape
            # would silently stop delivery and lifecycle for every session)
            message = f"{type(exc).__name__}: {exc}"
            if t.said.say("pass", message):
                logger.opt(exception=exc).error("session {}/{}: pass failed: {}",
                                                t.agent_group, t.session_id, message)
            self._again_at_sweep(t, now)

    def _unreadable(self, t: Tracked, exc: OutboundError | sqlite3.Error | OSError,
                    now: datetime) -> None:
        """The pass met a database or file it could not read: busy (retried shortly), or
        a trouble said once and looked at again by the sweep."""
        if schema.is_busy(exc):
            self._busy(t, now)
            return
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, Refused):
            message = exc.strerror or message
        elif isinstance(exc, OSError) and exc.strerror:
            message = f"{t.paths.root}: {exc.strerror}"
        if t.said.say("pass", message):
            logger.error("session {}/{}: {}{}", t.agent_group, t.session_id, message,
                         "; leaving it alone" if isinstance(exc, Refused) else "")
        self._again_at_sweep(t, now)

    def _quiet(self, t: Tracked, flags: Flags) -> bool:
        """Whether an event-driven pass over a muted session (its agent runs, a timer is
        set, nothing short of that timer or a write can change its verdict) would read
        nothing new, so it is skipped and the session stays muted:

        - ``inbound.db`` alone: a running agent picks its messages up itself, and most
          of these events are the host's own delivery records (``_inbound_matters``);
        - ``outbound.db``: no commit since its last complete read (``commit_mark``: a
          commit is a run of events that a batch can cut in two, and the second half
          asked for a read that found nothing), and that read left every reply settled
          in the same delivery memory (not a reply waiting for its files or for a
          channel's outcome — whose arrival asks for a pass by this very flag — nor a
          memory reset to deliver again).

        Anything else (a timer, an exit, ``outbox/``, a sweep) takes the whole pass."""
        if flags & ~(Flag.OUTBOUND | Flag.INBOUND) or not self.runtime.is_running(t.session_id):
            return False
        if not flags & Flag.OUTBOUND:
            return True
        kept = self._marks.get(t.session_id)
        state = t.delivery
        if kept is None or kept[1] is not state or state.waiting_files \
                or state.watermark < t.read.max_seq_seen:
            return False
        try:
            with SessionDir(self.cfg.data_dir, t.agent_group, t.session_id) as folder:
                return commit_mark.unchanged(kept[0], commit_mark.mark(folder.fd, OUTBOUND_DB))
        except OSError:  # the pass says what is wrong
            return False

    def _again_at_sweep(self, t: Tracked, now: datetime) -> None:
        t.read.sigs.clear()  # re-read everything on the next sweep, not just what changes
        self._schedule(t, now + timedelta(seconds=self.cfg.watch.sweep_interval), now)

    async def _pass(self, t: Tracked, folder: SessionDir, flags: Flags, now: datetime) -> None:
        written = flags & (Flag.OUTBOX | Flag.OUTBOUND)  # an event said so (not a full pass)
        if flags & (Flag.FULL | Flag.FORCE):
            flags |= Flag.HEARTBEAT | Flag.OUTBOUND | Flag.INBOUND
            t.read.stamp = trusted_stamp(folder.times)  # all three are read below
        elif flags & Flag.SWEEP:
            flags |= self._changed_on_disk(t, folder)
        if flags & Flag.HEARTBEAT:
            self._read_heartbeat(t, folder, now)
        if flags & (Flag.OUTBOUND | Flag.OUTBOX | Flag.EXIT | Flag.TIMER):
            await self._read_outbound(t, folder, now)
        if flags & Flag.EXIT and t.exit is not None:
            self._on_exit(t, now)
        alive = self.runtime.is_running(t.session_id)
        if flags & (Flag.OUTBOX | Flag.OUTBOUND | Flag.SWEEP | Flag.FULL):  # off the loop,
            # rate-limited; a folder just written is walked even if its agent has gone
            # (not every folder at a start-up: a start measures its session anyway)
            self.space.look(t.agent_group, t.session_id, alive or bool(written))
        if self._inbound_matters(t, flags, alive):
            self._read_inbound(t, folder, now)
        await self._decide(t, folder, now)

    def _busy(self, t: Tracked, now: datetime) -> None:
        """A database of this session is locked (by its agent, or a reader of inbound.db):
        nothing waited for it; the pass runs again shortly, backing off. Said once."""
        t.read.busy += 1
        delay = min(BUSY_RETRY_MAX, BUSY_RETRY_FIRST * 2 ** (t.read.busy - 1))
        if t.read.busy == 1:
            logger.info("session {}: a database is busy (locked by its agent); retrying "
                        "shortly", t.session_id)
        self._schedule(t, now + timedelta(seconds=delay), now)

    def _replaced(self, t: Tracked, folder: SessionDir) -> bool:
        """A new inode for the folder, outbound.db or inbound.db resets everything
        remembered about the session: what was delivered is then known from inbound.db
        alone, and every row of the new outbound.db is read again from seq 0."""
        new = (folder.identity, folder.inode(OUTBOUND_DB), folder.inode(INBOUND_DB))
        old, t.read.identity = t.read.identity, new
        if old is None or old == new:
            return False
        names = ("the folder", OUTBOUND_DB, INBOUND_DB)
        changed = [name for name, a, b in zip(names, old, new, strict=True)
                   if a is not None and a != b]
        if not changed:
            return False  # a file that did not exist before is not a replaced one
        self._forget(t, f"{' and '.join(changed)} replaced (new inode)")
        return True

    @staticmethod
    def _forget(t: Tracked, why: str) -> None:
        logger.info("session {}: {}; reading it again from scratch", t.session_id, why)
        t.delivery = DeliveryState()
        t.read.forget()

    @staticmethod
    def _inbound_matters(t: Tracked, flags: Flags, alive: bool) -> bool:
        """Whether this pass must re-count due work.

        A running agent picks new messages up itself, and most inbound.db events are
        our own delivery records: for a running agent only a timer (idle deadline)
        or an exit needs the count. A stopped or idle one needs it to wake or to
        hold off a stop.
        """
        wanted = flags & (Flag.INBOUND | Flag.EXIT | Flag.TIMER)
        if wanted == Flag.INBOUND and alive and t.status == Status.RUNNING:
            return False
        return bool(wanted)

    def sweep_flags(self, t: Tracked, group_fd: int | None = None) -> Flags:
        """What the reconcile sweep must have a pass look at, or NONE: files changed
        on disk since the last pass read them (a missed event), a pass that failed
        (its signatures were cleared), or a status the runtime contradicts.
        ``group_fd``: the group folder, opened by the caller for a whole slice."""
        try:
            if group_fd is None:
                with SessionDir(self.cfg.data_dir, t.agent_group, t.session_id) as folder:
                    flags = self._changed_on_disk(t, folder)
            else:  # stat only; a folder other than the one last passed gets a pass
                seen = FolderStat(group_fd, t.agent_group, t.session_id)
                # no agent and none believed: its heartbeat decides nothing (a stat less)
                idle = t.status == Status.STOPPED and not self.runtime.is_running(t.session_id)
                flags = self._changed_on_disk(t, seen, _QUIET if idle else _WATCHED)
                if t.read.identity is None or seen.identity != t.read.identity[0]:
                    flags |= Flag.SWEEP
        except OSError:  # Refused too: the pass says what is wrong, once
            return Flag.SWEEP
        running = self.runtime.is_running(t.session_id)
        self.space.look(t.agent_group, t.session_id, running)
        if running != (t.status != Status.STOPPED):
            flags |= Flag.SWEEP
        return flags

    def _changed_on_disk(self, t: Tracked, folder: SessionDir | FolderStat,
                         files: tuple[tuple[str, str, int], ...] | None = None) -> Flags:
        flags = Flag.NONE
        for name, path, flag in files or _WATCHED:
            if folder.signature(path) != t.read.sigs.get(name, ()):
                flags |= flag
        if t.delivery.waiting_files:  # an outbox/ event may have been missed
            flags |= Flag.OUTBOX
        return flags

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
        """Heartbeats can come at 10 Hz from 100 agents: the registry hears every 5 s."""
        touched = t.read.registry_touched
        if not force and touched and now - touched < REGISTRY_TOUCH_EVERY:
            return
        active = last_activity(self._observe(t))
        if t.evidence.heartbeat_at or active:
            self.registry.touch(t.session_id, heartbeat=t.evidence.heartbeat_at, active=active)
            t.read.registry_touched = now

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

    def _on_exit(self, t: Tracked, now: datetime) -> None:
        ev, t.exit = t.exit, None
        if ev is None:  # (the pass only calls it for an exit)
            return
        code = f", exit code {ev.exit_code}" if ev.exit_code not in (None, 0) else ""
        reason = t.ending_reason or f"agent {ev.reason}{code}"
        t.ending_reason = None
        self._record_run(t, ev, reason, now)
        t.started_at = None
        t.evidence.idle_since = None
        t.ops.succeeded()  # the agent a failed stop/kill was for has gone
        t.said.clear("op")
        self.statuses.set(t, Status.STOPPED, reason, now)

    def _record_run(self, t: Tracked, ev: AgentExit, reason: str, now: datetime) -> None:
        """What the run that just ended used (its runtime's ``Usage``; wall time the
        runtime's own, else from its start or adoption) goes to the registry and the
        metrics. A record that cannot be written (a full disk) is logged and dropped: it
        never holds up the exit."""
        usage = ev.usage or Usage()
        try:
            self.registry.record_run(t.session_id, t.agent_group, t.started_at, now, reason,
                                     usage.cpu_seconds, usage.peak_memory_bytes,
                                     wall_seconds=usage.wall_seconds)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("session {}: its run's usage not recorded ({})", t.session_id, exc)
        self.notify("agent_run", {
            "session_id": t.session_id, "agent_group": t.agent_group, "reason": reason,
            "wall_seconds": usage.wall_seconds if usage.wall_seconds is not None else
            (now - t.started_at).total_seconds() if t.started_at else None,
            "cpu_seconds": usage.cpu_seconds, "peak_memory_bytes": usage.peak_memory_bytes})

    async def _reset_orphan_claims(self, t: Tracked, folder: SessionDir, now: datetime) -> None:
        """No agent runs, yet messages are claimed or acked unanswered: the agent died
        mid-message.

        Give the work back (tries+1, backoff) or fail it at max_tries, and clear the
        stale acks — the host may write outbound.db only while no agent runs.
        """
        lc = self.settings(t.agent_group).lifecycle
        unanswered = answers.awaiting(t.evidence.answers, now, lc.answer_wait)
        claimed = [c.message_id for c in t.evidence.claims]
        # Those that will fail are told to the channel before any write: a crash in
        # between tells it again (it knows what it has), and never loses the record.
        doomed = (inbound.claims_to_fail(folder.db(INBOUND_DB), claimed, max_tries=lc.max_tries)
                  + inbound.claims_to_fail(folder.db(INBOUND_DB), unanswered,
                                           max_tries=lc.max_tries, statuses=("completed",)))
        await self._report_failed(t, folder, doomed, f"failed after {lc.max_tries} tries: the "
                                  "agent ended while working on it each time")
        # Acks first: a crash between the two writes then leaves the message pending
        # with its old tries (retried once more), not counted twice on the next start.
        try:
            outbound.clear_processing_claims(folder.db(OUTBOUND_DB))
            t.read.sigs["out"] = folder.signature(OUTBOUND_DB)
            result = inbound.reset_claims(folder.db(INBOUND_DB), claimed,
                                          max_tries=lc.max_tries, backoff_base=lc.backoff_base,
                                          now=now, follow_up=self._successor(now))
        except (OSError, sqlite3.Error) as exc:
            if host_storage_failure(exc):  # the try is not on disk: count it in memory
                t.start.failed(now, self.cfg.runtime.start_retry_max)
                t.start.own_error("the agent ended while working and its try could not be "
                                  f"recorded ({exc})")
            raise
        t.evidence.claims = ()
        # Acked ``completed`` but not answered when the agent went: retried like a
        # claim. The row is reopened before its ack is deleted: a crash in between
        # leaves an ack the next read mirrors back and this rule reopens again.
        t.evidence.answers = answers.forget(t.evidence.answers)
        if unanswered:
            result.update(inbound.reset_claims(
                folder.db(INBOUND_DB), unanswered, max_tries=lc.max_tries,
                backoff_base=lc.backoff_base, now=now, follow_up=self._successor(now),
                statuses=("completed",)))
            outbound.clear_acks(folder.db(OUTBOUND_DB), unanswered)
            t.read.sigs["out"] = folder.signature(OUTBOUND_DB)
            t.read.synced_acks = t.read.synced_acks - set(unanswered)
        for mid, status in result.items():
            if status == "failed":
                logger.error("message {} of session {} failed after {} tries", mid,
                             t.session_id, lc.max_tries)
            else:
                logger.warning("message {} of session {} given back for retry", mid,
                               t.session_id)

    # --- decisions and actions ----------------------------------------------------------

    def _observe(self, t: Tracked) -> Observation:
        ev = t.evidence
        return Observation(
            alive=self.runtime.is_running(t.session_id), started_at=t.started_at,
            heartbeat_at=ev.heartbeat_at, last_reply_at=ev.last_reply_at, claims=ev.claims,
            tool_timeout=ev.tool_timeout, due=ev.due, idle_since=ev.idle_since,
            start_blocked_until=t.start.blocked_until, tool_running=ev.tool_running,
            answer_due=answers.answer_due(ev.answers, self.cfg.lifecycle.answer_wait),
            status=t.status,
            op_running=t.op_running(),
            op_blocked_until=t.ops.blocked_until, listed=self.runtime.listed,
            start_failures=t.start.errors, timers=(t.delivery_due, ev.next_inbound_due),
            paused=self.runtime.is_paused(t.session_id), resumed_at=ev.resumed_at,
            over_space=self.space.over(t.session_id))

    async def _decide(self, t: Tracked, folder: SessionDir, now: datetime) -> None:
        """Observe, decide (``lifecycle.decide`` holds every rule), apply."""
        verdict = decide(self._observe(t), now, self.settings(t.agent_group).lifecycle)
        if verdict.reset_claims:
            await self._reset_orphan_claims(t, folder, now)
            self._read_inbound(t, folder, now)
            verdict = decide(self._observe(t), now, self.settings(t.agent_group).lifecycle)
        await self._apply(t, folder, verdict, now)

    async def _apply(self, t: Tracked, folder: SessionDir, verdict: Verdict,
                     now: datetime) -> None:
        if not t.op_running():
            verdict = self.admission.review(t, verdict, now)  # a start may wait for a slot
        if verdict.record is not None:
            status, reason = verdict.record
            self.statuses.set(t, Status(status), reason, now)
        t.evidence.idle_since = verdict.idle_since
        if verdict.action is Action.START:
            self._run_op(t, self._start_admitted(t))
        elif verdict.action is Action.STOP:
            t.ending_reason = f"stopped: {verdict.reason}"
            self._run_op(t, self.runtime.stop(t.session_id, self.cfg.runtime.stop_grace))
        elif verdict.action is Action.KILL:
            (logger.debug if "op" in t.said else logger.warning)(
                "session {}: killing {}agent: {}", t.session_id,
                "" if verdict.reason.startswith("max_run") else "stuck ", verdict.reason)
            t.ending_reason = f"killed: {verdict.reason}"
            self._run_op(t, self.runtime.kill(t.session_id))
        elif verdict.action is Action.PAUSE:
            self._run_op(t, self._pause(t, verdict.reason))
        elif verdict.action is Action.RESUME:
            self._run_op(t, self._resume(t, verdict.reason))
        elif verdict.action is Action.FAIL_DUE:
            await self._fail_due(t, folder, verdict.reason, now)
        self._schedule(t, verdict.next_check, now)
        if verdict.mute:
            self.muted.add(t.session_id)
        else:  # kept for muted sessions only (running agents): ``_quiet``
            self._marks.pop(t.session_id, None)

    async def _fail_due(self, t: Tracked, folder: SessionDir, reason: str,
                        now: datetime) -> None:
        """The agent cannot be started (every try failed for this session's own
        reason): its due messages fail now instead of waiting forever. The count
        starts again, so a new message gets its own tries — and starts as soon as
        the obstacle on disk is gone."""
        why = f"{reason}: {t.start.error}" if t.start.error else reason
        due = inbound.due_ids(folder.db(INBOUND_DB), now)
        # told to the channel before the write: a crash in between tells it again
        await self._report_failed(t, folder, due, why)
        failed = inbound.fail_messages(folder.db(INBOUND_DB), due, now, self._successor(now))
        t.start.succeeded()
        t.said.clear("start")
        t.evidence.counted(*inbound.due_state(folder.db(INBOUND_DB), now))
        for mid in failed:
            logger.error("message {} of session {} failed: {}", mid, t.session_id, why)

    async def _report_failed(self, t: Tracked, folder: SessionDir, message_ids: list[str],
                             reason: str) -> None:
        """One failure record on the channel per inbound message that ended ``failed``
        (after max_tries, or because its agent can never start), routed to the chat the
        message came from, so a chat front end can tell its user."""
        if not message_ids:
            return
        routes = inbound.message_routes(folder.db(INBOUND_DB), message_ids)
        default = t.routing or (None, None, None)
        for mid in message_ids:
            self.notify("message_failed", {"session_id": t.session_id,
                                           "agent_group": t.agent_group, "message_id": mid,
                                           "reason": reason})
            ct, pid, thread = routes.get(mid, (None, None, None))
            await self.deliverer.report(Failure(
                "message", mid, t.session_id, t.agent_group, reason, ct or default[0],
                pid or default[1], thread or default[2]))

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

    def request_stop(self, t: Tracked, reason: str) -> bool:
        """Stop the agent now (``POST /v1/sessions/{id}/stop``); False if none runs or an
        operation is already under way. Due work wakes it again, as after any stop."""
        if not self.runtime.is_running(t.session_id) or t.op_running():
            return False
        t.ending_reason = f"stopped: {reason}"
        self._run_op(t, self.runtime.stop(t.session_id, self.cfg.runtime.stop_grace))
        return True

    def _run_op(self, t: Tracked, coro) -> None:
        async def wrapped() -> None:
            try:
                await coro
            except Exception as exc:  # noqa: BLE001 - any failure of the op: back off, retry
                # Back off before the next op on this session (see _decide). An outage
                # the runtime has already reported (``reported``, e.g. the Docker daemon
                # is down) is not logged again per session.
                delay = t.ops.failed(self.clock(), self.cfg.runtime.start_retry_max)
                quiet = not t.said.say("op", "failing") or (
                    isinstance(exc, RuntimeUnavailable) and exc.reported)
                (logger.debug if quiet else logger.error)(
                    "session {}: runtime operation failed: {} (retrying in {:g}s)",
                    t.session_id, exc, delay)
            else:
                t.ops.succeeded()
                t.said.clear("op")
            finally:
                self.mark(t.session_id, Flag.TIMER)

        t.op = asyncio.create_task(wrapped(), name=f"op-{t.session_id}")
        self._ops.add(t.op)
        t.op.add_done_callback(self._ops.discard)

    async def _start_admitted(self, t: Tracked) -> None:
        try:
            await self._start(t)
        finally:  # started or not, the slot it held while starting is the runtime's now
            self.admission.start_done(t.session_id)

    async def _start(self, t: Tracked) -> None:
        now = self.clock()
        try:
            refused = await self.space.refusal(t.agent_group, t.session_id)
            if refused:  # counts as its own failure below: max_tries ends its work
                raise SpaceRefused(refused)
            with SessionDir(self.cfg.data_dir, t.agent_group, t.session_id) as folder:
                folder.unlink(HEARTBEAT)  # a stale heartbeat is not liveness
                # no agent runs, so the host may write outbound.db: create it or add the
                # columns an older one lacks (``send`` leaves an existing one alone)
                schema.init_outbound(folder.db(OUTBOUND_DB, create=True))
                outbound.clear_tool_state(folder.db(OUTBOUND_DB))  # a dead agent's tool is over
                row = self.registry.session(t.session_id)
                if row is not None:
                    self.sessions.write_routing(row, folder.db(INBOUND_DB))
            settings = self.settings(t.agent_group)
            egress = self.egress.admit(t.agent_group, t.session_id)
            handle = await self.runtime.start(SessionRef(t.agent_group, t.session_id,
                                                         t.paths.root, settings, egress))
            due_since = self._due_since(t, now)  # a metric: read after the spawn, not before
            if not handle.adopted:
                self.registry.record_agent_settings(t.session_id, t.agent_group,
                                                    settings.digest, settings.image)
        except Exception as exc:  # noqa: BLE001 - the next pass decides what a failure means
            self.notify("agent_start", {"result": "error", "seconds": 0.0,
                                        "agent_group": t.agent_group})
            delay = t.start.failed(now, self.cfg.runtime.start_retry_max)
            if not isinstance(exc, RuntimeUnavailable) and not host_storage_failure(exc):
                # this session's own obstacle (e.g. a directory where .heartbeat
                # belongs), not an outage of the runtime: it counts towards max_tries
                t.start.own_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            # once per session; not at all for an outage the runtime already reported
            loud = t.said.say("start", "failing") and not (
                isinstance(exc, RuntimeUnavailable) and exc.reported)
            log = logger.error if loud else logger.debug
            log("session {}: cannot start agent: {} (work stays pending; retrying in {:g}s)",
                t.session_id, exc, delay)
            return
        if t.start.failures:
            logger.info("session {}: agent started after {} failed attempts", t.session_id,
                        t.start.failures)
        t.start.succeeded()
        t.said.clear("start")
        t.started_at = self.clock()
        self.notify("agent_start", {"result": "ok", "agent_group": t.agent_group,
                                    "seconds": (t.started_at - now).total_seconds(),
                                    "waited": (now - due_since).total_seconds()
                                    if due_since else None})
        t.evidence.agent_started()
        t.read.sigs.pop("hb", None)
        reason = ("adopted the agent already running" if handle.adopted
                  else f"agent started, {t.evidence.due} message(s) due")
        self.statuses.set(t, Status.RUNNING, reason, t.started_at)

    @staticmethod
    def _due_since(t: Tracked, now: datetime) -> datetime | None:
        """When the work this start is for became due (the admission wait's start, for
        the metrics); None when there is none (an answer owed) or it cannot be read."""
        try:
            return inbound.oldest_due_at(t.paths.inbound_db, now)
        except (sqlite3.Error, OSError, ValueError):
            return None

    async def _pause(self, t: Tracked, reason: str) -> None:
        """Freeze an idle agent. Paused is a detail of ``idle`` (the contract's three
        statuses stay), recorded as the status reason: ``paused after …``."""
        await self.runtime.pause(t.session_id)
        self.statuses.set(t, t.status, reason, self.clock())

    async def _resume(self, t: Tracked, reason: str) -> None:
        await self.runtime.resume(t.session_id)
        t.evidence.resumed_at = self.clock()
        self.statuses.set(t, t.status, reason, t.evidence.resumed_at)

    @staticmethod
    def unblock(t: Tracked) -> bool:
        """Lift the backoff of failed starts/ops (the runtime says it is back).

        The failure counts stay: if the runtime fails again at once, the next
        delay is still the longer one, so a flapping daemon cannot cause a hot loop.
        """
        lifted = t.start.unblock()
        return t.ops.unblock() or lifted

    # --- timers -------------------------------------------------------------------

    def _schedule(self, t: Tracked, when: datetime | None, now: datetime) -> None:
        """Make sure a pass runs at ``when`` (an earlier timer already set is kept)."""
        t.timer.schedule(when, now, self._fire, t)

    def _fire(self, t: Tracked) -> None:
        t.timer.fired()
        self.mark(t.session_id, Flag.TIMER)

    @staticmethod
    def cancel_timers(tracked: Iterable[Tracked]) -> None:
        for t in tracked:
            t.timer.cancel()

    async def drain_ops(self, timeout: float) -> None:
        if self._ops:
            await asyncio.wait(list(self._ops), timeout=timeout)
        await self.space.drain(timeout)
