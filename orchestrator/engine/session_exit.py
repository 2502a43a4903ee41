"""An agent's end and the work it leaves, as a part of ``SessionWorker``.

- an exit: the run's usage recorded, the status set to ``stopped``;
- claims (and acked-but-unanswered messages) of an agent that died mid-message:
  given back for a retry, or failed at ``max_tries``;
- due work whose agent can never start: failed now, not left waiting;
- each failed message told to its channel (``Failure``) before the write.

A mixin only to keep ``session_worker.py`` about the pass and its decisions; it has
no state of its own.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from loguru import logger

from orchestrator.channels import Failure
from orchestrator.config.groups import AgentSettings
from orchestrator.config.model import Config
from orchestrator.contract.layout import INBOUND_DB, OUTBOUND_DB
from orchestrator.contract.session_status import Status
from orchestrator.engine.delivery import Deliverer
from orchestrator.engine.ports import Notify, StatusBook
from orchestrator.engine.tracked import Tracked
from orchestrator.host import inbound, outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.rules import answers
from orchestrator.runtime.base import AgentExit, Usage
from orchestrator.support.errors import host_storage_failure


class ExitMixin:
    # SessionWorker's, used here (see session_worker.py)
    cfg: Config
    registry: Registry
    deliverer: Deliverer
    statuses: StatusBook
    notify: Notify

    if TYPE_CHECKING:
        def settings(self, agent_group: str) -> AgentSettings: ...
        def _successor(self, now: datetime) -> Callable[[dict], inbound.NewMessage | None]: ...

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
