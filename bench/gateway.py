"""Bench of the egress gateway: what it adds to a model API call.

    .venv/bin/python -m bench.gateway [--quick] [--out bench/results/gateway.json]

Three processes: a fake model API (HTTPS on loopback with its own CA; ``/small``
answers a short JSON at once, ``/stream`` an SSE stream of ``CHUNKS`` chunks
``GAP_MS`` apart), the real gateway (``orchestrator.gateway.service.Gateway`` as
``orchestrator run`` builds it, one group, its limits raised out of the way), and this
process as the agents: 1 and 50 concurrent clients (httpx, keep-alive), each sending
requests one after another, three ways:

- ``direct``: straight to the API over TLS (the baseline);
- ``base_url``: plain HTTP to the gateway, token as the API key (``ANTHROPIC_BASE_URL``
  mode), the gateway calls the API over verified TLS with the key;
- ``proxy``: ``HTTPS_PROXY`` with the orchestrator's CA (CONNECT, TLS terminated by
  the gateway, key injected).

Per request: latency of ``/small`` (send → whole answer) and time to first byte of
``/stream`` (send → first SSE chunk). Reported: p50/p99 of each, and the gateway's
added p50/p99 against ``direct``. All on one machine: the client, gateway and API
share its cores, so the 50-client figures include queueing for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench import machine

CHUNKS = 5
GAP_MS = 10
SECRET = "sk-bench-not-a-real-key"


def serve_api(folder: Path) -> None:
    """Child process: the fake model API; writes its port to ``folder/port``."""
    from orchestrator.gateway.ca import mint_ca, mint_leaf, pem_cert, pem_key

    ca_key, ca_cert = mint_ca("bench model API CA")
    key, cert = mint_leaf(ca_key, ca_cert, "localhost")
    (folder / "api-ca.pem").write_bytes(pem_cert(ca_cert))
    (folder / "chain.pem").write_bytes(pem_cert(cert) + pem_cert(ca_cert))
    (folder / "key.pem").write_bytes(pem_key(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "chain.pem", folder / "key.pem")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else headers and body meet delayed ACKs (40 ms)

        def setup(self) -> None:  # the TLS handshake in this connection's thread, not
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # in accept
            self.request = ctx.wrap_socket(self.request, server_side=True)
            super().setup()

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            if self.headers.get("x-api-key") != SECRET:
                self.send_response(401)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if self.path.endswith("/small"):
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(CHUNKS):
                data = f"data: chunk {i}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                if i < CHUNKS - 1:
                    time.sleep(GAP_MS / 1000)
            self.wfile.write(b"0\r\n\r\n")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # listen() backlog: 50 clients connect at once

    server = Server(("127.0.0.1", 0), Handler)
    (folder / "port").write_text(str(server.server_address[1]))
    server.serve_forever()


def serve_gateway(folder: Path, api_port: int, gw_port: int) -> None:
    """Child process: the real gateway for one group; writes its env to ``folder/env``."""
    from orchestrator.config.load import load_config
    from orchestrator.gateway.service import Gateway

    (folder / "secret").write_text(SECRET)
    cfg = load_config({
        "data_dir": str(folder / "data"), "log": {"level": "WARNING"},
        "gateway": {"port": gw_port, "upstream_ca_file": str(folder / "api-ca.pem"),
                    "max_requests_per_minute": 1_000_000, "max_connections": 1000},
        "groups": {"bench": {
            "egress": [f"localhost:{api_port}"],
            "egress_credentials": [{"host": "localhost", "header": "x-api-key",
                                    "secret_file": str(folder / "secret"),
                                    "base_url_env": "BASE_URL", "key_env": "API_KEY"}]}},
    }, folder)

    async def main() -> None:
        gw = Gateway(cfg)
        await gw.start()
        egress = gw.admit("bench", "s-bench")
        assert egress is not None
        (folder / "env.tmp").write_text(json.dumps(dict(egress.env)))
        os.replace(folder / "env.tmp", folder / "env")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await gw.close()

    from loguru import logger
    logger.remove()
    asyncio.run(main())


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} not written (child exit {proc.poll()})")
        time.sleep(0.02)
    return path.read_text()


def _client(way: str, env: dict[str, str], folder: Path, clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(60.0)
    if way == "direct":
        return httpx.AsyncClient(verify=ssl.create_default_context(
            cafile=str(folder / "api-ca.pem")), trust_env=False, limits=limits,
            timeout=timeout)
    if way == "proxy":
        return httpx.AsyncClient(proxy=env["HTTPS_PROXY"], verify=ssl.create_default_context(
            cafile=env["SSL_CERT_FILE"]), trust_env=False, limits=limits, timeout=timeout)
    return httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout)


async def _one(client: httpx.AsyncClient, url: str, headers: dict[str, str],
               stream: bool) -> float:
    """Seconds to the whole answer (``/small``) or to the first SSE chunk (``/stream``)."""
    start = time.perf_counter()
    async with client.stream("POST", url, headers=headers, content=b'{"q":1}') as resp:
        assert resp.status_code == 200, resp.status_code
        first = None
        async for _ in resp.aiter_raw():
            if first is None:
                first = time.perf_counter() - start
                if not stream:
                    continue
        return first if stream and first is not None else time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_way(way: str, env: dict[str, str], folder: Path, api_port: int, clients: int,
                  per_client: int) -> dict[str, Any]:
    if way == "direct":
        base, headers = f"https://localhost:{api_port}/v1", {"x-api-key": SECRET}
    elif way == "proxy":
        base, headers = f"https://localhost:{api_port}/v1", {"x-api-key": env["API_KEY"]}
    else:
        base, headers = env["BASE_URL"] + "/v1", {"x-api-key": env["API_KEY"]}
    out: dict[str, Any] = {}
    async with _client(way, env, folder, clients) as client:
        for kind in ("small", "stream"):
            await asyncio.gather(*(_one(client, f"{base}/{kind}", headers, kind == "stream")
                                   for _ in range(clients)))  # warm: connections, leaf cert
            times: list[float] = []

            async def worker() -> None:
                for _ in range(per_client):
                    times.append(await _one(client, f"{base}/{kind}", headers,
                                            kind == "stream"))
            await asyncio.gather(*(worker() for _ in range(clients)))
            label = "latency" if kind == "small" else "ttfb"
            out[label] = {"n": len(times), "p50_ms": _pct(times, 0.5) * 1000,
                          "p99_ms": _pct(times, 0.99) * 1000,
                          "mean_ms": statistics.fmean(times) * 1000}
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["clients  way        latency p50/p99 ms  added p50/p99   "
             "ttfb p50/p99 ms  added p50/p99"]
    for clients, ways in results.items():
        d = ways["direct"]
        for way, r in ways.items():
            def added(label: str) -> str:
                if way == "direct":
                    return "—"
                return (f"{r[label]['p50_ms'] - d[label]['p50_ms']:+.2f}/"
                        f"{r[label]['p99_ms'] - d[label]['p99_ms']:+.2f}")
            lines.append(f"{clients:>7}  {way:<9}  {r['latency']['p50_ms']:6.2f}/"
                         f"{r['latency']['p99_ms']:6.2f}      {added('latency'):<14}  "
                         f"{r['ttfb']['p50_ms']:6.2f}/{r['ttfb']['p99_ms']:6.2f}    "
                         f"{added('ttfb')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/results/gateway.json")
    parser.add_argument("--port", type=int, default=18760, help="the gateway's port")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child[0] == "api":
            serve_api(Path(args.child[1]))
        else:
            serve_gateway(Path(args.child[1]), int(args.child[2]), int(args.child[3]))
        return 0
    per = {1: 100 if args.quick else 400, 50: 10 if args.quick else 40}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp)
        me = [sys.executable, "-m", "bench.gateway", "--child"]
        api = subprocess.Popen(me + ["api", tmp])
        procs = [api]
        try:
            api_port = int(_wait_file(folder / "port", api))
            gw = subprocess.Popen(me + ["gateway", tmp, str(api_port), str(args.port)])
            procs.append(gw)
            env = json.loads(_wait_file(folder / "env", gw))
            results: dict[str, Any] = {}
            for clients, n in per.items():
                results[str(clients)] = {
                    way: asyncio.run(run_way(way, env, folder, api_port, clients, n))
                    for way in ("direct", "base_url", "proxy")}
                print(f"{clients} client(s) done", flush=True)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(table(results))
    doc = {"bench": "gateway", "quick": args.quick, "chunks": CHUNKS, "gap_ms": GAP_MS,
           "per_client": per, "results": results, "loadavg_after": os.getloadavg(),
           "machine": machine.describe(Path(tmp)),
           "code": machine.code_state()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
