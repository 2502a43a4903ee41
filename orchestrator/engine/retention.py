"""Retention in the running engine: the periodic sweep and removals by hand (issue 26.1).

The sweep's file work (move, facts, archive, tree removal: ``host.retention.FileSteps``)
runs in a worker *process* (one, started at the first sweep, ``nice`` 10 from the moment
it is spawned, killed by the kernel if the orchestrator dies: ``PR_SET_PDEATHSIG``), a batch of
``[retention] batch`` sessions per call, the loop resting between batches (``duty``).
A thread would do the same I/O, but its Python work (tar headers, the tree walk) holds
the interpreter lock: each time the loop thread wants it back it waits up to the switch
interval (5 ms), many times per reply; measured, a thread-run prune multiplied other
sessions' reply p99 by ~10.

The journal's registry transactions (``begin``: one per batch, ``end``: one per batch)
stay in this process, in a thread, on the engine's own registry connection. Measured
(strace of the loop thread): when the niced worker wrote them, the loop's registry
writes (``touch``) met SQLite's lock held by a process the scheduler had set aside and
slept in SQLite's busy handler (1, 2, 5, 10, 20 ms steps: 25 ms at p90), only while a
batch ran. Here the registry's lock is one between threads of one process (handed over
at once, held by a thread at full priority) and is held for a few statements per batch
(``removals.begin_many``, ``finish``).

The watch: each removal is ~8 inotify events (its group's ``IN_MOVED_FROM``, then the
moved folder's own watch, which follows it out of the tree, reporting each file's
removal and its end). Mixed into a live session's batch they made it a batch of
several sessions (no early end at a commit: ``watch.commits``) that every next removal
kept open until the debounce (50 ms). Measured (watch batches timed, a 2000-session
prune on a shared host): live batches holding removal events were held 17.5 ms at p50
and 53 ms at p99, the others 3.3 and 19 ms; that was the replies' p99 tail. So the
watch thread drops a retiring session's events (``FolderWatch.retiring``: the
supervisor's ``retiring`` set) and they hold no batch open; a removed session stays in
``retiring`` ``RETIRED_GRACE`` s longer for the events read after its batch settled.
The rest of the tail was 20 ms exactly: a reply's commit ended (its journal deleted:
the batch ends, ``watch.commits``), the pass found the writer still holding its lock,
and the session worker's first busy retry came 20 ms later (no event follows). That
happened 2-5 times as often during a prune (busy streaks: 36 in 181 s of a 10 000-
session prune against 8 in 192 s without; 13/66 s against 6/77 s for 3000 sessions;
why, not traced: likely the worker keeping a core busy, so that the watch and loop
threads wake on the writer's core between its commit and its unlock), and it was the
p99 once more than 1 % of the replies hit it; the first retry is now 2 ms
(``session_worker.BUSY_RETRY_FIRST``). The disk was the next suspect, not confirmed.
Kernel trace (tracefs: ``sched_wakeup``/``sched_switch`` of the orchestrator's threads,
``ext4_sync_file_enter``/``exit`` of every process involved; a 3000-session prune on
a shared 2-core host whose ext4 has no journal): the loop thread's run-queue waits
were the same during the prune and without it (p99 3.7 ms both); its ``fsync`` calls
(the inbound.db commits, made on the loop: a slow one holds every session's reply)
were 8.0 ms at p99 during against 6.9 ms without, with 13 over 30 ms against 3 (up
to 259 ms, on a host busy with a build). The slow ones went with the worker's own
``fsync`` calls (one per archive, each ending in a flush of the disk's write cache):
24 % of the loop's ``fsync`` calls over 10 ms overlapped one, against 3.7 % of the others, while the
worker spent 2.8 % of the prune in them. Its discards (``-o discard``: five per
session, in its unlinks) did not go with them. One ``syncfs`` per batch instead of
an ``fsync`` per archive (one flush, not eleven) was worse (commit p99 41.5 ms
against 37.2, the step 112 ms against 84: it writes everyone's dirty data), so the
archives keep their ``fsync`` each. Neither did an ``fsync`` of ``.removing`` after
each batch (its unlinks written at once, not left to the next live commit): p99 of a
live SQLite committer beside the real file steps, slots of 3-6 s alternating, three
runs, with/without it: 28.7/37.2, 35.0/31.4, 23.3/24.8 ms (idle: 28.6, 31.3, 24.6),
so it is not done. That same bench found the file steps hardly moving such a
committer's p99 at all on this host. And a quieter traced run (3000 sessions, load
1-2.6; replies' p99 5.2 ms without the prune, 8.8 during) had the loop thread's
``fsync`` calls (p99 4.5 ms during, 4.9 without; over 5 ms: 0.6 a second in both)
and its ``futex`` waits (the interpreter lock, the registry's lock: p99 2.4 against
2.6 ms) no worse during the prune. What is left of the prune's effect is then not
the loop waiting on the disk or on a lock; next to time: the watch thread's batches
of removal events and the loop's own CPU time for the sweep's bookkeeping. Only the
bookkeeping that must not interleave with the supervisor runs on the loop:

- ``detach``: a session is taken out of ``tracked`` (no more passes, its timer
  cancelled, its dirty mark dropped) and put in the supervisor's ``retiring`` set, so
  neither a watch event nor a discovery registers it again while its folder and rows
  move. A session with a pass under way, a pending mark, an operation (start, stop) or
  an agent is not detached: it is looked at again next sweep.
- ``reattach``: a session the host kept after all (work arrived) is tracked again with
  a full pass, as a session found on disk.

A removal by hand (``DELETE /v1/sessions/{id}``) stops a running agent first through
the worker (``request_stop``, as ``POST /v1/sessions/{id}/stop``), waits for it to be
gone, then removes as above.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import multiprocessing.context
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from loguru import logger

from orchestrator.config import groups
from orchestrator.config.model import Config
from orchestrator.contract.schema import format_ts, utcnow
from orchestrator.contract.session_status import Status
from orchestrator.engine.ports import Notify, notify_nobody
from orchestrator.engine.tracked import Tracked
from orchestrator.host.registry import Registry
from orchestrator.host.retention import (
    Item,
    Outcome,
    Retention,
    prune_delivered,
    remove_files,
)
from orchestrator.rules import retention as rules
from orchestrator.runtime.base import Runtime
from orchestrator.support.ticker import ticks

STOP_WAIT_EXTRA = 10.0  # s beyond stop_grace a removal by hand waits for the agent to go
# s a removed session stays in ``retiring`` after its removal: the watch thread drops
# its folder's events by that set (``FolderWatch.retiring``), and the last of them (its
# files' removal) may be read after the batch is settled on a busy host
RETIRED_GRACE = 2.0
PR_SET_PDEATHSIG = 1
WORKER_NICE = 10


def _worker_init(parent: int) -> None:
    """In the worker process: die with the orchestrator (a removal left running after a
    SIGKILL would race the next start's ``recover``); its priorities were lowered by
    the parent already (``_LowProcess``), again here where that could not be done."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's pipe closing ends it
        pass
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)
    lower_priority(0)


def lower_priority(pid: int) -> None:
    """Give the CPU to everything else first: ``nice`` 10. ``pid`` 0: this process.
    Not ``SCHED_IDLE``: tried, a prune on a host whose other programs kept both cores
    busy ran at 7 sessions/s instead of ~30 (it only ran when a core was idle). Not the
    idle I/O class either (``ionice -c3``): the worker's renames and unlinks join the
    file system journal's transaction that the live sessions' fsyncs commit, and
    idle-class writes that transaction must wait for would hold those fsyncs back (the
    bench run with it was not better)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(WORKER_NICE,
                                                 os.getpriority(os.PRIO_PROCESS, pid)))
    except OSError as exc:  # gone already, or a kernel without it: not worth failing for
        logger.debug("retention worker priority: {}", exc)


class _LowProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker whose priorities are lowered the moment it exists, by the
    parent: a spawned child first imports the orchestrator (a second of CPU) before it
    runs any code of ours, and that burst would otherwise compete at full priority."""

    def start(self) -> None:
        super().start()
        if self.pid is not None:
            lower_priority(self.pid)


class _LowContext(multiprocessing.context.SpawnContext):
    Process = _LowProcess


class Host(Protocol):
    """What retention needs of the supervisor."""

    tracked: dict[str, Tracked]
    retiring: set[str]
    in_pass: str | None
    ready: asyncio.Event
    stop_event: asyncio.Event

    def detach_session(self, session_id: str) -> None: ...

    def reattach_session(self, agent_group: str, session_id: str) -> None: ...

    def retired(self, agent_group: str, session_id: str) -> None: ...

    def stop_agent(self, session_id: str, reason: str) -> bool | None: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    session_id: str
    agent_group: str
    action: rules.Action
    settings: tuple[float, float]  # (archive_after, delete_after) of its group


def candidates(cfg: Config, registry: Registry, now: float) -> list[Candidate]:
    """Stopped, unqueued sessions inactive past their group's threshold, oldest first
    (the facts in their folders are checked at removal)."""
    out: list[tuple[float, Candidate]] = []
    rules_of: dict[str, tuple[float, float]] = {}
    for s in registry.sessions():
        if s.container_status != Status.STOPPED or s.queued_since is not None:
            continue
        settings = rules_of.get(s.agent_group_id)
        if settings is None:
            r = groups.resolve(cfg, s.agent_group_id).retention
            settings = rules_of[s.agent_group_id] = (r.archive_after, r.delete_after)
        rule = rules.threshold(*settings)
        if rule is None:
            continue
        times = [t.timestamp() for t in (s.last_active, s.last_heartbeat, s.created_at) if t]
        last = max(times) if times else 0.0
        if now - last >= rule[0]:
            out.append((last, Candidate(s.id, s.agent_group_id, rule[1], settings)))
    out.sort(key=lambda p: p[0])
    return [c for _, c in out]


class Retirement:
    """The sweep task and removals by hand over one running engine."""

    def __init__(self, cfg: Config, host: Host, runtime: Runtime, retention: Retention,
                 *, notify: Notify = notify_nobody,
                 on_removed: Callable[[list[str]], object] = lambda sids: None) -> None:
        self.cfg = cfg
        self.host = host
        self.runtime = runtime
        self.retention = retention
        self.notify = notify
        self.on_removed = on_removed  # the API's event log forgets them (worker thread)
        self.counts = {"archived": 0, "deleted": 0}
        self.last: dict[str, Any] = {}  # the last sweep: for status and the bench
        self._pool: ProcessPoolExecutor | None = None

    # --- detach / reattach (on the loop) -------------------------------------------

    def _busy(self, sid: str) -> bool:
        t = self.host.tracked.get(sid)
        if self.runtime.is_running(sid) or self.host.in_pass == sid:
            return True
        return t is not None and (t.status != Status.STOPPED or t.op_running())

    def _detach(self, c: Candidate) -> bool:
        if self._busy(c.session_id) or c.session_id in self.host.retiring:
            return False
        self.host.detach_session(c.session_id)
        return True

    def _settle(self, c: Candidate, outcome: Outcome, by: str) -> None:
        if outcome.action == "kept":
            self.host.retiring.discard(c.session_id)
            self.host.reattach_session(c.agent_group, c.session_id)
            return
        asyncio.get_running_loop().call_later(RETIRED_GRACE, self.host.retired,
                                              c.agent_group, c.session_id)
        if outcome.action in self.counts:
            self.counts[outcome.action] += 1
            self.notify("session_removed", {"session_id": c.session_id,
                                            "agent_group": c.agent_group,
                                            "action": outcome.action, "by": by})

    # --- the sweep -------------------------------------------------------------------

    async def run(self) -> None:
        """Every ``sweep_interval``, once the start-up passes are done."""
        await self.host.ready.wait()
        try:
            async for _ in ticks(self.cfg.retention.sweep_interval, self.host.stop_event):
                try:
                    await self.sweep()
                except Exception as exc:  # noqa: BLE001 - a failing sweep must not end the task
                    logger.opt(exception=exc).error("retention sweep failed: {}", exc)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawned, not forked: the loop's threads stay here
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=_LowContext(),
                initializer=_worker_init, initargs=(os.getpid(),))
        return self._pool

    async def sweep(self) -> dict[str, Any]:
        """One sweep: delivered files, then every due session, a batch per thread hop."""
        started = time.monotonic()
        r = self.cfg.retention
        files = await asyncio.to_thread(prune_delivered, self.cfg.data_dir,
                                        r.delivered_max_age)
        found = await asyncio.to_thread(candidates, self.cfg, self.retention.registry,
                                        time.time())
        done = {"archived": 0, "deleted": 0, "kept": 0, "skipped": 0}
        gone: list[str] = []
        for i in range(0, len(found), r.batch):
            if self.host.stop_event.is_set():
                break
            batch = [c for c in found[i:i + r.batch] if self._detach(c)]
            done["skipped"] += len(found[i:i + r.batch]) - len(batch)
            step = time.monotonic()
            outcomes = await self._remove_all(batch)
            rest = (time.monotonic() - step) * (1 / r.duty - 1)
            for c, outcome in zip(batch, outcomes, strict=True):
                self._settle(c, outcome, "retention")
                done[outcome.action if outcome.action in done else "kept"] += 1
            gone += [c.session_id for c, o in zip(batch, outcomes, strict=True)
                     if o.action in ("archived", "deleted")]
            try:  # the rest: live sessions have the disk and the CPU (``duty``)
                await asyncio.wait_for(self.host.stop_event.wait(), rest)
            except asyncio.TimeoutError:
                pass
        if gone:  # one pass over the event log for the whole sweep
            await asyncio.to_thread(self.on_removed, gone)
        seconds = time.monotonic() - started
        self.last = {**done, "delivered_files": files, "candidates": len(found),
                     "seconds": round(seconds, 3), "at": format_ts(utcnow())}
        if found or files:
            logger.info("retention: {} archived, {} deleted, {} kept, {} busy, {} delivered "
                        "files removed in {:.1f}s", done["archived"], done["deleted"],
                        done["kept"], done["skipped"], files, seconds)
        return self.last

    async def _remove_all(self, batch: list[Candidate]) -> list[Outcome]:
        """The batch's journal rows begun and ended here (a thread of this process: the
        registry's lock is then a lock between threads, handed over at once, never
        SQLite's busy wait on a niced process that may hold it while it is not
        scheduled), its file steps in the worker process. If the file steps fail as a
        whole: ``recover`` (finish or undo each), then one at a time (a session's own
        trouble is then its own: the rest go on)."""
        if not batch:
            return []
        items = [Item(c.session_id, c.action, periodic=True, settings=c.settings)
                 for c in batch]
        try:
            return await self._remove_items(items)
        except Exception as exc:  # noqa: BLE001 - e.g. one hostile folder: one by one below
            logger.warning("retention: a batch failed ({}); removing one at a time", exc)
            await asyncio.to_thread(self.retention.recover)
        out = []
        for item in items:
            try:
                out += await self._remove_items([item])
            except Exception as exc:  # noqa: BLE001 - this session's trouble only
                logger.error("retention: session {}: {}", item.session_id, exc)
                await asyncio.to_thread(self.retention.recover)  # undo its half
                out.append(Outcome(item.session_id, "kept", str(exc)))
        return out

    async def _remove_items(self, items: list[Item]) -> list[Outcome]:
        work, out = await asyncio.to_thread(self.retention.begin, items)
        kept: list[str | None] = []
        if work:
            try:
                kept = await asyncio.get_running_loop().run_in_executor(
                    self._worker(), remove_files, self.cfg.data_dir, self.cfg.retention, work)
            except BrokenProcessPool:  # the worker died: a new one next time
                self._pool = None
                raise
        return await asyncio.to_thread(self.retention.end, items, work, kept, out)

    # --- by hand ---------------------------------------------------------------------

    async def remove(self, session_id: str, action: rules.Action, *,
                     force: bool = False) -> Outcome:
        """``DELETE /v1/sessions/{id}``: stop its agent if one runs, then remove it (or
        say why not: ``Outcome.action == "kept"``, ``"missing"``)."""
        row = await asyncio.to_thread(self.retention.registry.session, session_id)
        if row is None:
            return Outcome(session_id, "missing", "no such session")
        c = Candidate(session_id, row.agent_group_id, action, (0.0, 0.0))
        deadline = time.monotonic() + self.cfg.runtime.stop_grace + STOP_WAIT_EXTRA
        while self._busy(session_id) or session_id in self.host.retiring:
            if self.runtime.is_running(session_id):
                self.host.stop_agent(session_id, "session removed")
            if time.monotonic() > deadline:
                return Outcome(session_id, "kept", "its agent did not stop in time; try again")
            await asyncio.sleep(0.05)
        self._detach(c)
        try:
            outcome = await asyncio.to_thread(self.retention.remove, session_id, action,
                                              force=force)
        except BaseException:
            self.host.retiring.discard(session_id)
            self.host.reattach_session(c.agent_group, session_id)
            raise
        self._settle(c, outcome, "hand")
        if outcome.action in ("archived", "deleted"):
            await asyncio.to_thread(self.on_removed, [session_id])
        return outcome
