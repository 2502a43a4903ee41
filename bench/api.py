"""Bench of the network surface: HTTP POST /v1/messages → the reference agent → the
webhook channel → a real local receiver.

    .venv/bin/python -m bench.api [--quick] [--out bench/results/api.json]

The orchestrator runs as its own process (``orchestrator run`` on a fresh data dir,
the local runtime with the reference agent, ``[delivery] channel = "webhook"``); this
process is the API client and the webhook receiver (uvicorn, on its own port). Agents
are kept running (long idle windows), so the figures are the message path, not agent
start-up. What is measured:

- ``latency``: POST sent → the reply's webhook POST received, at 1 and 100 sessions
  (one message outstanding per session);
- ``throughput``: messages/s accepted by ``POST /v1/messages`` (32 concurrent
  clients), then every accepted message must come back as a reply: ``lost`` = 0;
- ``receiver``: the same latency with a receiver answering in 0 ms and in 500 ms,
  measured at the receiver's *arrival*: a slow receiver must not hold back other
  sessions' replies (arrivals would pile up behind one another if it did).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.contract.schema import parse_ts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


class Receiver:
    def __init__(self) -> None:
        self.delay = 0.0
        self.waiters: dict[str, asyncio.Future] = {}  # in_reply_to → arrival time
        self.arrived: dict[str, float] = {}
        self.commit_to_arrival: list[float] = []
        self.count = 0

    async def handle(self, request: Request) -> Response:
        now = time.monotonic()
        body = json.loads(await request.body())
        if body.get("type") == "reply":
            self.count += 1
            key = body.get("in_reply_to")
            committed = parse_ts(body.get("timestamp"))
            if committed is not None:  # the agent's commit → here: the orchestrator's part
                self.commit_to_arrival.append(time.time() - committed.timestamp())
            self.arrived.setdefault(key, now)
            fut = self.waiters.get(key)
            if fut is not None and not fut.done():
                fut.set_result(now)
        if self.delay:
            await asyncio.sleep(self.delay)
        return Response(b"{}", media_type="application/json")

    async def wait(self, message_id: str, timeout: float = 60.0) -> float:
        if message_id in self.arrived:
            return self.arrived[message_id]
        fut = self.waiters.setdefault(message_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.pop(message_id, None)


async def start_receiver(rx: Receiver, port: int) -> uvicorn.Server:
    app = Starlette(routes=[Route("/hook", rx.handle, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", access_log=False))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server


def write_config(root: Path, api_port: int, hook_port: int, poll: float,
                 nice: int) -> Path:
    agent = ["{python}", "-m", "orchestrator.agent", "--heartbeat-interval", "1"]
    if poll:  # a polling agent; by default it sleeps on inotify (--wake auto)
        agent += ["--wake", "poll", "--poll-interval", str(poll)]
    cfg = {
        "data_dir": str(root / "data"),
        "runtime": {"command": (["nice", "-n", str(nice)] if nice else []) + agent,
                    "on_shutdown": "stop", "stop_grace": 2.0,
                    "max_agents": 0},  # every session's agent runs: the path, not the queue
        "lifecycle": {"idle_after": 600, "stop_idle_after": 600},
        "delivery": {"channel": "webhook", "url": f"http://127.0.0.1:{hook_port}/hook",
                     "timeout": 30.0},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "log": {"level": "WARNING"},
    }
    path = root / "config.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


async def post(client: httpx.AsyncClient, session: int, text: str) -> dict:
    """POST with an Idempotency-Key, retried on a transport error (a keep-alive
    connection the server closed as it was reused): the retry never writes twice."""
    key = f"bench-{time.monotonic_ns()}-{random.getrandbits(32)}"
    for attempt in range(5):
        try:
            resp = await client.post("/v1/messages", headers={"Idempotency-Key": key}, json={
                "agent_group": "bench", "channel": "bench", "platform_id": f"chat-{session}",
                "content": {"text": text}})
        except httpx.TransportError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        resp.raise_for_status()
        return resp.json()
    raise AssertionError("unreachable")


POSTS: list[float] = []  # seconds each POST /v1/messages took (answer received)


async def round_trip(client: httpx.AsyncClient, rx: Receiver, session: int,
                     timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    mid = (await post(client, session, "ping"))["message_id"]
    POSTS.append(time.monotonic() - t0)
    return (await rx.wait(mid, timeout)) - t0


async def warm(client: httpx.AsyncClient, rx: Receiver, sessions: int) -> None:
    """One message per session: starts every agent (not measured; slow on a loaded host)."""
    await asyncio.gather(*(round_trip(client, rx, s, timeout=600) for s in range(sessions)))


async def latency(client: httpx.AsyncClient, rx: Receiver, sessions: int, count: int,
                  rate: float) -> list[float]:
    """``count`` messages at ``rate``/s over ``sessions`` sessions (one outstanding each)."""
    busy: set[int] = set()
    results: list[float] = []

    async def one(s: int) -> None:
        try:
            results.append(await round_trip(client, rx, s))
            await asyncio.sleep(rx.delay)  # its POST is answered only then: the session is
        finally:                            # busy until the receiver has answered it
            busy.discard(s)

    tasks = []
    for _ in range(count):
        free = [s for s in range(sessions) if s not in busy]
        while not free:
            await asyncio.sleep(0.005)
            free = [s for s in range(sessions) if s not in busy]
        s = random.choice(free)
        busy.add(s)
        tasks.append(asyncio.create_task(one(s)))
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks)
    return results


async def throughput(client: httpx.AsyncClient, rx: Receiver, sessions: int, count: int,
                     concurrency: int = 32) -> dict:
    ids: list[str] = []
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            n = queue.pop()
            ids.append((await post(client, n % sessions, f"t{n}"))["message_id"])

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    accepted_s = time.monotonic() - t0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(i in rx.arrived for i in ids):
        await asyncio.sleep(0.1)
    lost = sum(1 for i in ids if i not in rx.arrived)
    return {"accepted": len(ids), "seconds": round(accepted_s, 2),
            "accepted_per_s": round(len(ids) / accepted_s, 1),
            "all_replied_s": round(time.monotonic() - t0, 2), "lost": lost}


def summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p99_ms": round(pct(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 1) if ms else None}


async def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="orch-bench-api-"))
    api_port, hook_port = free_port(), free_port()
    rx = Receiver()
    receiver = await start_receiver(rx, hook_port)
    config = write_config(root, api_port, hook_port, args.poll, args.nice_agents)
    log = open(root / "orchestrator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out: dict = {"machine_note": "2 shared cores, loaded by other engineers' work meanwhile",
                 "agent_wake": f"poll {args.poll} s" if args.poll else "inotify",
                 "quick": args.quick,
                 "sessions": args.sessions, "agents_nice": args.nice_agents}
    try:
        base = f"http://127.0.0.1:{api_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as probe:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"orchestrator not ready; see {root}/orchestrator.log")
                await asyncio.sleep(0.1)
        token = (root / "data" / "api-token").read_text().strip()
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            n1, n100 = (30, 150) if args.quick else (100, 500)
            only = set(args.only.split(",")) if args.only else None

            def wanted(name: str) -> bool:
                return only is None or name in only

            def record(name: str, values: list[float], first: int) -> None:
                out[name] = summary(values)
                out[name]["commit_to_webhook"] = summary(rx.commit_to_arrival[first:])
                out[name]["post_answered"] = summary(POSTS[-len(values):])
                print(f"{name}:", out[name], flush=True)

            if wanted("latency1"):
                await warm(client, rx, 1)
                first = len(rx.commit_to_arrival)
                record("latency_1", await latency(client, rx, 1, n1, rate=10), first)
            sessions = args.sessions
            if wanted("latency100") or wanted("throughput") or wanted("receiver"):
                await warm(client, rx, sessions)
            if wanted("latency100"):
                first = len(rx.commit_to_arrival)
                record(f"latency_{sessions}",
                       await latency(client, rx, sessions, n100, rate=20), first)
            if wanted("throughput"):
                out[f"throughput_{sessions}"] = await throughput(
                    client, rx, sessions, 500 if args.quick else 2000)
                print("throughput:", out[f"throughput_{sessions}"], flush=True)
            if wanted("receiver"):
                for delay in (0.0, 0.5):
                    rx.delay = delay
                    first = len(rx.commit_to_arrival)
                    record(f"receiver_{int(delay * 1000)}ms_arrival",
                           await latency(client, rx, sessions, n100, rate=20), first)
                rx.delay = 0.0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        receiver.should_exit = True
        await asyncio.sleep(0.2)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and log")
    parser.add_argument("--out", default="bench/results/api.json")
    parser.add_argument("--only", default="", help="latency1,latency100,throughput,receiver")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--nice-agents", type=int, default=0, metavar="N",
                        help="run the agents under nice -n N (the orchestrator keeps its "
                             "priority: 100 agent processes on 2 cores otherwise starve it)")
    parser.add_argument("--poll", type=float, default=0.0, metavar="S",
                        help="agents poll inbound.db every S seconds instead of waking on "
                             "inotify (the reference agent's default)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
