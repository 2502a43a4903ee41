"""Delivery: new ``messages_out`` rows → channel → ``delivered`` → outbox cleaned.

Work is proportional to what changed: each session keeps a seq watermark below
which every reply is settled, so a pass reads only newer rows. A reply is
delivered once: the supervisor runs one pass per session at a time, a settled
row is recorded in inbound.db (the source of truth across restarts), and the
channel is asked whether it already took a reply that a crash kept from being
recorded. Attempt counts live in the registry, so backoff survives restarts.

Outbox files are moved (never copied through a symlink) into
``<data_dir>/delivered/<message_id>/`` before the channel sees the reply.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from loguru import logger

from orchestrator.attachments import safe_name
from orchestrator.channels import Channel, DeliveryError, Reply, StorageFull
from orchestrator.channels.base import storage_failure
from orchestrator.config import DeliveryConfig
from orchestrator.layout import InvalidId, SessionPaths, delivered_root
from orchestrator.lifecycle import delivery_backoff, earliest
from orchestrator.store import inbound
from orchestrator.store.outbound import OutMessage
from orchestrator.store.registry import Registry


@dataclass
class DeliveryState:
    """Per-session memory; losing it (restart) only costs one full read."""

    watermark: int = 0  # every reply with seq <= watermark is settled
    # replies whose listed files are not (all) in outbox/ yet → when first seen so
    waiting_files: dict[str, datetime] = field(default_factory=dict)
    storage_full: str | None = None  # the host's disk is full: last error, logged once


@dataclass
class PassResult:
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    next_due: datetime | None = None  # deliver_after or a retry coming due


class FilesNotReady(DeliveryError):
    """A listed file is not in ``outbox/<id>/`` yet: the agent may write the row first.

    Not a failed attempt: the reply waits (no backoff) and the next ``outbox/``
    event retries it at once; only after ``[delivery] files_wait`` does a
    missing file count as an attempt like any other failure.
    """


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


def move_files(paths: SessionPaths, data_dir: Path, out_id: str, names: list[str]) -> list[Path]:
    """Move ``outbox/<out_id>/<name>`` into ``delivered/<out_id>/``; idempotent.

    Refuses (raises FilesNotReady) a name that is not a plain basename, a
    symlink, or anything but a regular file: nothing outside the session folder
    is ever read through a link the agent planted.
    """
    try:
        src_dir = paths.outbox_dir(out_id)
    except InvalidId as exc:  # the agent named a reply like a path: refuse it
        raise DeliveryError(f"reply {out_id!r}: {exc}") from None
    dst_dir = delivered_root(data_dir) / out_id
    moved: list[Path] = []
    if names and (paths.outbox.is_symlink() or src_dir.is_symlink()):
        raise DeliveryError(f"reply {out_id}: outbox/{out_id} is a symlink; refusing to follow it")
    for name in names:
        if safe_name(name, 0) != name:
            raise DeliveryError(f"reply {out_id}: refusing file name {name!r} (must be a basename)")
        dst = dst_dir / name
        src = src_dir / name
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            if dst.is_file() and not dst.is_symlink():
                moved.append(dst)  # moved by an earlier pass that crashed before recording
                continue
            raise FilesNotReady(f"reply {out_id}: file {name!r} is not in outbox/{out_id}/ yet")
        if not stat.S_ISREG(st.st_mode):
            raise DeliveryError(f"reply {out_id}: outbox/{out_id}/{name} is not a regular file "
                                "(symlinks are never followed)")
        try:
            dst_dir.mkdir(parents=True, exist_ok=True)
            _move_file(src, dst)
        except OSError as exc:
            error = StorageFull if storage_failure(exc) else DeliveryError
            raise error(f"reply {out_id}: cannot move {name!r} to {dst_dir} "
                        f"({exc.strerror or exc})") from None
        moved.append(dst)
    return moved


def _move_file(src: Path, dst: Path) -> None:
    """Rename; across file systems copy under a hidden name first, so ``delivered/``
    never holds a half-copied file (a full disk mid-copy leaves nothing)."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    part = dst.with_name(f".part-{dst.name}")
    try:
        shutil.copyfile(src, part, follow_symlinks=False)  # the bytes, never a link
        os.rename(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.unlink(src)


Route = tuple[str | None, str | None, str | None]  # channel_type, platform_id, thread_id


def reply_route(own: Route, answered: Route | None, default: Route) -> Route:
    """Where a reply goes: where the agent said; a reply with no chat of its own goes
    back to the chat of the message it answers; else each field missing from the
    reply comes from the session's default route (``session_routing``)."""
    if not (own[0] or own[1]) and answered is not None and (answered[0] or answered[1]):
        return answered
    return (own[0] or default[0], own[1] or default[1], own[2] or default[2])


def remove_outbox(paths: SessionPaths, out_id: str) -> None:
    try:
        target = paths.outbox_dir(out_id)
    except InvalidId:
        return  # not a folder name: nothing of ours to clean (never rmtree "../x")
    try:
        if paths.outbox.is_symlink():  # rmtree would delete what the link points at
            logger.warning("{}: is a symlink; not cleaning up through it", paths.outbox)
            return
        if target.is_symlink():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    except OSError as exc:
        logger.warning("{}: could not clean up ({})", target, exc.strerror)


@dataclass
class Deliverer:
    data_dir: Path
    registry: Registry
    channel: Channel
    cfg: DeliveryConfig

    async def run_pass(self, *, paths: SessionPaths, agent_group: str, session_id: str,
                       state: DeliveryState, messages: list[OutMessage],
                       routing: tuple[str | None, str | None, str | None],
                       now: datetime) -> PassResult:
        """Deliver what is due among ``messages`` (seq > watermark, ascending)."""
        result = PassResult()
        if not messages:
            return result
        settled = inbound.delivered_ids(paths.inbound_db, [m.id for m in messages])
        records: list[tuple[str, str, str | None]] = []
        retried: list[str] = []
        for msg in messages:
            if msg.id in settled:
                continue
            if msg.deliver_after and msg.deliver_after > now:
                result.next_due = earliest(result.next_due, msg.deliver_after)
                continue
            attempts, next_at = self.registry.delivery_attempt(session_id, msg.id)
            if next_at and next_at > now:
                result.next_due = earliest(result.next_due, next_at)
                continue
            try:
                pmid = await self._deliver_one(paths, agent_group, session_id, msg, routing)
            except StorageFull as exc:  # the host's disk: no attempt spent; the rest would
                self._storage_full(state, session_id, exc, now, result)  # fail the same way
                break
            except FilesNotReady as exc:
                give_up_at = self._files_deadline(state, msg.id, now)
                if give_up_at > now:
                    logger.debug("reply {} of session {}: {}; waiting", msg.id, session_id, exc)
                    result.next_due = earliest(result.next_due, give_up_at)
                    continue
                self._failed_attempt(session_id, msg.id, attempts, exc, now, result, records,
                                     retried)
                continue
            except DeliveryError as exc:
                self._failed_attempt(session_id, msg.id, attempts, exc, now, result, records,
                                     retried)
                continue
            state.waiting_files.pop(msg.id, None)
            if state.storage_full:
                logger.info("session {}: delivering again ({})", session_id, "space freed")
                state.storage_full = None
            records.append((msg.id, "delivered", pmid))
            result.delivered.append(msg.id)
            if attempts:
                retried.append(msg.id)
        if records:
            inbound.record_deliveries(paths.inbound_db, records, now)
            settled.update(mid for mid, _, _ in records)
            for mid, _, _ in records:
                remove_outbox(paths, mid)
            for mid in retried:
                self.registry.clear_attempts(session_id, mid)
        for msg in messages:  # advance over the settled prefix only
            if msg.id not in settled:
                break
            state.watermark = msg.seq
        for mid in settled:
            state.waiting_files.pop(mid, None)
        return result

    def _storage_full(self, state: DeliveryState, session_id: str, exc: Exception,
                      now: datetime, result: PassResult) -> None:
        if str(exc) != state.storage_full:  # once per outage, not per reply and retry
            logger.warning("session {}: {}; replies wait (no attempts spent) and are "
                           "retried every {:g}s", session_id, exc, self.cfg.retry_base)
            state.storage_full = str(exc)
        result.next_due = earliest(result.next_due,
                                   now + timedelta(seconds=max(self.cfg.retry_base, 0.5)))

    def _files_deadline(self, state: DeliveryState, out_id: str, now: datetime) -> datetime:
        since = state.waiting_files.setdefault(out_id, now)
        return since + timedelta(seconds=self.cfg.files_wait)

    def _failed_attempt(self, session_id: str, out_id: str, attempts: int, exc: Exception,
                        now: datetime, result: PassResult,
                        records: list[tuple[str, str, str | None]], retried: list[str]) -> None:
        """Count one failed attempt: back off, or record ``failed`` at ``max_attempts``."""
        attempts += 1
        if attempts >= self.cfg.max_attempts:
            logger.error("reply {} of session {}: giving up after {} attempts: {}",
                         out_id, session_id, attempts, exc)
            records.append((out_id, "failed", None))
            result.failed.append(out_id)
            retried.append(out_id)
            return
        retry_at = now + timedelta(seconds=delivery_backoff(attempts, self.cfg.retry_base))
        try:
            self.registry.record_attempt_failure(session_id, out_id, attempts, retry_at,
                                                 str(exc))
        except sqlite3.Error as rec:  # e.g. a full disk: an attempt not recorded is not made
            logger.warning("reply {} of session {}: attempt failed ({}) and could not be "
                           "counted ({}); retry at {}", out_id, session_id, exc, rec,
                           retry_at.time())
        else:
            logger.warning("reply {} of session {}: attempt {} failed ({}); retry at {}",
                           out_id, session_id, attempts, exc, retry_at.time())
        result.next_due = earliest(result.next_due, retry_at)

    async def _deliver_one(self, paths: SessionPaths, agent_group: str, session_id: str,
                           msg: OutMessage,
                           routing: tuple[str | None, str | None, str | None]) -> str | None:
        try:
            taken = self.channel.already_delivered(msg.id)
        except DeliveryError:
            raise
        except Exception as exc:  # a channel bug is a failed attempt, not a crash
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if taken:
            logger.info("reply {} was taken by the channel before a restart; recording it", msg.id)
            return None
        content = _parse_content(msg.content, msg.id)
        files = move_files(paths, self.data_dir, msg.id, listed_files(content))
        answered = (inbound.chat_of(paths.inbound_db, msg.in_reply_to)
                    if msg.in_reply_to and not (msg.channel_type or msg.platform_id) else None)
        channel_type, platform_id, thread_id = reply_route(
            (msg.channel_type, msg.platform_id, msg.thread_id), answered, routing)
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

