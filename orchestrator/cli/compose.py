"""The composition root: the one place that builds the running orchestrator.

Everything is built here, in order, and handed to constructors; nothing is patched
on afterwards. Every resource is opened under one ``AsyncExitStack``, so shutdown is
the stack unwinding — and a failure at any point of start-up (a refused API setting,
a locked data dir, a start-up reconcile that raises) closes exactly what was opened
before it: the API socket, the runtime and its threads, the channel, the stores, the
data-dir lock.

This is also the only module that names the concrete runtimes, the concrete channels
and the API server.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import AsyncIterator, Callable

from loguru import logger

from orchestrator import version
from orchestrator.api import server as api_server
from orchestrator.api.connections import raise_nofile_limit
from orchestrator.api.events import EventStore
from orchestrator.api.hub import Hub
from orchestrator.api.idempotency import IdempotencyKeys
from orchestrator.api.metrics import Metrics
from orchestrator.api.peers import Membership, Peers, StaticMembers
from orchestrator.channels import Channel
from orchestrator.channels.jsonl import JsonlChannel
from orchestrator.channels.log import LogChannel
from orchestrator.channels.webhook import WebhookChannel
from orchestrator.config.load import parse_range
from orchestrator.config.model import Config
from orchestrator.config.sections import DeliveryConfig
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.contract.schema import utcnow
from orchestrator.engine.admission_gate import open_gate
from orchestrator.engine.delivery import Deliverer
from orchestrator.engine.ports import Dirty, RuntimeInbox, StatusBook
from orchestrator.engine.session_worker import SessionWorker
from orchestrator.engine.startup_state import StateBook
from orchestrator.engine.supervisor import Supervisor
from orchestrator.engine.tracked import Flag, TrackedMap
from orchestrator.gateway.service import Gateway
from orchestrator.host.agent_logs import AgentLogs
from orchestrator.host.data_lock import DataDirLock, lock_data_dir
from orchestrator.host.private import make_dirs, tighten_data_dir
from orchestrator.host.registry import Registry
from orchestrator.host.retention import Retention
from orchestrator.host.sessions import Sessions
from orchestrator.runtime.base import AgentExit, Runtime
from orchestrator.support.signals import capture_signals
from orchestrator.watch import inotify_thread, watcher
from orchestrator.watch.head_start import HeadStart

Clock = Callable[[], datetime]
RuntimeFactory = Callable[[Config, Callable[[AgentExit], None], Callable[[], None]], Runtime]


def make_runtime(cfg: Config, on_exit: Callable[[AgentExit], None],
                 on_available: Callable[[], None]) -> Runtime:
    """``on_available``: the runtime can start agents again (the Docker daemon is
    back). The local runtime is never unavailable, so it does not take one."""
    if cfg.runtime.kind == "kubernetes":
        from orchestrator.runtime.kubernetes.runtime import KubernetesRuntime  # lightkube: lazily

        return KubernetesRuntime(cfg.kubernetes, cfg.data_dir, on_exit, on_available,
                                 uid_range=parse_range(cfg.runtime.uid_range),
                                 stop_grace=cfg.runtime.stop_grace, agent_logs=AgentLogs.of(cfg))
    if cfg.runtime.kind == "docker":
        from orchestrator.runtime.docker.runtime import DockerRuntime  # docker-py: on demand

        return DockerRuntime(cfg.docker, cfg.data_dir, on_exit, on_available,
                             uid_range=parse_range(cfg.runtime.uid_range),
                             agent_logs=AgentLogs.of(cfg))
    from orchestrator.runtime.local.runtime import LocalRuntime

    return LocalRuntime(cfg.runtime, cfg.data_dir, on_exit,
                        uid_range=parse_range(cfg.runtime.uid_range, default=None),
                        agent_logs=AgentLogs.of(cfg))


def without_paused_tier(cfg: Config) -> Config:
    """The paused tier (``[lifecycle] pause_idle_after``) needs a runtime that can
    freeze an agent; Kubernetes cannot (no pause of a Pod's containers through the
    API). There it is turned off, said once at start: idle agents are stopped instead."""
    if cfg.runtime.kind != "kubernetes" or cfg.lifecycle.pause_idle_after <= 0:
        return cfg
    logger.warning("paused tier not available on Kubernetes; idle agents are stopped instead "
                   "([lifecycle] pause_idle_after = {:g} is ignored)",
                   cfg.lifecycle.pause_idle_after)
    return cfg.replace(lifecycle={"pause_idle_after": 0.0})


def _channel_files(cfg: Config) -> tuple[Path, ...]:
    """The files a channel writes (``jsonl``: its path), made private at start."""
    return (Path(cfg.delivery.path),) if cfg.delivery.channel == "jsonl" else ()


def make_channel(cfg: DeliveryConfig) -> Channel:
    """The channel ``[delivery] channel`` names."""
    if cfg.channel == "jsonl":
        return JsonlChannel(cfg.path)
    if cfg.channel == "webhook":
        return WebhookChannel(cfg)
    return LogChannel()


def make_peers(cfg: Config, token: str | None,
               reread: Callable[[], Config] | None = None) -> Peers | None:
    """``[cluster]`` (issue 23): the other shards, or None for a single orchestrator.
    ``reread``: the config read again, for SIGHUP's reload of static members."""
    from orchestrator.api.auth import ApiConfigError
    from orchestrator.config.cluster import Member, parse_member
    from orchestrator.host.secretfile import SecretFileError, ensure_secret

    cluster = cfg.cluster
    if not cluster.shard and cluster.discovery != "kubernetes":
        return None
    if not cfg.api.listen:
        raise ApiConfigError("[cluster] needs the API: set [api] listen (the shards call "
                             "each other through it)")
    try:
        secret = ensure_secret(Path(cluster.peer_token_file)) if cluster.peer_token_file else token
    except SecretFileError as exc:
        raise ApiConfigError(f"[cluster] peer_token_file: {exc}") from None
    if not secret:
        raise ApiConfigError("[cluster] needs a shared secret between shards: set [cluster] "
                             "peer_token_file (or [api] token_file, the default)")
    shard = cluster.shard
    membership: Membership
    if cluster.discovery == "kubernetes":
        from orchestrator.runtime.kubernetes.members import KubeMembers, node_name

        if cluster.shard_ids == "pod" and not shard:
            raise ApiConfigError("[cluster] shard_ids = 'pod' needs this Pod's name as [cluster] "
                                 "shard: set ORCHESTRATOR_CLUSTER__SHARD from the Downward API "
                                 "(fieldRef metadata.name)")
        shard = shard or node_name(cfg.kubernetes)
        membership = KubeMembers(cfg.kubernetes, cluster)
    else:
        def members() -> list[Member]:
            assert reread is not None
            return [parse_member(m) for m in reread().cluster.members]

        membership = StaticMembers([parse_member(m) for m in cluster.members],
                                   members if reread else None, shard)
    return Peers(shard, membership, secret, timeout=cluster.peer_timeout,
                 probe_interval=cluster.probe_interval, retry_after=cluster.retry_after,
                 forward_timeout=cfg.api.max_wait + cluster.peer_timeout + 5,
                 drain=cluster.drain)


@dataclass(frozen=True)
class Service:
    """The assembled orchestrator: the engine, and the API in front of it."""

    supervisor: Supervisor
    api: api_server.ApiService


@asynccontextmanager
async def assembled(cfg: Config, *, runtime_factory: RuntimeFactory = make_runtime,
                    channel: Channel | None = None, clock: Clock = utcnow,
                    stop_event: asyncio.Event | None = None,
                    reread: Callable[[], Config] | None = None,
                    head_start: HeadStart | None = None,
                    data_lock: DataDirLock | None = None) -> AsyncIterator[Service]:
    """Build and open everything; leaving the block closes it all, in reverse order.
    ``head_start``: the first inotify watch, being built since the configuration was
    read (``watch.head_start``); the supervisor's watch takes it. ``data_lock``: the
    data dir's lock when the caller took it already (``cmd_run``, before that watch);
    released with the rest."""
    cfg = without_paused_tier(cfg)
    data_dir = cfg.data_dir
    async with AsyncExitStack() as stack:
        if data_lock is not None:
            stack.callback(data_lock.release)
        if head_start is not None:  # (a no-op once the watch took it)
            stack.callback(head_start.close)
        listen, token = api_server.preflight(cfg)  # refused here: nothing opened yet
        peers = make_peers(cfg, token, reread)
        if data_lock is None:
            stack.callback(lock_data_dir(data_dir).release)
        make_dirs(sessions_root(data_dir))
        tighten_data_dir(data_dir, _channel_files(cfg))
        registry = stack.enter_context(Registry(registry_path(data_dir)))
        retention = Retention(data_dir, registry, cfg.retention)
        retention.recover()  # removals a crash cut short: finished or undone, first
        sessions = Sessions(data_dir, registry, cfg.sessions.max_attachment_bytes)

        chan = channel or make_channel(cfg.delivery)
        stack.callback(chan.close)
        stack.push_async_callback(chan.aclose)
        dirty = Dirty()
        inbox = RuntimeInbox(dirty)
        runtime = runtime_factory(cfg, inbox.exited, inbox.available)
        stack.push_async_callback(runtime.close)
        gateway = Gateway(cfg)  # the egress gateway: listens only if a group has egress
        stack.push_async_callback(gateway.close)
        await gateway.start()

        tracked = TrackedMap()  # Tracked records, and dormant rows until touched
        events = EventStore(data_dir / "events.db")
        stack.callback(events.close)
        keys = IdempotencyKeys(registry_path(data_dir))
        stack.callback(keys.close)
        # the gauges are read at scrape time, when the gate below exists (the gate
        # writes statuses, which the hub counts: it cannot come first)
        metrics = Metrics(runtime=runtime.name, channel=chan.name, version=version(),
                          statuses=tracked.statuses,
                          queue_length=lambda: gate.queue_length(),
                          rescans=lambda: dict(watcher.RESCANS),
                          watch_state=lambda: dict(inotify_thread.WATCH_STATE),
                          groups=[g.name for g in cfg.groups],
                          webhook_responses=(lambda: dict(chan.responses))
                          if isinstance(chan, WebhookChannel) else None,
                          egress=(lambda: dict(gateway.counts)) if gateway.active else None)
        forward = (chan.forward_event if isinstance(chan, WebhookChannel)
                   and cfg.delivery.events else None)  # [delivery] events: same ids as SSE
        hub = Hub(events, metrics, forward=forward,
                  max_content_bytes=cfg.api.event_content_bytes)

        statuses = StatusBook(registry, hub.notify)
        gate = open_gate(cfg, tracked, runtime, registry, dirty.mark, statuses.set, clock)
        book = StateBook(registry)
        deliverer = Deliverer(data_dir, registry, chan, cfg.delivery)
        stack.push_async_callback(deliverer.aclose)  # the outbox janitor, between steps
        worker = SessionWorker(
            cfg, registry, sessions, runtime, deliverer, clock, dirty.mark,
            statuses=statuses, admission=gate, notify=hub.notify,
            after_pass=lambda t: book.note(t, runtime.is_running(t.session_id)),
            egress=gateway if gateway.doors else None)  # enabled = false: such starts fail
        sup = Supervisor(cfg, tracked, registry, sessions, runtime, inbox, dirty, statuses,
                         worker, gate, book, clock,
                         stop_event=stop_event or asyncio.Event(), retention=retention,
                         on_removed=events.forget_sessions, head_start=head_start)
        chan.bind(lambda sid: dirty.mark(sid, Flag.OUTBOUND))  # an outcome known → a pass

        if peers is not None:
            stack.push_async_callback(peers.close)
            await peers.start()
        api = api_server.ApiService(sup, listen, token, events, metrics, keys, peers)
        stack.push_async_callback(api.close)
        await api.start()
        yield Service(sup, api)
    logger.info("orchestrator stopped")


async def serve(cfg: Config, stop_event: asyncio.Event,
                reread: Callable[[], Config] | None = None,
                head_start: HeadStart | None = None,
                data_lock: DataDirLock | None = None) -> None:
    """Serve until ``stop_event`` is set."""
    async with assembled(cfg, stop_event=stop_event, reread=reread,
                         head_start=head_start, data_lock=data_lock) as service:
        await service.supervisor.serve()


def run(cfg: Config, reread: Callable[[], Config] | None = None,
        head_start: HeadStart | None = None, data_lock: DataDirLock | None = None) -> int:
    """``orchestrator run``: serve until SIGINT/SIGTERM. AlreadyRunning, ApiConfigError
    and other ``UserError``s leave as themselves: one line and exit 2 (``commands.main``).
    ``head_start``, ``data_lock``: see ``assembled``."""

    raise_nofile_limit()  # connections, agent pipes and SQLite files are all fds

    async def main() -> int:
        stop = asyncio.Event()
        with capture_signals(stop):
            await serve(cfg, stop, reread, head_start, data_lock)
        return 0

    return asyncio.run(main())
