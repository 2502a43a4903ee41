"""Round trips on the Kubernetes runtime next to the Docker runtime, in one run.

    python -m bench.kubernetes [--samples-cold 8] [--samples-warm 20] [--out PATH]
        [--kubeconfig /var/lib/orchestrator-k8s/admin.kubeconfig] [--node localhost]
        [--image orchestrator-agent:latest]

The whole orchestrator (``compose.assembled``, the real Supervisor, jsonl channel) runs
in this process, once per runtime, on a fresh data dir with one session and the real
reference agent (``--wake auto``): a Pod on the test cluster (``kind = "kubernetes"``,
a fresh namespace, ``imagePullPolicy: Never``; the image is built if stale, as for the
round trips, and imported into the node's containerd with the tests' ``Cluster``
helper, skipped when it is there already) or a container on the local Docker engine
(``kind = "docker"``, network none). The image is ``--image``, else
``ORCHESTRATOR_BENCH_IMAGE`` / ``ORCHESTRATOR_TEST_IMAGE`` / ``orchestrator-agent:latest``
(``bench.roundtrip.docker_image``). For each runtime:

- ``cold``: no agent runs; ``stop_idle_after = 0`` stops it ``idle_after`` (0.3 s)
  after each reply, and the next message waits until it is gone (Pod deleted /
  container removed). Message row committed -> reply line in the jsonl file.
- ``warm``: the agent runs and idles; one message at a time, each after the previous
  reply (the first message, which starts the agent, is not a sample).
- ``start``: ``Runtime.start`` from call to return: Pod created -> the API server says
  its container runs (Kubernetes; the kubelet reports that a few hundred ms after the
  fact, so a cold round trip can be shorter than this), container created -> started
  (Docker).
- ``api_calls``: API requests made inside ``start`` (Kubernetes: the create and any
  reads while waiting; Docker: image inspect, create, start), and per whole
  start-stop cycle of a cold sample (the deletes and the waits for gone included).
  The watch's own requests (one list and one long-lived watch per (re)connection) are
  not per start and are not counted.

Each run records the machine's load (``bench.proc.MachineLoad``: busy cores, the
share of other programs) and the load averages before and after, as ``uptime`` says
them: this is a shared 2-core machine, and a busy window makes the tails worse.

Prints a table and writes JSON (default ``bench/results/kubernetes.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from bench.proc import MachineLoad
from bench.roundtrip import docker_available, docker_image
from orchestrator.channels.jsonl import read_lines
from orchestrator.cli.compose import assembled, make_runtime
from orchestrator.config.load import load_config
from orchestrator.config.model import Config
from orchestrator.host.sessions import MessagingGroup
from orchestrator.runtime.base import AgentExit, AgentHandle, Runtime, SessionRef

AGENT = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace", "--wake", "auto"]
KUBECTL = "/var/cache/orchestrator-k8s/v1.20.2/bin/kubectl"


class Counted:
    """A runtime with ``start`` timed and its API requests counted; the rest delegated."""

    def __init__(self, inner: Runtime, count: Callable[[], int]) -> None:
        self.inner = inner
        self.count = count
        self.starts: list[float] = []
        self.start_calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def listed(self) -> bool:
        return self.inner.listed

    async def start(self, session: SessionRef) -> AgentHandle:
        t0, c0 = time.perf_counter(), self.count()
        handle = await self.inner.start(session)
        self.starts.append(time.perf_counter() - t0)
        self.start_calls.append(self.count() - c0)
        return handle


def counted_factory(box: list[Counted]) -> Callable[..., Runtime]:
    def factory(cfg: Config, on_exit: Callable[[AgentExit], None],
                on_available: Callable[[], None]) -> Runtime:
        inner: Any = make_runtime(cfg, on_exit, on_available)
        if cfg.runtime.kind == "kubernetes":
            def count() -> int:
                return int(inner.calls.calls)
        else:  # docker: count the calls through its one wrapper
            calls = {"n": 0}
            real = inner.exec.call

            async def call(*args: Any, **kwargs: Any) -> Any:
                calls["n"] += 1
                return await real(*args, **kwargs)

            inner.exec.call = call

            def count() -> int:
                return calls["n"]
        box.append(Counted(inner, count))
        return box[-1]  # type: ignore[return-value]
    return factory


def config(tmp: Path, kind: str, args: argparse.Namespace, namespace: str, *,
           cold: bool) -> Config:
    lifecycle = ({"idle_after": 0.3, "stop_idle_after": 0.0} if cold
                 else {"idle_after": 30.0, "stop_idle_after": 600.0})
    data: dict[str, Any] = {
        "data_dir": str(tmp / "data"),
        "runtime": {"kind": kind, "on_shutdown": "stop", "stop_grace": 2.0},
        "lifecycle": lifecycle,
        "delivery": {"channel": "jsonl", "path": "delivered.jsonl"},
        "api": {"listen": ""},
        "log": {"level": "WARNING"},
    }
    instance = f"bench{uuid.uuid4().hex[:8]}"
    if kind == "kubernetes":
        data["kubernetes"] = {"namespace": namespace, "kubeconfig": args.kubeconfig,
                              "node_name": args.node, "instance": instance,
                              "image": args.image, "image_pull_policy": "Never",
                              "command": AGENT, "cpu_request": "10m",
                              "memory_request": "32Mi"}
    else:
        data["docker"] = {"image": args.image, "instance": instance, "network": "none",
                          "command": AGENT}
    return load_config(data, tmp)


async def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.002)


async def run_one(kind: str, args: argparse.Namespace, namespace: str, *, cold: bool,
                  samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        cfg = config(Path(tmp), kind, args, namespace, cold=cold)
        box: list[Counted] = []
        async with assembled(cfg, runtime_factory=counted_factory(box)) as service:
            sup = service.supervisor
            task = asyncio.create_task(sup.serve())
            await asyncio.wait_for(sup.ready.wait(), 60)
            rt = box[0]
            row = sup.sessions.resolve("bench", MessagingGroup("bench", "chat"), None,
                                       "shared")

            def replied(mid: str) -> bool:
                return any(r.get("in_reply_to") == mid for r in read_lines(cfg.delivery.path))

            async def one() -> float:
                mid, _ = sup.sessions.write_message(row, {"text": "ping"},
                                                    routing=sup.sessions.routing_of(row))
                t0 = time.perf_counter()
                await wait(lambda: replied(mid), 120, "the reply")
                return time.perf_counter() - t0

            times: list[float] = []
            cycle_calls: list[int] = []
            load = MachineLoad()
            if not cold:
                await one()  # starts the agent: not a sample
            for i in range(samples):
                c0 = rt.count()
                times.append(await one())
                if cold:
                    # the reply may come before start() returns (the kubelet reports the
                    # container running late): wait for this sample's start, then its stop
                    await wait(lambda: len(rt.starts) > i, 120, "the start returned")
                    await wait(lambda: not rt.inner.is_running(row.id) and
                               sup.tracked[row.id].status == "stopped", 120, "stopped")
                    await settled(rt.count)  # the finished Pod's / container's delete
                    cycle_calls.append(rt.count() - c0)
            machine = load.stop()
            sup.stop_event.set()
            await asyncio.wait_for(task, 60)
        return {"round_trip": times, "start": rt.starts, "start_calls": rt.start_calls,
                "cycle_calls": cycle_calls, "machine_load": machine}


async def settled(count: Callable[[], int], quiet: float = 0.3, timeout: float = 30) -> None:
    """Until no API request was made for ``quiet`` s (the deletes after a stop run in
    the background), so each cold cycle's count is whole."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        if count() != last:
            last, since = count(), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def summary(cold: dict, warm: dict) -> dict[str, Any]:
    return {
        "cold_p50_ms": pct(cold["round_trip"], 0.5) * 1000,
        "cold_p99_ms": pct(cold["round_trip"], 0.99) * 1000,
        "warm_p50_ms": pct(warm["round_trip"], 0.5) * 1000,
        "warm_p99_ms": pct(warm["round_trip"], 0.99) * 1000,
        "start_p50_ms": pct(cold["start"], 0.5) * 1000,
        "start_p99_ms": pct(cold["start"], 0.99) * 1000,
        "api_calls_in_start": statistics.mean(cold["start_calls"]) if cold["start_calls"]
        else None,
        "api_calls_per_cold_cycle": statistics.mean(cold["cycle_calls"])
        if cold["cycle_calls"] else None,
        "samples": {"cold": len(cold["round_trip"]), "warm": len(warm["round_trip"])},
        "foreign_cores": {"cold": cold["machine_load"]["foreign_cores"],
                          "warm": warm["machine_load"]["foreign_cores"]},
    }


def kubectl(args: argparse.Namespace, *cmd: str) -> None:
    subprocess.run([KUBECTL, "--kubeconfig", args.kubeconfig, *cmd], check=True,
                   capture_output=True, timeout=60)


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 min)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()


def prepare_image(args: argparse.Namespace) -> None:
    """The agent image of the current code in Docker (built if stale) and on the node."""
    why = docker_available()
    if why is not None:
        raise SystemExit(f"Docker engine or image {args.image} not usable: {why}")
    from tests.support.kube import connect  # the checkout's helper: docker save | ctr import

    connect(Path(args.kubeconfig)).import_image(args.image)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    kubectl(args, "create", "namespace", namespace)
    results: dict[str, Any] = {"uptime_before": uptime(), "image": args.image,
                               "samples_asked": {"cold": args.samples_cold,
                                                 "warm": args.samples_warm}}
    try:
        for kind in ("kubernetes", "docker"):
            cold = await run_one(kind, args, namespace, cold=True, samples=args.samples_cold)
            warm = await run_one(kind, args, namespace, cold=False, samples=args.samples_warm)
            results[kind] = {"summary": summary(cold, warm), "cold": cold, "warm": warm}
    finally:
        with suppress(Exception):
            kubectl(args, "delete", "namespace", namespace, "--wait=false")
    results["uptime_after"] = uptime()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kubernetes")
    ap.add_argument("--samples-cold", type=int, default=8)
    ap.add_argument("--samples-warm", type=int, default=20)
    ap.add_argument("--kubeconfig", default="/var/lib/orchestrator-k8s/admin.kubeconfig")
    ap.add_argument("--node", default="localhost")
    ap.add_argument("--image", default=docker_image())
    ap.add_argument("--out", default="bench/results/kubernetes.json")
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    os.environ["ORCHESTRATOR_BENCH_IMAGE"] = args.image  # docker_available builds this one
    prepare_image(args)
    results = asyncio.run(main_async(args))
    print(results["uptime_before"])
    print(f"{'runtime':<11} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} {'warm p99':>9} "
          f"{'start p50':>10} {'start p99':>10} {'calls/start':>12} {'calls/cycle':>12}")
    for kind in ("kubernetes", "docker"):
        s = results[kind]["summary"]
        print(f"{kind:<11} {s['cold_p50_ms']:8.0f}ms {s['cold_p99_ms']:8.0f}ms "
              f"{s['warm_p50_ms']:8.1f}ms {s['warm_p99_ms']:8.1f}ms "
              f"{s['start_p50_ms']:9.0f}ms {s['start_p99_ms']:9.0f}ms "
              f"{s['api_calls_in_start']:12.1f} {s['api_calls_per_cold_cycle']:12.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(results["uptime_after"])
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
