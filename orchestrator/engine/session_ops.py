"""The runtime operations a verdict asks for, as a part of ``SessionWorker``.

Start (with its space check, the folder's preparation and the gateway's token),
stop, kill, pause and resume run as tasks (``_run_op``), so one slow container
never delays another session's replies; a failure backs off and the op's end
marks the session dirty again.

A mixin only to keep ``session_worker.py`` about the pass and its decisions; it has
no state of its own (``SessionWorker.__init__`` makes ``_ops`` and ``space``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from loguru import logger

from orchestrator.config.groups import AgentSettings
from orchestrator.config.model import Config
from orchestrator.contract import schema
from orchestrator.contract.layout import HEARTBEAT, INBOUND_DB, OUTBOUND_DB
from orchestrator.contract.session_status import Status
from orchestrator.engine.ports import Admission, EgressPort, Mark, Notify, StatusBook
from orchestrator.engine.space_watch import SpaceRefused, SpaceWatch
from orchestrator.engine.tracked import Flag, Tracked
from orchestrator.host import inbound, outbound
from orchestrator.host.registry import Registry
from orchestrator.host.safefs import SessionDir
from orchestrator.host.sessions import Sessions
from orchestrator.runtime.base import Runtime, RuntimeUnavailable, SessionRef
from orchestrator.support.errors import host_storage_failure


class OpsMixin:
    # SessionWorker's, used here (see session_worker.py)
    cfg: Config
    registry: Registry
    sessions: Sessions
    runtime: Runtime
    clock: Callable[[], datetime]
    mark: Mark
    statuses: StatusBook
    admission: Admission
    notify: Notify
    egress: EgressPort
    space: SpaceWatch
    _ops: set[asyncio.Task]

    if TYPE_CHECKING:
        def settings(self, agent_group: str) -> AgentSettings: ...

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

    async def drain_ops(self, timeout: float) -> None:
        if self._ops:
            await asyncio.wait(list(self._ops), timeout=timeout)
        await self.space.drain(timeout)
