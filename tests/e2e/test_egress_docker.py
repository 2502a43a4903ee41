"""The egress gateway with a real Docker agent: the container joins the orchestrator's
internal network (no route out) instead of a general one, reaches the fake model API
only through the gateway, gets the streamed answer, and the key is nowhere it (or
``docker inspect``) can look; from inside, an off-list host, another group's token and
a stopped session's token are refused. Fails, never skips, when CI is set and no
engine answers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.config import groups
from orchestrator.config.load import load_config
from orchestrator.gateway.network import chain_name
from orchestrator.gateway.service import Gateway, network_name
from orchestrator.rules.egress import CA_MOUNT
from orchestrator.runtime.base import AgentExit, SessionRef
from orchestrator.runtime.docker.runtime import DockerRuntime
from tests.support.docker_fixtures import in_thread, make_session, remove_labelled
from tests.support.egress import (
    AGENT_SCRIPT,
    CHUNKS,
    PROBE_SCRIPT,
    SECRET,
    FakeModelApi,
    connect_request,
    free_port_pair,
    parse_agent_output,
)

LINGER = "120"  # seconds the agent stays up after its call, for the looks inside


@pytest.fixture
def open_listener():
    """A host service listening on all addresses, as an SSH daemon or a database would:
    the internal network must not reach it (``network.confine``)."""
    sock = socket.create_server(("0.0.0.0", 0))
    sock.listen(8)
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    sock.close()


@pytest.fixture
def api():
    server = FakeModelApi()
    yield server
    server.close()


def _config(tmp_path: Path, instance: str, image: str, api: FakeModelApi) -> Any:
    secret = tmp_path / "secrets" / "model-key"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    group = {
        "egress": [f"localhost:{api.port}"],
        "egress_credentials": [{
            "host": "localhost", "header": "x-api-key", "secret_file": str(secret),
            "base_url_env": "ANTHROPIC_BASE_URL", "key_env": "ANTHROPIC_API_KEY"}],
    }
    return load_config({
        "data_dir": "data",
        "runtime": {"kind": "docker", "uid_range": ""},
        "docker": {"instance": instance, "image": image, "network": "bridge"},
        "gateway": {"port": free_port_pair()},
        "groups": {
            "proxy": {**group, "command": ["python3", "-c", AGENT_SCRIPT, "proxy",
                                           str(api.port), LINGER]},
            "base": {**group, "command": ["python3", "-c", AGENT_SCRIPT, "base",
                                          str(api.port), LINGER]},
        },
    }, tmp_path)


def drop_confinement(instance: str, interface: str) -> None:
    """The network's iptables chain and its jump go with the network (the orchestrator
    keeps both: agents of an earlier run may still be attached)."""
    if os.geteuid() != 0:
        return
    chain = chain_name(instance, interface)
    for args in (["-D", "INPUT", "-i", interface, "-j", chain], ["-F", chain], ["-X", chain]):
        subprocess.run(["iptables", "-w", *args], capture_output=True, check=False)


def _files_under(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        root = Path(p)
        if root.is_file():
            out.append(root)
        else:
            out += [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    return out


@pytest.mark.docker
def test_docker_agent_reaches_the_model_api_only_through_the_gateway(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str, instance: str,
        api: FakeModelApi, open_listener: int) -> None:
    cfg = _config(tmp_path, instance, agent_image, api)
    folders = {g: make_session(cfg.data_dir, g, f"s-{g}") for g in ("proxy", "base")}
    exits: list[AgentExit] = []

    async def finished(cid: str) -> dict:
        """The agent's output once it printed its environment (its call is over)."""
        logs: dict[str, str] = {"text": ""}

        async def poll() -> None:
            while "environ" not in logs["text"]:
                logs["text"] = await in_thread(lambda: docker_client.api.logs(cid).decode())
                await asyncio.sleep(0.05)
        await asyncio.wait_for(poll(), 60)
        return parse_agent_output(logs["text"])

    async def run_in(cid: str, cmd: list[str]) -> str:
        def go() -> str:
            res = docker_client.api.exec_create(cid, cmd)
            return docker_client.api.exec_start(res["Id"]).decode()
        return await in_thread(go)

    async def ask(cid: str, host: str, port: int, request: bytes) -> str:
        """From inside the agent's container: send ``request`` to the gateway, read all."""
        return await run_in(cid, ["python3", "-c", (
            "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])),5);"
            "s.sendall(sys.argv[3].encode()); f=s.makefile('rb'); print(f.read().decode())"),
            host, str(port), request.decode()])

    async def main() -> dict[str, Any]:
        gw = Gateway(cfg, upstream_verify=api.client_context())
        await gw.start()
        def on_exit(ev: AgentExit) -> None:  # as the supervisor's: the token is revoked
            exits.append(ev)
            gw.revoke(ev.session_id)

        rt = DockerRuntime(cfg.docker, cfg.data_dir, on_exit)
        seen: dict[str, Any] = {"gateway": gw}
        try:
            for g, folder in folders.items():
                settings = groups.resolve(cfg, g)
                handle = await rt.start(SessionRef(g, f"s-{g}", folder, settings,
                                                   gw.admit(g, f"s-{g}")))
                cid = handle.ident
                seen[g] = await finished(cid)
                seen[f"{g}-inspect"] = await in_thread(docker_client.api.inspect_container, cid)
                seen[f"{g}-proc"] = await run_in(cid, ["sh", "-c", "cat /proc/*/environ; true"])
                seen[f"{g}-ca"] = await run_in(cid, ["cat", CA_MOUNT])
            door = gw.doors["proxy"]
            token = dict(gw.admit("proxy", "s-proxy").env)["ANTHROPIC_API_KEY"]
            targets = [f"{door.host}:{door.port}", f"{door.host}:{api.port}",
                       f"{door.host}:{open_listener}",
                       f"127.0.0.1:{api.port}", "192.0.2.1:443", "1.1.1.1:443"]
            cid = seen["proxy-inspect"]["Id"]
            seen["probe"] = json.loads(await run_in(cid, ["python3", "-c", PROBE_SCRIPT,
                                                          *targets]))
            target = f"localhost:{api.port}"
            base_token = dict(gw.admit("base", "s-base").env)["ANTHROPIC_API_KEY"]
            seen["refused"] = await ask(cid, door.host, door.port,
                                        connect_request("evil.example.com:443", token))
            seen["other-group"] = await ask(cid, door.host, door.port,
                                            connect_request(target, base_token))
            seen["network"] = await in_thread(docker_client.api.inspect_network,
                                              network_name(cfg))
            await rt.stop("s-base", grace=2)
            base_door = gw.doors["base"]
            seen["stopped"] = await ask(cid, base_door.host, base_door.port,
                                        connect_request(target, base_token))
            await rt.stop("s-proxy", grace=2)
            return seen
        finally:
            await rt.close()
            await gw.close()

    try:
        seen = asyncio.run(main())
    finally:  # this test's containers first (after a failure they may still be attached)
        remove_labelled(docker_client, f"orchestrator.instance={instance}")
        net = docker_client.api.inspect_network(network_name(cfg))
        drop_confinement(instance, f"br-{net['Id'][:12]}")
        docker_client.api.remove_network(network_name(cfg))
    check_agents(seen, cfg, api)
    check_network(seen, cfg)
    # the host's own open service was there, on every address but the bridge's
    with socket.create_connection(("127.0.0.1", open_listener), 5):
        pass
    assert {e.reason for e in exits} == {"stopped"}


def check_agents(seen: dict[str, Any], cfg: Any, api: FakeModelApi) -> None:
    """Both agents got the whole stream, unbuffered; the upstream saw the key; the key
    is nowhere the agent (or anyone with the Docker socket) can look."""
    gw = seen["gateway"]
    for g in ("proxy", "base"):
        out = seen[g]
        assert out.get("status") == 200, (g, out.get("error"))
        assert [line for _, line in out["lines"]] == [f"data: chunk {i}" for i in range(CHUNKS)]
        inspect = seen[f"{g}-inspect"]
        # the internal network instead of [docker] network = "bridge"
        assert list(inspect["NetworkSettings"]["Networks"]) == [network_name(cfg)]
        assert inspect["HostConfig"]["NetworkMode"] == network_name(cfg)
        # the key is nowhere the agent (or anyone with the socket) can look
        assert SECRET not in json.dumps(out["environ"])
        assert SECRET not in seen[f"{g}-proc"]
        assert SECRET not in json.dumps(inspect)
        mounts = [m["Source"] for m in inspect["Mounts"]]
        assert gw.ca is not None and str(gw.ca.bundle) in mounts
        for f in _files_under(mounts):
            assert SECRET.encode() not in f.read_bytes(), f
        assert "BEGIN CERTIFICATE" in seen[f"{g}-ca"]
        assert out["environ"]["SSL_CERT_FILE"] == CA_MOUNT
    # unbuffered: each agent had its first chunk before the upstream sent its last
    for (g, i) in (("proxy", 0), ("base", 1)):
        assert seen[g]["lines"][0][0] < api.sent[i][-1], g
    assert [r["headers"]["x-api-key"] for r in api.requests] == [SECRET, SECRET]


def check_network(seen: dict[str, Any], cfg: Any) -> None:
    gw = seen["gateway"]
    assert seen["network"]["Internal"] is True
    assert seen["network"]["Labels"]["orchestrator.instance"] == cfg.docker.instance
    # only the gateway's door answers: not a loopback-only listener of the host (the
    # fake API itself), not a host service listening on all addresses (confined by
    # iptables: the test runs as root), not the outside
    probe = seen["probe"]
    door = gw.doors["proxy"]
    assert probe.pop(f"{door.host}:{door.port}") == "ok", probe
    assert all(v != "ok" for v in probe.values()), probe
    head, _, body = seen["refused"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403") and "[groups.proxy] egress" in body
    # a token of another group's session, and of a stopped session
    assert seen["other-group"].startswith("HTTP/1.1 403")
    assert "not one of agent group 'proxy'" in seen["other-group"]
    assert seen["stopped"].startswith("HTTP/1.1 407") and "revoked" in seen["stopped"]
