"""Round trips with the real reference agent: what a chat user waits for.

Each figure is "message row committed to ``inbound.db`` (the bench's own
``Sessions.write_message``, as ``orchestrator send`` does) → the reply's line
written to the jsonl channel file" (seen by the bench's raw inotify on the data
dir), with the real orchestrator (``bench.host`` = ``orchestrator run``) and the
real reference agent, local processes or Docker containers:

- ``warm``    the agent is running and idle; messages one at a time, each
              after the previous reply (latency, not queueing);
- ``cold``    no agent: ``stop_idle_after = 0`` stops it ``idle_after`` (0.3 s)
              after each reply, and the next message waits until it is gone. A
              first message (not a sample) starts the session's first agent: a
              cold start is a returning session's (its agent idled out), a
              session's very first agent is ``new``'s figure — with Docker it is
              also a container made from nothing, where a returning session's
              start uses the one made for it ahead (``runtime/docker/spares.py``);
- ``paused``  ``pause_idle_after`` froze the idle agent (docker pause / SIGSTOP);
              the message thaws it. A first message (not a sample) starts the
              agent, as for ``warm``: until then there is nothing to freeze.
- ``cold-nopyc`` a ``cold`` run of an orchestrator started from a fresh copy of
              the package (no ``__pycache__`` anywhere) under
              ``PYTHONDONTWRITEBYTECODE=1``: an install where byte code is never
              written. The local runtime compiles the agent's modules once, into
              ``<data_dir>/agent-code/`` (``runtime.local.bytecode``); before that,
              every agent start compiled them.
- ``new``     a brand-new session's first reply: ``POST /v1/messages`` through the
              API (a Unix socket) for a chat never seen before, timed from the
              request's first byte → the reply's line; the session, its folder and
              its agent (container created and started) are all made on the way.

Agents: ``inotify`` (the reference agent as it now is), ``poll1s`` (the same
agent told to poll every second, as NanoClaw's agents do) and ``poll100ms``
(the reference agent before it woke on inotify). Orchestrator watch modes:
``events`` and ``poll`` (``poll_interval`` 1 s).

``agent_idle_cpu`` runs one agent alone on an empty session folder and reads its
CPU time (psutil) over a window: what an idle agent costs the host.

Before the local round trips the ``orchestrator`` package is byte-compiled
(``compile_package``): an installed package has its ``.pyc`` files (pip writes them;
the agent image runs ``compileall``), but a checkout whose sources changed since
its ``__pycache__`` was written, under ``PYTHONDONTWRITEBYTECODE=1``, recompiles
the agent's modules at every start — ~8 ms of each cold round trip that no
installation pays.
"""

from __future__ import annotations

import compileall
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import tomli_w

from bench import collect, proc
from bench.rt_trace import ReplyWatch, steps_line, summarize_steps
from orchestrator.contract.layout import registry_path
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup, Sessions

AGENTS: dict[str, list[str]] = {
    "inotify": ["--wake", "auto"],
    "poll1s": ["--wake", "poll", "--poll-interval", "1"],
    "poll100ms": ["--wake", "poll", "--poll-interval", "0.1"],
}
GROUP = "rt"


@dataclass(frozen=True)
class RTParams:
    warm: int
    cold: int
    paused: int
    docker_warm: int
    docker_cold: int
    docker_paused: int
    agent_idle_seconds: float
    docker_new: int = 3
    timeout: float = 30.0


RT_QUICK = RTParams(warm=10, cold=4, paused=5, docker_warm=6, docker_cold=5, docker_paused=5,
                    agent_idle_seconds=3.0, docker_new=3)
RT_FULL = RTParams(warm=60, cold=15, paused=20, docker_warm=30, docker_cold=10,
                   docker_paused=20, agent_idle_seconds=30.0, docker_new=10)
LIFECYCLES = {
    "warm": {"idle_after": 30.0, "stop_idle_after": 600.0},
    "cold": {"idle_after": 0.3, "stop_idle_after": 0.0},
    "cold-nopyc": {"idle_after": 0.3, "stop_idle_after": 0.0},
    "paused": {"idle_after": 0.2, "pause_idle_after": 0.1, "stop_idle_after": 600.0},
    "new": {"idle_after": 0.3, "stop_idle_after": 0.0},
}


def compile_package() -> bool:
    """Byte-compile the ``orchestrator`` package where it lives (up-to-date files are
    skipped); False if that failed (a read-only install: then it has its .pyc)."""
    import orchestrator

    return bool(compileall.compile_dir(os.path.dirname(orchestrator.__file__), quiet=1))


def fresh_package(dest: Path) -> Path:
    """A copy of the ``orchestrator`` package under ``dest`` without any byte code (a
    fresh checkout); returns ``dest``, the folder to put first on PYTHONPATH."""
    import shutil

    import orchestrator

    shutil.copytree(os.path.dirname(orchestrator.__file__), dest / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


class FreshOrchestrator(proc.Orchestrator):
    """``bench.host`` importing the orchestrator from ``package_root`` (``-P``: not from
    the bench's own checkout) with ``PYTHONDONTWRITEBYTECODE=1``."""

    package_root: Path | None = None

    def start(self) -> None:
        import subprocess

        assert self.package_root is not None
        argv = proc.py("-P", "-m", "bench.host", "--config", str(self.config),
                       "--ready-file", str(self.ready_file))
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join([str(self.package_root), str(proc.REPO)])}
        self.t_spawn = time.time()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=proc.REPO, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        proc._children.append(self.proc)
        self.ps = psutil.Process(self.proc.pid)


class ApiClient:
    """``POST /v1/messages`` over the orchestrator's Unix socket (http.client)."""

    def __init__(self, sock: Path, token_file: Path) -> None:
        self.sock = sock
        self.token_file = token_file

    def post_message(self, body: dict, timeout: float) -> dict:
        import http.client
        import socket

        class Conn(http.client.HTTPConnection):
            def connect(conn) -> None:  # noqa: N805 - http.client's own signature
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(timeout)
                conn.sock.connect(str(self.sock))

        token = self.token_file.read_text().strip()
        conn = Conn("localhost", timeout=timeout)
        try:
            conn.request("POST", "/v1/messages", body=json.dumps(body),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 201:
                raise RuntimeError(f"POST /v1/messages: {resp.status} {data[:200]!r}")
            return json.loads(data)
        finally:
            conn.close()


def docker_image() -> str:
    return (os.environ.get("ORCHESTRATOR_BENCH_IMAGE") or os.environ.get("ORCHESTRATOR_TEST_IMAGE")
            or "orchestrator-agent:latest")


def _status(registry: Registry, session_id: str) -> tuple[str, str]:
    row = registry.session(session_id)
    return (row.container_status, row.status_reason or "") if row else ("?", "")


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


class RoundTrips:
    def __init__(self, bench, params: RTParams) -> None:
        self.bench = bench
        self.p = params
        self._n = 0

    def say(self, msg: str) -> None:
        self.bench.say(msg)

    # --- one orchestrator with one session ---------------------------------------------

    def _config(self, data: Path, runtime: str, agent: str, mode: str, lifecycle: dict,
                instance: str, kind: str = "warm") -> dict:
        args = AGENTS[agent]
        cfg = {
            "data_dir": str(data),
            "runtime": {"kind": runtime, "on_shutdown": "stop", "stop_grace": 2.0,
                        "command": ["{python}", "-m", "orchestrator.agent", *args]},
            "lifecycle": lifecycle,
            "watch": {"mode": mode, "poll_interval": 1.0},
            "delivery": {"channel": "jsonl", "path": "delivered.jsonl"},
            "log": {"level": "INFO"},
            # no API, as in the other runs (bench/fixture.py): its default port is shared
            # by every orchestrator on the host, and a second bench there failed to start;
            # a brand-new session's run needs it: a Unix socket of its own
            "api": {"listen": f"unix:{data / 'api.sock'}" if kind == "new" else ""},
        }
        if runtime == "docker":
            cfg["docker"] = {"image": docker_image(), "instance": instance, "network": "none",
                             "command": ["python3", "-m", "orchestrator.agent", "--workspace",
                                         "/workspace", *args]}
        return cfg

    def measure(self, *, runtime: str, agent: str, mode: str, kind: str, samples: int) -> dict:
        """``kind``: warm | cold | cold-nopyc | paused | new (see the module docstring)."""
        self._n += 1
        run_dir = self.bench.tmp / f"rt{self._n:02d}-{runtime}-{kind}-{agent}-{mode}"
        data = run_dir / "data"
        data.mkdir(parents=True)
        lifecycle = LIFECYCLES[kind]
        instance = f"bench{os.getpid()}x{self._n}"
        config = run_dir / "config.toml"
        cfg = self._config(data, runtime, agent, mode, lifecycle, instance, kind)
        config.write_text(tomli_w.dumps(cfg))
        registry = Registry(registry_path(data))
        sessions = Sessions(data, registry, 1 << 20)
        row = sessions.resolve(GROUP, MessagingGroup("bench", "chat-1"), None, "shared")
        routing = sessions.routing_of(row)
        orch = proc.Orchestrator(run_dir, config)
        if kind == "cold-nopyc":
            orch = FreshOrchestrator(run_dir, config)
            orch.package_root = fresh_package(run_dir / "fresh")
        api = ApiClient(data / "api.sock", data / "api-token")
        watch = ReplyWatch(data / "delivered.jsonl",
                           None if kind == "new" else sessions.paths(row).root)
        lat: list[float] = []
        steps: list[dict[str, float]] = []
        missed = 0
        load = proc.MachineLoad()
        try:
            orch.start()
            orch.wait_ready(60)

            def send() -> float | None:
                watch.drain()
                mid, _ = sessions.write_message(row, {"text": "ping"}, routing=routing)
                t0 = time.time()
                t1 = watch.wait(mid, self.p.timeout)
                if t1 is None:
                    return None
                steps.append(watch.breakdown(t0, t1))
                return 1000.0 * (t1 - t0)

            chats = iter(range(2, 1 << 30))
            last: list[str] = []  # the newest session's id

            def post_new() -> float | None:
                """A chat never seen: a new session, folder and agent on the way."""
                t0 = time.time()
                got = api.post_message({"agent_group": GROUP, "channel": "bench",
                                        "platform_id": f"chat-{next(chats)}",
                                        "content": {"text": "ping"}}, self.p.timeout)
                last[:] = [got["session_id"]]
                t1 = watch.wait(got["message_id"], self.p.timeout)
                return None if t1 is None else 1000.0 * (t1 - t0)

            if kind in ("warm", "paused", "cold"):  # the first message starts the agent;
                if send() is None:  # not a sample (a paused one must have run to be frozen,
                    # a cold one is a returning session's: see the module docstring)
                    raise RuntimeError("no reply to the warm-up message; log:\n"
                                       + orch.log_tail(10))
                steps.clear()
            if kind == "new":  # the API's first answer costs imports: not a sample
                if post_new() is None:
                    raise RuntimeError("no reply to the first new session; log:\n"
                                       + orch.log_tail(10))
            for _ in range(samples):
                if kind == "new":  # the one before is gone: no stop runs beside the start
                    _wait(lambda: _status(registry, last[0])[0] == "stopped", 20)
                elif kind in ("cold", "cold-nopyc"):
                    _wait(lambda: _status(registry, row.id)[0] == "stopped", 20)
                    # the exit is reported before the process is reaped: give that
                    # time, as a user's pause would
                    time.sleep(0.05)
                elif kind == "paused":
                    _wait(lambda: _status(registry, row.id)[1].startswith("paused"), 20)
                else:
                    time.sleep(random.uniform(0.05, 0.15))
                ms = post_new() if kind == "new" else send()
                if ms is None:
                    missed += 1
                else:
                    lat.append(ms)
                if kind == "paused" and not lat and missed:
                    break
        finally:
            machine = load.stop()
            orch.stop()
            watch.close()
            registry.close()
            if runtime == "docker":
                _remove_labelled(instance)
        res = {"runtime": runtime, "agent": agent, "mode": mode, "kind": kind,
               "samples": len(lat), "missed": missed, "latency_ms": collect.summarize_ms(
                   [ms / 1000.0 for ms in lat]), "machine_load": machine,
               "steps_ms": summarize_steps(steps), "log": orch.log_levels()}
        r = res["latency_ms"]
        self.say(f"  {runtime:6} {kind:6} agent {agent:9} watch {mode:6}: "
                 + (f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f}, max {r['max']:.1f} "
                    f"(n={r['n']}{f', missed {missed}' if missed else ''})" if r.get("n")
                    else f"no reply ({missed} missed)")
                 + self.bench._load_note(machine))
        if res["steps_ms"]:
            self.say(f"    p50 ms after the commit: {steps_line(res['steps_ms'])}")
        return res

    # --- one idle agent alone ----------------------------------------------------------

    def agent_idle_cpu(self, agent: str) -> dict:
        self._n += 1
        data = self.bench.tmp / f"rt{self._n:02d}-idle-{agent}"
        data.mkdir(parents=True)
        registry = Registry(registry_path(data))
        row = Sessions(data, registry, 1 << 20).resolve(GROUP, None, None, "agent-shared")
        folder = Sessions(data, registry, 1 << 20).paths(row).root
        registry.close()
        child = proc.spawn(proc.py("-m", "orchestrator.agent", "--workspace", str(folder),
                                   *AGENTS[agent]))
        try:
            _wait(lambda: (folder / ".heartbeat").exists(), 20)
            time.sleep(0.3)
            ps = psutil.Process(child.pid)
            c0, t0 = ps.cpu_times(), time.monotonic()
            time.sleep(self.p.agent_idle_seconds)
            c1, t1 = ps.cpu_times(), time.monotonic()
        finally:
            proc.stop(child)
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        pct = 100.0 * cpu / (t1 - t0)
        self.say(f"  idle agent {agent:9}: {pct:.3f}% of a core ({cpu * 1000:.0f} ms CPU in "
                 f"{t1 - t0:.0f}s)")
        return {"agent": agent, "window_s": t1 - t0, "cpu_s": cpu, "core_pct": pct,
                "note": "psutil reads CPU time in 10 ms clock ticks: 0 means < 1 tick"}

    # --- everything --------------------------------------------------------------------

    def run_all(self, docker: bool) -> dict:
        p = self.p
        out: dict[str, dict] = {"agent_idle_cpu": {}, "local": {}, "docker": {}}
        if not compile_package():
            self.say("  (could not byte-compile the orchestrator package; agents may compile "
                     "their modules at every start)")
        self.say("[round trips] one idle reference agent's CPU")
        for agent in ("inotify", "poll100ms", "poll1s"):  # 3 s each quick, 30 s full
            out["agent_idle_cpu"][agent] = self._guard(lambda: self.agent_idle_cpu(agent))
        self.say("[round trips] local runtime, real reference agent")
        quick = self.p is RT_QUICK  # --quick: the figures the table judges, fewer of the rest
        plan = [("warm", "inotify", "events", p.warm), ("warm", "poll1s", "events", p.warm // 2),
                ("warm", "poll100ms", "events", 0 if quick else p.warm),
                ("warm", "inotify", "poll", p.warm // 3 if quick else p.warm // 2),
                ("cold", "inotify", "events", p.cold),
                ("cold-nopyc", "inotify", "events", p.cold),
                ("new", "inotify", "events", 0 if quick else p.cold),
                ("cold", "poll1s", "events", 0 if quick else p.cold),
                ("paused", "inotify", "events", p.paused)]
        self._run_plan("local", plan, out["local"])
        if not docker:
            return out
        self.say(f"[round trips] Docker runtime, image {docker_image()}")
        plan = [("warm", "inotify", "events", p.docker_warm),
                ("warm", "poll1s", "events", 0 if quick else p.docker_warm // 2),
                ("cold", "inotify", "events", p.docker_cold),
                ("paused", "inotify", "events", p.docker_paused),
                ("new", "inotify", "events", p.docker_new)]
        self._run_plan("docker", plan, out["docker"])
        return out

    def _run_plan(self, runtime: str, plan: list[tuple[str, str, str, int]],
                  into: dict[str, Any]) -> None:
        """Measure each (kind, agent, mode, samples) step that has samples."""
        for kind, agent, mode, n in plan:
            if n > 0:
                into[f"{kind}_{agent}_{mode}"] = self._guard(
                    lambda: self.measure(runtime=runtime, agent=agent, mode=mode, kind=kind,
                                         samples=n))

    def _guard(self, fn: Callable[[], dict]) -> dict:
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken run must not hide the rest
            self.say(f"  !! failed: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}


def _remove_labelled(instance: str) -> None:
    """Remove the containers of this bench run's own instance (nobody else's): its
    agents (the instance label) and its network-namespace holders (``orchestrator.netns``
    = the instance: an orchestrator killed mid-run leaves them, and only a later run of
    the same instance would sweep them)."""
    try:
        import docker

        client = docker.from_env()
        for label in ("orchestrator.instance", "orchestrator.netns"):
            for c in client.containers.list(all=True, filters={"label": f"{label}={instance}"}):
                if c.labels.get(label) == instance:
                    c.remove(force=True)
        client.close()
    except Exception:  # noqa: BLE001 - best effort; the label says whose they are
        pass


def docker_available() -> str | None:
    """None when the engine answers and the image holds the current code (built here if
    it does not: an image from older code would run an agent that refuses today's
    arguments); else why not (one line)."""
    try:
        import docker

        from orchestrator.runtime.docker.image import build_image

        client = docker.from_env()
        try:
            build_image(docker_image(), client=client)
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
