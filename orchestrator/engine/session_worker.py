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

What a pass reads is in ``session_reads.py``, an exit and the work it leaves in
``session_exit.py``, the runtime operations in ``session_ops.py`` (mixins of
``SessionWorker``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta
from typing import Callable, Iterable

from loguru import logger

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
from orchestrator.engine.session_exit import ExitMixin
from orchestrator.engine.session_ops import OpsMixin
from orchestrator.engine.session_reads import ReadsMixin
from orchestrator.engine.space_watch import SpaceWatch
from orchestrator.engine.tracked import Flag, Flags, Tracked, trusted_stamp
from orchestrator.host import commit_mark, inbound
from orchestrator.host.kept_dbs import KeptDbs
from orchestrator.host.outbound import OutboundError
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import FolderStat, Refused, SessionDir
from orchestrator.host.sessions import Sessions
from orchestrator.rules import answers, scheduling
from orchestrator.rules.lifecycle import (
    Action,
    Observation,
    Verdict,
    decide,
)
from orchestrator.runtime.base import Runtime
from orchestrator.watch.muted import Muted

# s; a busy database is retried shortly, backing off to … (2 ms, not 20: a pass started
# by a commit's end often finds the writer still holding its lock for a moment, and no
# event follows; a 20 ms first retry was the replies' p99 during a prune, issue 26)
BUSY_RETRY_FIRST = 0.002
BUSY_RETRY_MAX = 1.0  # … at most this (its own commit's inotify event comes sooner)
KEEPS = Flag.OUTBOUND | Flag.OUTBOX  # a pass for these keeps its connections (kept_dbs)
BUSY_SAY_AFTER = 9  # retries: 2+4+…+256 ms ≈ 0.5 s locked before an info line says so


# what a stat-gated look compares with the last pass: (key in sigs, file, flag)
_WATCHED = (("hb", HEARTBEAT, Flag.HEARTBEAT), ("out", OUTBOUND_DB, Flag.OUTBOUND),
            ("in", INBOUND_DB, Flag.INBOUND))
_QUIET = _WATCHED[1:]


class SessionWorker(ReadsMixin, ExitMixin, OpsMixin):
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
        self.kept = KeptDbs()  # the busiest sessions' database connections (kept_dbs)
        self._touches: dict[str, tuple[datetime | None, datetime | None]] = {}
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
        muted = t.session_id in self.muted
        quiet = self._quiet(t, flags) if muted else False
        if quiet:
            return
        try:
            # the folder by descriptor, reached without following a link: every file of
            # this pass is opened relative to it (safefs); a linked folder is Refused.
            # (Opened once: the commit mark of a quiet pass is read through it too.)
            # Connections are kept for a pass an agent's write caused, not for full or
            # sweep passes: a first start's pass over each of 100 000 sessions kept
            # every one's and evicted another's (242 CPU-s until all were passed).
            with SessionDir(self.cfg.data_dir, t.agent_group, t.session_id,
                            kept=self.kept if flags & KEEPS else None) as folder:
                if quiet is None and self._unchanged(t, folder):
                    return
                if muted:  # unmute first, then read: no touch falls between
                    self.muted.discard(t.session_id)
                    flags |= Flag.HEARTBEAT
                if self._replaced(t, folder):
                    flags |= Flag.FULL
                await self._pass(t, folder, flags, now)
            if t.read.busy:
                logger.debug("session {}: its databases answer again", t.session_id)
                t.read.busy = 0
            if t.said.clear("pass") is not None:
                logger.info("session {}: readable again", t.session_id)
        except (OutboundError, sqlite3.Error, OSError) as exc:
            self.muted.discard(t.session_id)  # (the folder could not even be opened)
            self._unreadable(t, exc, now)
        except Exception as exc:  # noqa: BLE001 - a bug or a hostile folder: kept to this session
            self.muted.discard(t.session_id)
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

    def _quiet(self, t: Tracked, flags: Flags) -> bool | None:
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

        Anything else (a timer, an exit, ``outbox/``, a sweep) takes the whole pass.
        None: skipped only if ``_unchanged`` (the folder open) says no commit came."""
        if flags & ~(Flag.OUTBOUND | Flag.INBOUND) or not self.runtime.is_running(t.session_id):
            return False
        if not flags & Flag.OUTBOUND:
            return True
        kept = self._marks.get(t.session_id)
        state = t.delivery
        if kept is None or kept[1] is not state or state.waiting_files \
                or state.watermark < t.read.max_seq_seen:
            return False
        return None

    def _unchanged(self, t: Tracked, folder: SessionDir) -> bool:
        """No commit to outbound.db since its last complete read (``_quiet``)."""
        kept = self._marks.get(t.session_id)
        return kept is not None and commit_mark.unchanged(
            kept[0], commit_mark.mark(folder.fd, OUTBOUND_DB))

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
        """A database of this session is locked (by its agent, a reader of inbound.db, or
        a ``send`` / API write: a new session's first pass often meets its first
        message's commit): nothing waited for it; the pass runs again shortly, backing
        off. Said once at debug level; at info once the lock has lasted ``BUSY_SAY_AFTER``
        retries (~0.5 s), the only streaks an operator needs to hear of."""
        t.read.busy += 1
        delay = min(BUSY_RETRY_MAX, BUSY_RETRY_FIRST * 2 ** (t.read.busy - 1))
        if t.read.busy == 1:
            logger.debug("session {}: a database is busy (locked by its agent or another "
                         "writer); retrying shortly", t.session_id)
        elif t.read.busy == BUSY_SAY_AFTER:
            logger.info("session {}: a database is busy for {} tries now (locked by its agent "
                        "or another writer); still retrying", t.session_id, t.read.busy)
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

    # --- timers -------------------------------------------------------------------

    def _schedule(self, t: Tracked, when: datetime | None, now: datetime) -> None:
        """Make sure a pass runs at ``when`` (an earlier timer already set is kept)."""
        t.timer.schedule(when, now, self._fire, t)

    def _fire(self, t: Tracked) -> None:
        t.timer.fired()
        self.mark(t.session_id, Flag.TIMER)

    def forget(self, session_id: str) -> None:
        """A session leaves (retention): its kept connections are closed now."""
        self.kept.drop_session(session_id)

    @staticmethod
    def cancel_timers(tracked: Iterable[Tracked]) -> None:
        for t in tracked:
            t.timer.cancel()
