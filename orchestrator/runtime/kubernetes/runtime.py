"""Kubernetes runtime: one labelled, locked-down Pod per session, on this node.

    KubernetesRuntime(config: KubernetesConfig, data_dir: Path, on_exit: ExitCallback,
                      on_available: Callable[[], None] | None = None, *,
                      uid_range=None, stop_grace=10.0, node=None)

The orchestrator runs on the node that holds the data dir (a DaemonSet Pod); each
agent Pod is pinned there (``nodeName``) and gets its session folder as a
``hostPath``. What a Pod looks like is ``spec`` (pure); what its status means is
``pods`` (pure); API calls and their error policy are ``calls``; the list-then-watch
task is ``watch``; a stop or kill is ``ending``. This module is the bookkeeping: which
Pod belongs to which session, and who reports its end, exactly once, on the event loop.

start waits (up to ``[kubernetes] start_timeout``) until the container runs; a Pod
whose image cannot be pulled, whose container cannot be created, that its node refuses
or that is still Pending at the timeout is deleted and the start fails with
``StartFailed`` (one line, logged once): the work stays pending, the supervisor retries
with its backoff. stop / kill delete with ``gracePeriodSeconds`` = grace / 1 s
(``tracked.KILL_GRACE``) and wait until the Pod is gone. Exits come from the watch:
``exited``, ``oom``, ``evicted``, ``vanished`` (deleted by someone else); ours are
``stopped`` / ``killed``; finished Pods are deleted once reported. recover / reconcile
list ours: adopt live Pods, report tracked ones that ended unseen, delete finished
leftovers. "Ours" = our instance label AND our node (``spec.owned``): one orchestrator
runs per node, all with one instance label, so every list and watch has the field
selector ``spec.nodeName=<node>`` too, and deletes go by names we own after a check of
label, node and uid. pause / resume are no-ops (the composition root turns it off).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from orchestrator.config.sections import KubernetesConfig
from orchestrator.contract import layout
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.runtime.base import (
    AgentExit,
    AgentHandle,
    ExitCallback,
    RuntimeUnavailable,
    SessionRef,
    Usage,
)
from orchestrator.runtime.identity import AgentIds
from orchestrator.runtime.kubernetes.calls import Conflict, KubeCalls
from orchestrator.runtime.kubernetes.ending import EndMixin
from orchestrator.runtime.kubernetes.logs import PodLogs
from orchestrator.runtime.kubernetes.pods import (
    ENDED,
    RUNNING,
    START_FAILED,
    classify,
    exit_reason,
    pending_too_long,
)
from orchestrator.runtime.kubernetes.spec import (
    LABEL_INSTANCE,
    ids_of,
    node_name,
    owned,
    pod_selectors,
    prepare_pod,
    selector_text,
)
from orchestrator.runtime.kubernetes.tracked import (
    GONE_SLACK,
    KILL_GRACE,
    LIVE,
    POLL,
    Background,
    Book,
    Phase,
    StartFailed,
    TrackedPod,
    until_gone,
)
from orchestrator.runtime.kubernetes.watch import PodWatch
from orchestrator.support.logonce import LogOnce


class KubernetesRuntime(EndMixin):
    """The Runtime protocol (base.py) on a Kubernetes cluster. See the module docstring."""

    name = "kubernetes"

    def __init__(self, config: KubernetesConfig, data_dir: Path, on_exit: ExitCallback,
                 on_available: Callable[[], None] | None = None, *,
                 uid_range: tuple[int, int] | None = None, stop_grace: float = 10.0,
                 node: str | None = None, first_version: str | None = None,
                 agent_logs: AgentLogs | None = None) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.on_exit = on_exit
        self.on_available = on_available
        self.instance = config.instance
        self.node = node or node_name(config.node_name)
        self.stop_grace = stop_grace
        self._ids = AgentIds(self.data_dir, config.user, uid_range)  # see runtime.identity
        self.calls = KubeCalls(config)
        # each Pod's output, kept before it is deleted (``logs``)
        self.logs = PodLogs(self.calls, agent_logs or AgentLogs(self.data_dir))
        self.selectors = pod_selectors(self.instance, self.node)
        self._book = Book()
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting: set[str] = set()
        self._background = Background()
        self._said = LogOnce()
        self._reconcile_lock = asyncio.Lock()
        self.watch = PodWatch(self.calls, self.selectors, self._watch_listed, self._on_event,
                              first_version=first_version)
        self.reconciles = 0
        self.listed = False  # see Runtime.listed: set by the first list that succeeds

    # -- bookkeeping (no I/O) ------------------------------------------------------
    def is_running(self, session_id: str) -> bool:
        t = self._book.by_session.get(session_id)
        return t is not None and t.phase in LIVE

    def running(self) -> list[AgentHandle]:
        return self._book.running()

    def is_paused(self, session_id: str) -> bool:
        return False

    async def pause(self, session_id: str) -> None:
        """Not available on Kubernetes (the composition root turns the tier off)."""

    async def resume(self, session_id: str) -> None:
        """Not available on Kubernetes: nothing is ever paused."""

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    def _emit(self, t: TrackedPod, exit_code: int | None, reason: str, *,
              delete: bool = True) -> None:
        """Report the end of ``t`` once, forget it, and (unless the caller does) delete
        its finished Pod in the background."""
        was = t.phase
        if was is Phase.DONE:
            return
        t.phase = Phase.DONE
        self._book.untrack(t)
        wall = t.view.wall_seconds  # the container's own start to finish (the kubelet's)
        event = AgentExit(t.handle.agent_group, t.handle.session_id, exit_code, reason,
                          None if wall is None else Usage(wall_seconds=wall))
        logger.info("agent {}/{} Pod {} ended: {} (exit code {})", event.agent_group,
                    event.session_id, t.name, reason, exit_code)
        if delete:  # first: it takes the session's lock before a restart can
            self._background.spawn(self._delete_owned(t.handle.session_id, t.name, t.uid, grace=0,
                                                      keep_log=True))
        if was is Phase.STARTING:
            t.pending_exit = event  # delivered after start() returned its handle
        else:
            self._deliver(event)

    def _deliver(self, event: AgentExit) -> None:
        try:
            self.on_exit(event)
        except Exception:  # noqa: BLE001 - a callback bug must not stop the other exits
            logger.exception("on_exit callback failed for {}", event)

    # -- ownership ---------------------------------------------------------------------
    def _owns(self, pod: dict[str, Any]) -> bool:
        return owned(pod, self.instance, self.node)

    async def _delete_owned(self, session_id: str, name: str, uid: str | None,
                            grace: int, *, keep_log: bool = False) -> None:
        """Delete Pod ``name`` if it is still the one we mean (our label, same uid),
        under the session's lock so a restarted session's new Pod is never hit.
        ``keep_log``: its output is kept first, unless a delete is under way already
        (whoever started that kept it: one run, one file)."""
        async with self._lock(session_id):
            pod = await self.calls.get(name)
            if pod is None:
                return
            if not self._owns(pod):
                logger.error("refusing to delete Pod {}: it lacks label {}={} or is not on "
                             "node {}", name, LABEL_INSTANCE, self.instance, self.node)
                return
            meta = pod.get("metadata") or {}
            if uid is not None and meta.get("uid") != uid:
                return  # a newer Pod of the session has the name now
            ids = ids_of(meta)
            if keep_log and ids is not None and not meta.get("deletionTimestamp"):
                await self.logs.keep(ids[0], session_id, name)
            await self.calls.delete(name, grace)

    # -- start --------------------------------------------------------------------------
    async def start(self, session: SessionRef) -> AgentHandle:
        layout.validate_id(session.agent_group, "agent group")
        layout.validate_id(session.session_id, "session id")
        async with self._lock(session.session_id):
            t = self._book.live(session.session_id)
            if t is not None:
                return t.handle
            self.watch.ensure_started()
            cfg = session.settings.kubernetes if session.settings is not None else self.config
            manifest = prepare_pod(cfg, session, self.data_dir, node=self.node, ids=self._ids,
                                   grace=self.stop_grace)
            name = manifest["metadata"]["name"]
            t = TrackedPod(AgentHandle(session.agent_group, session.session_id, name), name,
                           Phase.STARTING)
            self._book.track(t)
            self._starting.add(session.session_id)
            try:
                adopted = await self._create(t, manifest)
                if adopted is not None:
                    return adopted
                return await self._until_running(t, cfg)
            except BaseException:
                if t.phase is Phase.STARTING:
                    t.phase = Phase.DONE
                    self._book.untrack(t)
                raise
            finally:
                self._starting.discard(session.session_id)

    async def _create(self, t: TrackedPod, manifest: dict[str, Any]) -> AgentHandle | None:
        """Create the Pod (``t.uid``, ``t.view`` from the answer). A Pod of ours already
        under that name is adopted when alive (its handle returned) or deleted and the
        create retried; one that is not ours is refused."""
        for attempt in (1, 2):
            try:
                created = await self.calls.create(manifest)
            except Conflict:
                if attempt == 2:
                    raise
                adopted = await self._resolve_conflict(t)
                if adopted is not None:
                    return adopted
                continue
            meta = created.get("metadata") or {}
            t.uid = meta.get("uid")
            if t.view.state == "pending":  # an event may have told more already
                t.see(classify(created))
            return None
        return None  # pragma: no cover - the loop returns or raises

    async def _resolve_conflict(self, t: TrackedPod) -> AgentHandle | None:
        """The Pod name is taken. Ours and alive: adopted (its handle). Ours and over:
        deleted (None: create again). Not ours: refused."""
        existing = await self.calls.get(t.name)
        if existing is None:
            return None
        ids = ids_of(existing.get("metadata") or {})
        if not self._owns(existing) or ids != (t.handle.agent_group,
                                               t.handle.session_id):
            raise RuntimeUnavailable(
                f"Pod name {t.name} in namespace {self.calls.namespace} is taken by a "
                f"Pod this orchestrator does not own (no {LABEL_INSTANCE}="
                f"{self.instance} label for this session on node {self.node}): delete or "
                "rename it")
        view = classify(existing)
        meta = existing.get("metadata") or {}
        if view.alive and not meta.get("deletionTimestamp"):
            t.handle = AgentHandle(t.handle.agent_group, t.handle.session_id, t.name,
                                   adopted=True)
            t.uid, t.phase = meta.get("uid"), Phase.RUNNING
            t.see(view)
            logger.info("adopted running Pod {} for {}/{}", t.name,
                        t.handle.agent_group, t.handle.session_id)
            return t.handle
        await self.calls.delete(t.name, 0 if view.state == ENDED else KILL_GRACE)
        await until_gone(self.calls, self.node, t.name, self.stop_grace + GONE_SLACK)
        return None

    async def _until_running(self, t: TrackedPod, cfg: KubernetesConfig) -> AgentHandle:
        """Wait until the container runs (the handle), ended already (the handle; its
        exit follows), or the start failed / timed out (Pod deleted, ``StartFailed``)."""
        began = time.monotonic()
        while True:
            view = t.view
            if view.state == RUNNING or view.state == ENDED:
                if self._said.clear(("image", cfg.image)) is not None:
                    logger.info("image {} runs on node {} now", cfg.image, self.node)
                logger.info("started agent {}/{} in Pod {} on node {}", t.handle.agent_group,
                            t.handle.session_id, t.name, self.node)
                if view.state == ENDED or t.gone:  # already over: reported after the handle
                    self._emit(t, view.exit_code, exit_reason(view) if view.state == ENDED
                               else "vanished", delete=view.state == ENDED)
                    if t.pending_exit is not None:
                        asyncio.get_running_loop().call_soon(self._deliver, t.pending_exit)
                else:
                    t.phase = Phase.RUNNING
                return t.handle
            waited = time.monotonic() - began
            failure = view.message if view.state == START_FAILED else pending_too_long(
                view, waited, cfg.start_timeout)
            if t.gone:
                failure = f"Pod {t.name} was deleted before its container ran"
            if failure is not None:
                await self._abandon(t, failure, cfg.image)
            before = t.view
            await t.wait_change(min(POLL, cfg.start_timeout - waited + 0.05))
            if t.view is before and not t.gone:  # the watch said nothing: look ourselves
                await t.refresh(self.calls)

    async def _abandon(self, t: TrackedPod, failure: str, image: str) -> None:
        """A start that cannot succeed: delete the Pod, say it once, raise."""
        t.phase = Phase.DONE
        self._book.untrack(t)
        try:
            await self.calls.delete(t.name, 0)
        except RuntimeUnavailable as exc:
            logger.debug("could not delete Pod {} of a failed start: {}", t.name, exc)
        line = f"cannot start agent {t.handle.agent_group}/{t.handle.session_id}: {failure} " \
               "(work stays pending; start retried with backoff)"
        key = ("image", image) if "image " in failure else ("start", t.handle.session_id)
        if self._said.say(key, failure):
            logger.error("{}", line)
        raise StartFailed(line)

    # -- watch events, lists --------------------------------------------------------------
    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        """On the loop: one watch event for a Pod carrying our instance label."""
        if not self._owns(pod):
            return
        meta = pod.get("metadata") or {}
        t = self._book.by_name.get(meta.get("name", ""))
        if t is None or t.phase is Phase.DONE:
            return
        if t.uid is None and kind != "DELETED":
            t.uid = meta.get("uid")  # the ADDED event came before create's answer
        if meta.get("uid") != t.uid:
            return  # an earlier Pod of the same name
        t.see(classify(pod), gone=kind == "DELETED")
        self._settle(t)

    def _settle(self, t: TrackedPod) -> None:
        """Report ``t``'s end if its latest view says it ended (RUNNING only: start()
        and stop()/kill() handle their own phases)."""
        if t.phase is not Phase.RUNNING:
            return
        view = t.view
        if view.state == ENDED:
            self._emit(t, view.exit_code, exit_reason(view))
        elif t.gone:
            self._emit(t, view.exit_code, "vanished", delete=False)
        elif view.state == START_FAILED:  # an adopted Pod that never ran
            logger.error("agent {}/{}: {}", t.handle.agent_group, t.handle.session_id,
                         view.message)
            self._emit(t, None, "exited", delete=False)
            self._background.spawn(self._delete_owned(t.handle.session_id, t.name, t.uid,
                                                      KILL_GRACE))

    async def _sync(self, pods: list[dict[str, Any]]) -> None:
        """A full list of our Pods (the watch's, or reconcile's): adopt live ones we do
        not track, report tracked ones that ended or vanished, delete finished leftovers."""
        async with self._reconcile_lock:
            found = {p["metadata"]["name"]: p for p in pods if self._owns(p)}
            self.listed = True
            for name, pod in found.items():
                meta = pod.get("metadata") or {}
                ids = ids_of(meta)
                t = self._book.by_name.get(name)
                if ids is None or (t is not None and t.phase is not Phase.DONE):
                    continue
                group, session_id = ids
                if session_id in self._starting or self.is_running(session_id):
                    continue
                view = classify(pod)
                if view.alive and not meta.get("deletionTimestamp"):
                    t = TrackedPod(AgentHandle(group, session_id, name, adopted=True), name,
                             uid=meta.get("uid"), view=view)
                    self._book.track(t)
                    logger.info("adopted Pod {} for {}/{}", name, group, session_id)
                elif view.state in (ENDED, START_FAILED):
                    logger.info("deleting finished Pod {} ({}, exit code {})", name,
                                view.reason or view.message, view.exit_code)
                    self._background.spawn(self._delete_owned(session_id, name, meta.get("uid"), 0,
                                                              keep_log=view.state == ENDED))
            for t in list(self._book.by_name.values()):
                if t.phase is not Phase.RUNNING:
                    continue
                now = found.get(t.name)
                if now is None or (now.get("metadata") or {}).get("uid") != t.uid:
                    t.see(t.view, gone=True)
                else:
                    t.see(classify(now))
                self._settle(t)
            self.reconciles += 1

    async def _watch_listed(self, pods: list[dict[str, Any]]) -> None:
        """The watch listed (again): sync, and after a failed round tell the supervisor
        it may retry the starts it put off (``on_available``)."""
        await self._sync(pods)
        if self.watch.lists > 0 and self.on_available is not None:
            try:
                self.on_available()
            except Exception:  # noqa: BLE001  # pragma: no cover - a callback bug must not end it
                logger.exception("on_available callback failed")

    # -- recover / reconcile / ping / close ----------------------------------------------
    async def recover(self) -> list[AgentHandle]:
        """Adopt this instance's live Pods, delete its finished ones; then follow them.
        Raises (``listed`` stays False) when the API server does not answer; the watch's
        first list adopts them later."""
        labels, fields = self.selectors
        logger.info("following Pods in namespace {} with labels {} and fields {}",
                    self.calls.namespace, selector_text(labels), selector_text(fields))
        self.watch.ensure_started()
        pods, _ = await self.calls.list(labels, fields)
        await self._sync(pods)
        return self.running()

    async def reconcile(self) -> None:
        try:
            pods, _ = await self.calls.list(*self.selectors)
        except RuntimeUnavailable as exc:
            logger.debug("reconcile skipped: {}", exc)
            return
        await self._sync(pods)

    async def ping(self) -> None:
        await self.calls.ping(*self.selectors)

    async def close(self) -> None:
        """Stop watching and release the client; Pods keep running (adopted next time)."""
        await self.watch.stop()
        await self._background.cancel()
        await self.calls.close()
        self._ids.close()
