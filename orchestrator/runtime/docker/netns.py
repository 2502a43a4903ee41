"""Network namespaces made ahead of demand: a small pool of started "holder" containers.

    NetnsPool(exec: DockerExec, instance: str, image: str, size: int)
    pool.fill()                 # (re)fill in the background, up to ``size``
    pool.take() -> str | None   # a started holder's id, or None: none ready
    pool.spent(holder_id)       # nothing will join it any more: remove it (shortly)
    await pool.recheck()        # after a reconnect: drop the ones that no longer run
    await pool.close()          # remove the ones still ready

Why: measured on this host (Docker 20.10, runc 1.1, cgroup v1, 2 cores), half of a
``docker start`` of an agent container with ``network_mode="none"`` is its network
namespace — libnetwork makes a sandbox, and its ``libnetwork-setkey`` prestart hook
execs the dockerd binary: start p50 263 ms vs 122 ms for the same container joining
an existing namespace (``network_mode="container:<id>"``), ~25 container starts
each, load ~4.5. That is most of what separates a cold round trip from its target.

So the namespace is made before a message asks for it: a holder is a container of
the runtime's image running ``sleep infinity`` with ``network_mode="none"`` (loopback
only), as nobody (65534), every capability dropped, no-new-privileges, a read-only
root, 16 MB and 4 pids. An agent container of a group with ``network = "none"`` (and
no egress) is created with ``network_mode="container:<holder>"`` instead. The holder
then belongs to that session (``ahead.py``): its next container, created ahead after
the agent stopped (``spares.py``), joins the same one, so a session's cold cycle makes
no namespace at all; it is removed when the session has no container coming (an end
that wants none, its spare dropped or out of date, the runtime closing). A namespace
outlives its holder as long as processes are in it. So every agent's namespace is
its session's own — never one another session had, nobody else's sockets in it (a
holder is never handed from one session to another; the successive runs of one session
are the only ones to share it, one after the other) — and nothing changes for an agent
but who made its loopback.

Holders carry ``orchestrator.netns=<instance>`` — not the instance label, so no list,
event or reconcile of agent containers ever sees them, and a removal re-checks that
label (``_owned``). Leftovers of an earlier run of this instance are removed by the
first ``fill``. When no holder is ready (a burst, the pool off with ``[docker]
netns_pool = 0``, or the image cannot run ``sleep``) an agent is started the plain
way: the pool only ever saves time, it never fails a start. A holder that fails to
start turns the pool off (logged once) until the runtime is made again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger

from orchestrator.runtime.base import RuntimeUnavailable
from orchestrator.runtime.docker.calls import DaemonUnreachable, DockerExec

LABEL_NETNS = "orchestrator.netns"  # value: the instance whose holder it is
HOLDER_USER = "65534:65534"
HOLDER_COMMAND = ("sleep", "infinity")
SPENT_DELAY = 1.0  # s before a holder nothing will join is removed (off any hot path)
REFILL_DELAY = 0.5  # s before a taken holder is replaced (not beside the start it served)


def holder_spec(instance: str, image: str) -> dict[str, Any]:
    """Arguments for ``create_container`` of one holder (minus host_config)."""
    return {"image": image, "command": list(HOLDER_COMMAND), "user": HOLDER_USER,
            "labels": {LABEL_NETNS: instance}}


def holder_host_config() -> dict[str, Any]:
    """Least privilege for a process that only sleeps: loopback only, nothing else."""
    return {"network_mode": "none", "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges=true"], "read_only": True,
            "mem_limit": "16m", "pids_limit": 4, "nano_cpus": 50_000_000,
            "init": False, "auto_remove": False}


def joins(holder_id: str | None) -> str | None:
    """The ``network_mode`` of an agent that joins ``holder_id`` (None: no holder)."""
    return f"container:{holder_id}" if holder_id else None


class NetnsPool:
    """Up to ``size`` started holders, refilled in the background. See the module doc."""

    def __init__(self, exec: DockerExec, instance: str, image: str, size: int) -> None:
        self.exec = exec
        self.instance = instance
        self.image = image
        self.size = max(0, size)
        self.ready: list[str] = []  # started holders nobody has taken, oldest first
        self._filling: asyncio.Task | None = None
        self._swept = False  # leftovers of an earlier run removed
        self._broken = False  # a holder could not be started: the pool is off
        self._closing = False
        self._later: set[asyncio.Handle | asyncio.Task] = set()
        self._spent: set[str] = set()  # taken, waiting to be removed

    @property
    def on(self) -> bool:
        return self.size > 0 and not self._broken and not self._closing

    def take(self) -> str | None:
        """A started holder for one agent, or None; the pool is refilled shortly after."""
        if not self.on:
            return None
        holder = self.ready.pop(0) if self.ready else None
        self._after(REFILL_DELAY, self.fill)
        return holder

    async def recheck(self) -> None:
        """After the event stream (re)connected: keep only the ready holders that still
        run (a daemon restart ended them all) and fill up again."""
        if not self.ready:
            return self.fill()
        try:
            found = await self.exec.call("list netns holders", lambda api: api.containers(
                filters={"label": f"{LABEL_NETNS}={self.instance}", "status": "running"}))
        except RuntimeUnavailable:
            return None
        running = {c["Id"] for c in found or []}
        for holder in [h for h in self.ready if h not in running]:
            self.ready.remove(holder)
            self.spent(holder, 0)
        return self.fill()

    def spent(self, holder_id: str | None, delay: float = SPENT_DELAY) -> None:
        """Nothing will join ``holder_id`` any more: remove it (after ``delay``)."""
        if holder_id:
            self._spent.add(holder_id)
            self._after(delay, lambda: self._spawn(self._remove(holder_id)))

    def fill(self) -> None:
        """Start holders (one at a time, in the background) until ``size`` are ready."""
        if not self.on or (self._filling is not None and not self._filling.done()):
            return
        if len(self.ready) >= self.size and self._swept:
            return
        self._filling = self._spawn(self._fill())

    async def _fill(self) -> None:
        if not self._swept:
            await self._sweep()
        while self.on and len(self.ready) < self.size:
            holder = await self._start_one()
            if holder is None:
                return
            self.ready.append(holder)

    async def _start_one(self) -> str | None:
        api_kwargs = holder_spec(self.instance, self.image)

        def _create(api: Any) -> dict:
            return api.create_container(host_config=api.create_host_config(
                **holder_host_config()), **api_kwargs)

        cid: str | None = None
        try:
            cid = (await self.exec.call("create netns holder", _create, image=self.image))["Id"]
            await self.exec.call("start netns holder", lambda api: api.start(cid))
        except DaemonUnreachable:
            return None  # said once by DockerExec; the next take() tries again
        except RuntimeUnavailable as exc:
            self._broken = True
            logger.warning("network namespaces are not made ahead of demand ({}): agents "
                           "start the plain way, ~100 ms slower; set [docker] netns_pool = 0 "
                           "to say so", exc)
            if cid is not None:
                await self._remove(cid)
            return None
        return cid

    async def _sweep(self) -> None:
        """Remove holders of this instance that are not in the pool (an earlier run's)."""
        try:
            found = await self.exec.call("list netns holders", lambda api: api.containers(
                all=True, filters={"label": f"{LABEL_NETNS}={self.instance}"}))
        except RuntimeUnavailable:
            return
        self._swept = True
        for c in found or []:
            if c["Id"] not in self.ready:
                await self._remove(c["Id"])

    async def _remove(self, holder_id: str) -> None:
        """Remove a holder of ours (label re-checked); gone or failing: nothing to do."""
        self._spent.discard(holder_id)
        try:
            info = await self.exec.inspect(holder_id)
            if info is None or not self._owned(info):
                return
            await self.exec.remove(holder_id)
        except RuntimeUnavailable as exc:
            logger.debug("netns holder {} not removed: {}", holder_id[:12], exc)

    def _owned(self, info: dict) -> bool:
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_NETNS) == self.instance:
            return True
        logger.error("refusing to remove container {}: it lacks label {}={}",
                     str(info.get("Name", "?")).lstrip("/"), LABEL_NETNS, self.instance)
        return False

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return task

    def _after(self, delay: float, fn: Any) -> None:
        if self._closing:
            return
        def run() -> None:
            self._later.discard(handle)
            fn()

        handle: asyncio.TimerHandle = asyncio.get_running_loop().call_later(delay, run)
        self._later.add(handle)

    async def close(self) -> None:
        """Stop filling and remove every holder of this instance: the ready ones, the
        spent ones, and one a fill had under way (awaited, not cancelled: its create
        would finish in the docker pool all the same and leave it behind)."""
        self._closing = True
        tasks = []
        for item in list(self._later):
            if isinstance(item, asyncio.Task):
                tasks.append(item)
            else:
                item.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self.ready = []
        self._spent.clear()
        self._swept = False
        await self._sweep()
