"""``orchestrator demo``: the whole loop once, in one process, in a few seconds.

Runs the supervisor on the given config (short idle timings so the statuses are
seen changing), sends a message with an attachment, prints the reply as the
jsonl channel wrote it, waits for the agent to go idle and be stopped, prints
``status``, and shuts down. The HTTP API, if configured on a TCP port, listens on a
free port instead (printed), so a running orchestrator on the default port is no
obstacle. Everything it creates stays in the data dir.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

from loguru import logger

from orchestrator.channels.jsonl import read_lines
from orchestrator.cli.compose import assembled
from orchestrator.cli.logs import setup_logging
from orchestrator.config.load import read_config
from orchestrator.config.model import Config
from orchestrator.contract.session_status import Status
from orchestrator.engine.supervisor import Supervisor
from orchestrator.host import status
from orchestrator.host.data_lock import AlreadyRunning
from orchestrator.host.sessions import MessagingGroup

DEADLINE = 60.0


async def _wait(predicate, what: str, deadline: float) -> None:
    """Check a condition every 50 ms until it holds or the deadline passes."""
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def _demo(config_path: Path) -> int:
    cfg = read_config(config_path)
    if cfg.delivery.channel != "jsonl":
        cfg = cfg.replace(delivery={"channel": "jsonl"})
    cfg = cfg.replace(lifecycle={"idle_after": 2.0, "stop_idle_after": 2.0})
    if cfg.api.listen and not cfg.api.listen.startswith("unix:"):
        # the demo needs no fixed port: another orchestrator may hold the configured one
        cfg = cfg.replace(api={"listen": "127.0.0.1:0"})
    logger.info("demo: data dir {}, runtime {}, replies to {}", cfg.data_dir, cfg.runtime.kind,
                cfg.delivery.path)
    async with assembled(cfg) as service:
        print(f"demo: HTTP API on {service.api.url} (a free port, not the configured one)"
              if service.api.url else "demo: no HTTP API", flush=True)
        return await _converse(cfg, service.supervisor)


async def _converse(cfg: Config, sup: Supervisor) -> int:
    """Send one message, print the reply and the status changes, stop."""
    server = asyncio.create_task(sup.serve())
    ready = asyncio.create_task(sup.ready.wait())
    await asyncio.wait([server, ready], return_when=asyncio.FIRST_COMPLETED)
    if server.done():  # start-up failed (e.g. another orchestrator holds the data dir)
        ready.cancel()
        server.result()
    deadline = time.monotonic() + DEADLINE
    try:
        session = sup.sessions.resolve("demo", MessagingGroup("cli", "demo"), None, "shared")
        attachment = {"name": "hello.txt",
                      "data": base64.b64encode(b"a file travelling both ways\n").decode()}
        mid, seq = sup.sessions.write_message(
            session, {"text": "hello, agent", "attachments": [attachment]},
            routing=("cli", "demo", None))  # the message's own chat
        logger.info("demo: sent {} (seq {}) to session {}", mid, seq, session.id)

        def reply() -> dict | None:
            return next((r for r in read_lines(cfg.delivery.path) if r.get("in_reply_to") == mid),
                        None)

        await _wait(lambda: reply() is not None, "the reply", deadline)
        print("\nreply delivered (jsonl line):")
        print(json.dumps(reply(), indent=2))
        def stopped_after_idle() -> bool:
            row = sup.registry.session(session.id)
            return (row is not None and row.container_status == Status.STOPPED
                    and any(c["new"] == Status.IDLE
                            for c in sup.registry.status_changes(session.id)))

        await _wait(stopped_after_idle, "the agent to go idle and stop", deadline)
        print("\nstatus changes:")
        for c in sup.registry.status_changes(session.id):
            print(f"  {c['at']}  {c['old'] or '-':>7} → {c['new']:<7}  {c['reason']}")
        print()
        print(status.render_table(status.collect(cfg.data_dir, sup.registry)))
        return 0
    except TimeoutError as exc:
        logger.error(str(exc))
        return 1
    finally:
        sup.stop_event.set()
        await server


def demo(config_path: Path, *, json_logs: bool = False) -> int:
    cfg = read_config(config_path)
    setup_logging(cfg.log, json=True if json_logs else None)
    try:
        return asyncio.run(_demo(config_path))
    except AlreadyRunning as exc:
        logger.error(str(exc))
        return 1
