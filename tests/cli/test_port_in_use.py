"""A taken API port (issue #29): the demo does not need the configured port, and
``run`` says who holds it (an orchestrator: its data dir) and how to pick another.

Real processes and real sockets throughout."""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from tests.support.e2e import OrchestratorProcess, config_dict

DEFAULT_PORT = 8750


@contextlib.contextmanager
def holding(port: int) -> Iterator[socket.socket | None]:
    """Listen on 127.0.0.1:port for the test. If something else on this machine
    already holds it, the port is taken either way: go on (yield None)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            yield None
            return
        sock.listen(1)
        yield sock
    finally:
        sock.close()


def run_cli(*argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_demo_succeeds_while_another_process_holds_the_default_port(tmp_path, reap_agents):
    config = tmp_path / "config.toml"
    config.write_text('data_dir = "data"\n')  # the default [api] listen = 127.0.0.1:8750
    with holding(DEFAULT_PORT):
        proc = run_cli("demo", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("demo: HTTP API on"))
    assert re.fullmatch(r"demo: HTTP API on http://127\.0\.0\.1:\d+ \(a free port, not the "
                        r"configured one\)", line), line
    assert f":{DEFAULT_PORT} " not in line
    assert "reply delivered" in proc.stdout
    assert "cannot listen" not in proc.stderr


def test_demo_without_an_api_says_so(tmp_path, reap_agents):
    config = tmp_path / "config.toml"
    config.write_text('data_dir = "data"\n[api]\nlisten = ""\n')
    proc = run_cli("demo", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: no HTTP API" in proc.stdout.splitlines()


def _write_config(tmp_path: Path, name: str, listen: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(config_dict(tmp_path / name, api={"listen": listen})))
    return path


def error_line(stderr: str) -> str:
    """The one error line (the log lines before it are start-up INFO)."""
    errors = [x for x in stderr.splitlines() if x.startswith("orchestrator: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


HOW_TO_PICK = ('pick another port in the config: [api] listen = "127.0.0.1:PORT", '
               '"127.0.0.1:0" for any free one, or "" for no API')


def test_port_held_by_another_orchestrator_names_its_data_dir(tmp_path, reap_agents):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = OrchestratorProcess(_write_config(tmp_path, "first", "127.0.0.1:0"),
                                tmp_path / "first.log")
    try:
        first.wait_up()
        port = int(re.search(r"API listening on http://127\.0\.0\.1:(\d+)",
                             first.text()).group(1))
        second = run_cli("run", "--config",
                         str(_write_config(tmp_path, "second", f"127.0.0.1:{port}")),
                         cwd=tmp_path, timeout=60)
        assert first.proc.poll() is None  # untouched
    finally:
        assert first.end(signal.SIGTERM) == 0, first.text()
    assert second.returncode == 2, second.stderr
    assert error_line(second.stderr) == (
        f"orchestrator: error: [api] listen = http://127.0.0.1:{port}: cannot listen "
        f"(Address already in use); another orchestrator (pid {first.proc.pid}, data dir "
        f"{tmp_path / 'first' / 'data'}) holds it; {HOW_TO_PICK}")


def test_port_held_by_another_program_names_it_and_how_to_pick_another(tmp_path):
    with subprocess.Popen(
            [sys.executable, "-c", "import socket, sys, time\n"
             "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
             "print(s.getsockname()[1], flush=True)\n"
             "sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            port = int(holder.stdout.readline())
            proc = run_cli("run", "--config", str(_write_config(tmp_path, "solo",
                                                                f"127.0.0.1:{port}")),
                           cwd=tmp_path, timeout=60)
        finally:
            holder.kill()
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert line.startswith(f"orchestrator: error: [api] listen = http://127.0.0.1:{port}: "
                                  "cannot listen (Address already in use); "
                                  f"held by pid {holder.pid} ({Path(sys.executable).name}); ")
    assert line.endswith(f"; {HOW_TO_PICK}")
    assert "orchestrator (pid" not in proc.stderr

