"""Helpers for tests against a real Docker engine (the fixtures built on them —
``docker_client``, ``agent_image``, ``instance``, ``private_dockerd`` — are in conftest.py).

- ``unavailable``: a missing engine FAILS the test when ``CI`` is set (CI must never
  silently skip Docker tests) and skips it otherwise.
- ``remove_labelled``: force-remove the containers of one test instance.
- ``PrivateDockerd``: a second dockerd with its own socket, data and exec roots
  (no bridge, no iptables), that a test may stop and start without disturbing
  the machine's daemon or anyone else's containers.
- session folders and inbound rows made with plain SQL (``make_session``, ``insert_message``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import docker
import pytest

from orchestrator.contract import layout, schema

# A checkout of its own (a git worktree beside this one) may build under a tag of its own.
TEST_IMAGE = os.environ.get("ORCHESTRATOR_TEST_IMAGE", "orchestrator-agent:test")


def in_ci() -> bool:
    """CI is set the way CI services set it (``true``/``1``); ``false``/``0`` is not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(f"{message} (CI is set: Docker tests must run; see .ci/setup-docker.sh)")
    pytest.skip(message)


def remove_labelled(client: docker.DockerClient, label: str, timeout: float = 30.0) -> int:
    """Force-remove every container carrying ``label`` (key=value); wait until none is left
    (a removal the runtime already started may still be in progress)."""
    removed = 0
    deadline = time.monotonic() + timeout
    while True:
        found = client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
        if not found:
            return removed
        if time.monotonic() > deadline:
            raise AssertionError(f"containers labelled {label} still there: {found}")
        for c in found:
            try:
                c.remove(force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: removal already in progress
                    raise
        time.sleep(0.05)


# --- session folders --------------------------------------------------------------


def make_session(data_dir: Path, agent_group: str, session_id: str) -> Path:
    """A session folder as the host creates it: both DBs, inbox/ and outbox/."""
    folder = layout.session_dir(data_dir, agent_group, session_id)
    folder.mkdir(parents=True, exist_ok=True)
    schema.init_inbound(folder / layout.INBOUND_DB)
    schema.init_outbound(folder / layout.OUTBOUND_DB)
    (folder / layout.INBOX).mkdir(exist_ok=True)
    (folder / layout.OUTBOX).mkdir(exist_ok=True)
    return folder


def insert_message(folder: Path, message_id: str, text: str,
                   attachments: list[dict[str, str]] | None = None) -> int:
    """A pending, triggering inbound message with the next even seq (plain SQL)."""
    content: dict[str, Any] = {"text": text}
    if attachments:
        content["attachments"] = attachments
    with schema.opened(folder / layout.INBOUND_DB) as conn, schema.transaction(conn):
        top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages_in").fetchone()[0]
        seq = top + 2 if top % 2 == 0 else top + 1
        conn.execute(
            "INSERT INTO messages_in (id, seq, kind, timestamp, status, content) "
            "VALUES (?, ?, 'chat', ?, 'pending', ?)",
            (message_id, seq, schema.now_ts(), json.dumps(content)))
    return seq


# --- async helpers ----------------------------------------------------------------------


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking docker/test calls without stalling the loop the runtime reports on."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- a private daemon that tests may stop and restart ----------------------------------------


class PrivateDockerd:
    """A throwaway dockerd: own socket, data root, exec root and containerd namespace."""

    def __init__(self, root: Path, live_restore: bool = False):
        self.root = root
        self.live_restore = live_restore  # containers outlive the daemon's stop
        self.sock = root / "d.sock"
        self.base_url = f"unix://{self.sock}"
        self.log_path = root / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        # containerd namespaces must match [A-Za-z0-9]+([._-][A-Za-z0-9]+)*: mkdtemp's
        # random suffix may start with "_", so the namespace gets its own alphanumeric token.
        self.namespace = f"orchtest{uuid.uuid4().hex[:12]}"

    def command(self) -> list[str]:
        """dockerd in its own network namespace (``unshare --net``, same pid: it execs).

        Without ``--bridge`` a second daemon would fight the machine's over docker0;
        with ``--bridge none`` dockerd *deletes* the interface named docker0 at start
        (libnetwork's removeDefaultBridgeInterface) — in a shared namespace that is
        the machine daemon's bridge, and every later ``docker build`` there fails
        ("could not find bridge docker0"). Its own namespace keeps it to itself;
        containers here use network none anyway.
        """
        r = self.root
        return [
            "unshare", "--net", "--",
            "dockerd", "--host", self.base_url, "--data-root", str(r / "data"),
            "--exec-root", str(r / "x"), "--pidfile", str(r / "dockerd.pid"),
            "--bridge", "none", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
            "--shutdown-timeout", "2", "--containerd-namespace", self.namespace,
            "--containerd-plugins-namespace", f"{self.namespace}-plugins",
        ] + (["--live-restore"] if self.live_restore else [])

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.base_url, version="auto", timeout=60)

    def reachable(self) -> bool:
        try:
            c = docker.DockerClient(base_url=self.base_url, version="auto", timeout=3)
            try:
                return bool(c.ping())
            finally:
                c.close()
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.reachable():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"private dockerd did not come up:\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (containers are stopped by the daemon), SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def load_image(self, source: docker.DockerClient, tag: str) -> None:
        """Copy ``tag`` from the machine's daemon (no registry involved)."""
        data = source.images.get(tag).save(named=tag)
        client = self.client()
        try:
            client.images.load(b"".join(data))
        finally:
            client.close()


def private_daemon(live_restore: bool) -> Iterator[PrivateDockerd]:
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        unavailable("a private dockerd needs root and the dockerd binary")
    root = Path(tempfile.mkdtemp(prefix="orchd-", dir="/tmp"))  # short: unix socket paths
    daemon = PrivateDockerd(root, live_restore=live_restore)
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            if daemon.proc is None:
                daemon.start()  # a test left it down: bring it up to clean its containers
            client = daemon.client()
            for c in client.containers.list(all=True):
                c.remove(force=True)
            client.close()
        except Exception:  # noqa: BLE001 - best-effort clean-up of a test daemon
            pass
        daemon.stop()
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
