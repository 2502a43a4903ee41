"""Shared parts of the egress gateway tests: a fake model API and a tiny agent.

- ``FakeModelApi``: HTTPS on loopback with its own test CA (minted with
  ``cryptography``), answering every request with an SSE stream in ``CHUNKS`` chunks,
  ``GAP`` seconds apart, recording the headers it received and when each chunk left
  (``time.monotonic()``: CLOCK_MONOTONIC, the same clock in a container and on the host).
- ``AGENT_SCRIPT``: a stdlib-only agent (runs in the agent image too) that calls the
  API through ``HTTPS_PROXY`` (mode ``proxy``) or the base URL (mode ``base``) and
  prints one JSON line per SSE line received, with its arrival time, then its own
  environment (so a test can grep it).
- ``raw_request``: bytes to the gateway, its whole answer back (for refusals).
"""

from __future__ import annotations

import json
import socket
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orchestrator.gateway.ca import mint_ca, mint_leaf, pem_cert, pem_key

CHUNKS = 4
GAP = 0.4  # seconds between two chunks of the stream
SECRET = "sk-test-SECRET-0123456789abcdef"


class FakeModelApi:
    def __init__(self) -> None:
        self.ca_key, self.ca_cert = mint_ca("fake model API test CA")
        key, cert = mint_leaf(self.ca_key, self.ca_cert, "localhost")
        self._dir = tempfile.TemporaryDirectory()
        folder = Path(self._dir.name)
        (folder / "chain.pem").write_bytes(pem_cert(cert) + pem_cert(self.ca_cert))
        (folder / "key.pem").write_bytes(pem_key(key))
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(pem_cert(self.ca_cert))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(folder / "chain.pem", folder / "key.pem")
        self.requests: list[dict[str, Any]] = []
        self.sent: list[list[float]] = []  # per request: when each chunk was flushed
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                api.requests.append({"method": self.command, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body.decode("utf-8", "replace")})
                times: list[float] = []
                api.sent.append(times)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i in range(CHUNKS):
                    data = f"data: chunk {i}\n\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    times.append(time.monotonic())
                    if i < CHUNKS - 1:
                        time.sleep(GAP)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = server_ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def client_context(self) -> ssl.SSLContext:
        """What the gateway trusts for this upstream (the test CA only)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._dir.cleanup()


AGENT_SCRIPT = r'''
import json, os, sys, time, urllib.request
mode, port = sys.argv[1], sys.argv[2]
out = sys.stdout
def say(**kw):
    out.write(json.dumps(kw) + "\n"); out.flush()
try:
    if mode == "proxy":
        opener = urllib.request.build_opener()  # HTTPS_PROXY from the environment
        req = urllib.request.Request(f"https://localhost:{port}/v1/messages", data=b'{"q":1}',
                                     headers={"x-api-key": os.environ.get("ANTHROPIC_API_KEY", ""),
                                              "content-type": "application/json"})
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages",
                                     data=b'{"q":1}',
                                     headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"],
                                              "content-type": "application/json"})
    with opener.open(req, timeout=30) as resp:
        say(status=resp.status)
        while True:
            line = resp.readline()
            if not line:
                break
            if line.strip():
                say(t=time.monotonic(), line=line.decode().strip())
except Exception as exc:
    say(error=f"{type(exc).__name__}: {exc}")
say(environ=dict(os.environ))
if len(sys.argv) > 3:  # stay up a while: a test looks inside the running agent
    time.sleep(float(sys.argv[3]))
'''

# run inside an agent container: which addresses answer (each "ok" or the error)
PROBE_SCRIPT = r'''
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        out[target] = "ok"
    except OSError as exc:
        out[target] = type(exc).__name__
    finally:
        s.close()
print(json.dumps(out))
'''


def parse_agent_output(text: str) -> dict[str, Any]:
    """{status, lines: [(t, line)], environ, error} from the agent's output."""
    result: dict[str, Any] = {"lines": []}
    for raw in text.splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if "line" in row:
            result["lines"].append((row["t"], row["line"]))
        else:
            result.update(row)
    return result


def raw_request(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` to the gateway; everything it answers until it closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        parts = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            parts.append(chunk)
            if b"\r\n\r\n" in b"".join(parts) and b"content-length: 0" in b"".join(parts):
                break
    return b"".join(parts)


def connect_request(target: str, token: str | None) -> bytes:
    import base64

    auth = (f"Proxy-Authorization: Basic "
            f"{base64.b64encode(f'orchestrator:{token}'.encode()).decode()}\r\n"
            if token is not None else "")
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on loopback (the gateway's first two doors)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")
