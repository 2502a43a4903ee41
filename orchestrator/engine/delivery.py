"""Delivery: new ``messages_out`` rows → channel → ``delivered`` → outbox cleaned.

Work is proportional to what changed: each session keeps a seq watermark below
which every reply is settled, so a pass reads only newer rows. A reply is
delivered once: the supervisor runs one pass per session at a time, a settled
row is recorded in inbound.db (the source of truth across restarts), and the
channel is asked whether it already took a reply that a crash kept from being
recorded. Attempt counts live in the registry, so backoff survives restarts.

Outbox files are moved (never copied through a symlink) into
``<data_dir>/delivered/<message_id>/`` before the channel sees the reply
(``reply_files``: the part that touches the agent's files). What to
do with each reply is decided by ``delivery_plan`` (pure); this module gathers
the facts and applies the verdict. A reply that ends failed is recorded
``failed`` and reported to the channel (``Channel.report_failure``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from loguru import logger

from orchestrator.channels import (
    Channel,
    DeliveryError,
    Failure,
    InFlight,
    PermanentDeliveryError,
    Reply,
    StorageFull,
)
from orchestrator.config.sections import DeliveryConfig
from orchestrator.contract.layout import INBOUND_DB, OUTBOX
from orchestrator.engine.outbox_janitor import INLINE_OPS, OutboxJanitor
from orchestrator.engine.reply_files import FilesNotReady, id_problem, move_files
from orchestrator.host import inbound
from orchestrator.host.outbound import OutMessage
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.treeremove import remove_tree
from orchestrator.rules.delivery_plan import (
    Plan,
    ReplyFacts,
    Step,
    Trouble,
    after_failure,
    deliverable_since,
    plan,
)
from orchestrator.rules.lifecycle import earliest
from orchestrator.support.logonce import LogOnce

Routing = tuple[str | None, str | None, str | None]  # the session's default route


@dataclass(slots=True)
class DeliveryState:
    """Per-session memory; losing it (restart, a replaced file) only costs one full read."""

    watermark: int = 0  # every reply with seq <= watermark is settled
    anchor: str | None = None  # id of the row at ``watermark``: gone = file replaced
    # replies whose listed files are not (all) in outbox/ yet → when first seen so
    waiting_files: dict[str, datetime] = field(default_factory=dict)
    # the host's disk is full (key "storage_full": the last error), said once per outage
    said: LogOnce = field(default_factory=LogOnce)
    # ids above ``watermark`` this run has settled itself; None = not known yet (a new
    # state: read from inbound.db once, then kept here — the host is its only writer)
    settled: set[str] | None = None


@dataclass
class PassResult:
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    next_due: datetime | None = None  # deliver_after or a retry coming due


def _trouble(exc: DeliveryError) -> Trouble:
    if isinstance(exc, PermanentDeliveryError):
        return Trouble.PERMANENT
    if isinstance(exc, FilesNotReady):
        return Trouble.FILES_NOT_READY
    return Trouble.TRANSIENT


def _parse_content(raw: str, out_id: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        logger.warning("reply {}: content is not JSON; delivering it as raw text", out_id)
        return raw


def listed_files(content: object) -> list[str]:
    """The file names a reply declares in ``content.files`` (names only, no paths)."""
    if isinstance(content, dict) and isinstance(content.get("files"), list):
        return [f for f in content["files"] if isinstance(f, str)]
    return []


Route = tuple[str | None, str | None, str | None]  # channel_type, platform_id, thread_id


def reply_route(own: Route, answered: Route | None, default: Route) -> Route:
    """Where a reply goes: where the agent said; a reply with no chat of its own goes
    back to the chat of the message it answers; else each field missing from the
    reply comes from the session's default route (``session_routing``)."""
    if not (own[0] or own[1]) and answered is not None and (answered[0] or answered[1]):
        return answered
    return (own[0] or default[0], own[1] or default[1], own[2] or default[2])


def remove_outboxes(folder: SessionDir, out_ids: list[str], budget: int = INLINE_OPS) -> list[str]:
    """Remove ``outbox/<id>`` of settled replies by descriptor (``outbox/`` opened once;
    a link is removed, never its target), at most ``budget`` operations in all, on the
    loop. Returns the ids not finished within it: for the ``OutboxJanitor``."""
    ids = [i for i in out_ids if not id_problem(i)]  # not a folder name: never touch "../x"
    if not ids:
        return []
    try:
        outbox = folder.open_dir(OUTBOX)
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("{}/{}: not cleaning up ({})", folder.where, OUTBOX, exc.strerror)
        return []
    left: list[str] = []
    try:
        for out_id in ids:
            if budget <= 0:
                left.append(out_id)
                continue
            r = remove_tree(outbox, out_id, budget)
            budget -= r.ops
            if r.stuck is not None:
                logger.warning("{}/{}/{}: could not clean up ({})", folder.where, OUTBOX,
                               out_id, r.stuck)
            elif not r.done:
                left.append(out_id)
    finally:
        os.close(outbox)
    return left


@dataclass
class _Pass:
    """One ``run_pass``: what it was given and what it has decided so far."""

    folder: SessionDir
    agent_group: str
    session_id: str
    state: DeliveryState
    routing: Routing
    now: datetime
    result: PassResult = field(default_factory=PassResult)
    records: list[tuple[str, str, str | None]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # settled after failed attempts


def _advance_watermark(state: DeliveryState, messages: list[OutMessage],
                       settled: set[str]) -> None:
    for msg in messages:  # advance over the settled prefix only
        if msg.id not in settled:
            break
        settled.discard(msg.id)  # at or below the watermark: never read again
        state.watermark = msg.seq
        state.anchor = msg.id


@dataclass
class Deliverer:
    data_dir: Path
    registry: Registry
    channel: Channel
    cfg: DeliveryConfig
    janitor: OutboxJanitor = field(default=None)  # type: ignore[assignment]
    rand: Callable[[], float] = random.random  # the backoff's jitter

    def __post_init__(self) -> None:
        if self.janitor is None:
            self.janitor = OutboxJanitor(self.data_dir)

    async def aclose(self) -> None:
        await self.janitor.aclose()

    async def run_pass(self, *, folder: SessionDir, agent_group: str, session_id: str,
                       state: DeliveryState, messages: list[OutMessage], routing: Routing,
                       now: datetime, acks: dict[str, str] | None = None,
                       follow_up: inbound.FollowUp | None = None) -> PassResult:
        """Deliver what is due among ``messages`` (seq > watermark, ascending), and
        record it with the agent's final ``acks`` mirrored in the same commit.

        For each reply: gather the facts, ask ``delivery_plan.plan``, apply it; a
        failed attempt goes through ``delivery_plan.after_failure``. Everything the
        pass settles costs one fsync'd commit of inbound.db, however many replies.
        """
        run = _Pass(folder, agent_group, session_id, state, routing, now)
        inbound_db = folder.db(INBOUND_DB)
        if state.settled is None:
            state.settled = inbound.delivered_ids(inbound_db, [m.id for m in messages])
        settled = state.settled
        attempts_of = (self.registry.delivery_attempts(session_id)
                       if any(m.id not in settled for m in messages) else {})
        for msg in messages:
            if msg.id in settled:
                continue
            attempts, retry_at = attempts_of.get(msg.id, (0, None))
            if not await self._one_reply(run, msg, attempts, retry_at):
                break
        for failure in run.failures:  # before the record: a crash re-reports (jsonl dedupes)
            await self.report(failure)
        if run.records or acks:
            inbound.settle(inbound_db, run.records, acks or {}, follow_up, now)
            settled.update(mid for mid, _, _ in run.records)
            left = remove_outboxes(folder, [mid for mid, _, _ in run.records])
            if left:  # more than a few entries: in the background, off the loop
                self.janitor.submit(agent_group, session_id, left)
            for mid in run.retried:
                self.registry.clear_attempts(session_id, mid)
        _advance_watermark(state, messages, settled)
        for mid, _, _ in run.records:
            state.waiting_files.pop(mid, None)
        return run.result

    async def _one_reply(self, run: _Pass, msg: OutMessage, attempts: int,
                         retry_at: datetime | None) -> bool:
        """Plan one unsettled reply and apply the verdict; False ends the pass."""
        verdict = plan(ReplyFacts(problem=msg.problem or id_problem(msg.id),
                                  deliver_after=msg.deliver_after, attempts=attempts,
                                  retry_at=retry_at), run.now)
        if verdict.step is Step.TRY:
            try:
                pmid = await self._deliver_one(run.folder, run.agent_group, run.session_id,
                                               msg, run.routing)
            except InFlight:
                return True  # the channel wakes this session when the outcome is known
            except StorageFull as exc:  # the host's disk: no attempt spent; the rest
                self._storage_full(run.state, run.session_id, exc, run.now, run.result)
                return False  # would fail too
            except DeliveryError as exc:
                verdict = self._after_failure(run, msg, attempts, exc)
            else:
                self._delivered(run, msg, attempts, pmid)
                return True
        if verdict.step is Step.WAIT:
            run.result.next_due = earliest(run.result.next_due, verdict.at)
        elif verdict.step is Step.RETRY:
            self._retry_later(run, msg, attempts, verdict)
        elif verdict.step is Step.FAIL:
            self._fail(run, msg, attempts, verdict)
        return True

    def _after_failure(self, run: _Pass, msg: OutMessage, attempts: int,
                       exc: DeliveryError) -> Plan:
        verdict = after_failure(_trouble(exc), str(exc), attempts,
                                run.state.waiting_files.get(msg.id), run.now, self.cfg,
                                retry_after=exc.retry_after,
                                since=deliverable_since(msg.timestamp, msg.deliver_after),
                                rand=self.rand())
        if verdict.step is Step.WAIT:
            run.state.waiting_files.setdefault(msg.id, run.now)
            logger.debug("reply {} of session {}: {}; waiting", msg.id, run.session_id, exc)
        return verdict

    @staticmethod
    def _delivered(run: _Pass, msg: OutMessage, attempts: int, pmid: str | None) -> None:
        run.state.waiting_files.pop(msg.id, None)
        if run.state.said.clear("storage_full") is not None:
            logger.info("session {}: delivering again (space freed)", run.session_id)
        run.records.append((msg.id, "delivered", pmid))
        run.result.delivered.append(msg.id)
        if attempts:
            run.retried.append(msg.id)

    def _retry_later(self, run: _Pass, msg: OutMessage, attempts: int, verdict: Plan) -> None:
        logger.warning("reply {} of session {}: attempt {} failed ({}); retry at {}",
                       msg.id, run.session_id, attempts + 1, verdict.reason,
                       verdict.at.time() if verdict.at else None)
        try:
            self.registry.record_attempt_failure(run.session_id, msg.id, attempts + 1,
                                                 verdict.at, verdict.reason)
        except sqlite3.Error as rec:  # a full disk: an attempt not recorded is not made
            logger.warning("reply {} of session {}: the failed attempt could not be "
                           "counted ({})", msg.id, run.session_id, rec)
        run.result.next_due = earliest(run.result.next_due, verdict.at)

    def _fail(self, run: _Pass, msg: OutMessage, attempts: int, verdict: Plan) -> None:
        logger.error("reply {} of session {} failed: {}", msg.id, run.session_id, verdict.reason)
        run.records.append((msg.id, "failed", None))
        run.result.failed.append(msg.id)
        run.failures.append(self._failure(run.folder, msg, run.agent_group, run.session_id,
                                          verdict.reason, run.routing))
        if attempts:
            run.retried.append(msg.id)

    @staticmethod
    def _route(folder: SessionDir, msg: OutMessage, routing: Routing) -> Route:
        answered = (inbound.chat_of(folder.db(INBOUND_DB), msg.in_reply_to)
                    if msg.in_reply_to and not (msg.channel_type or msg.platform_id) else None)
        return reply_route((msg.channel_type, msg.platform_id, msg.thread_id), answered,
                           routing)

    def _failure(self, folder: SessionDir, msg: OutMessage, agent_group: str,
                 session_id: str, reason: str, routing: Routing) -> Failure:
        """Routed like the reply would have been, so the chat that waits for it hears."""
        channel_type, platform_id, thread_id = self._route(folder, msg, routing)
        return Failure("reply", msg.id, session_id, agent_group, reason, channel_type,
                       platform_id, thread_id)

    def _storage_full(self, state: DeliveryState, session_id: str, exc: Exception,
                      now: datetime, result: PassResult) -> None:
        if state.said.say("storage_full", str(exc)):  # once per outage, not per reply
            logger.warning("session {}: {}; replies wait (no attempts spent) and are "
                           "retried every {:g}s", session_id, exc, self.cfg.retry_base)
        result.next_due = earliest(result.next_due,
                                   now + timedelta(seconds=max(self.cfg.retry_base, 0.5)))

    async def report(self, failure: Failure) -> None:
        """One failure record on the channel; a channel that raises is logged (the
        failure itself is already final)."""
        try:
            await self.channel.report_failure(failure)
        except Exception as exc:  # noqa: BLE001 - a channel bug must not undo the failure
            logger.error("could not report the failure of {} {} to the channel: {}",
                         failure.kind, failure.id, exc)

    async def _deliver_one(self, folder: SessionDir, agent_group: str, session_id: str,
                           msg: OutMessage, routing: Routing) -> str | None:
        try:
            taken = self.channel.already_delivered(msg.id)
        except DeliveryError:
            raise
        except Exception as exc:  # a channel bug is a failed attempt, not a crash
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if taken:
            logger.info("reply {} was taken by the channel already (before a restart, or its "
                        "record could not be written then); recording it", msg.id)
            return None
        content = _parse_content(msg.content, msg.id)
        names = listed_files(content)
        if len(names) > INLINE_OPS // 4:  # thousands of names: the moves off the loop
            files = await asyncio.to_thread(move_files, folder, self.data_dir, msg.id, names)
        else:
            files = move_files(folder, self.data_dir, msg.id, names)
        channel_type, platform_id, thread_id = self._route(folder, msg, routing)
        reply = Reply(
            message_id=msg.id, session_id=session_id, agent_group=agent_group, seq=msg.seq,
            kind=msg.kind, in_reply_to=msg.in_reply_to,
            channel_type=channel_type, platform_id=platform_id, thread_id=thread_id,
            timestamp=msg.timestamp, content=content, files=tuple(str(f) for f in files))
        try:
            return await self.channel.deliver(reply)
        except DeliveryError:
            raise
        except Exception as exc:  # a channel bug is a failed attempt, not a crash
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
