"""The orchestrator's own image, run the way compose.yaml says, on the real engine.

The service in compose.yaml is read and turned into ``docker run`` arguments
(``compose_run_args``; a key it does not know fails the test, so compose.yaml and
this test cannot drift apart — there is no ``docker compose`` on CI machines). The
only substitutions: the published host port is a free one (tests run side by side),
the repository's deploy/compose-config.toml is replaced by a copy with this test's
agent image, instance label and webhook URL, and no restart policy.

Network: the container is on the default bridge, as compose runs it, so the test
proves the published loopback port and the non-loopback listen with its token.
The webhook receiver therefore listens on the bridge's gateway address (reachable
from this machine's containers and the machine itself, nothing else), which the
container knows as ``host.docker.internal`` (compose's ``extra_hosts``). Host
network mode was the other choice; it would skip exactly the parts compose sets up.
"""

from __future__ import annotations

import re
import secrets
import time
import tomllib
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import tomli_w
import yaml
from loguru import logger

from orchestrator.gateway.network import bridge_address
from orchestrator.runtime.docker.image import ImageBuildError
from orchestrator.runtime.docker.server_image import LOCAL_BASE, build_server_image
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from tests.support.api_helpers import Receiver, free_port
from tests.support.docker_fixtures import in_thread, unavailable
from tests.support.helpers import REPO, until

pytestmark = pytest.mark.docker

IMAGE = "orchestrator:latest"
TEST_LABEL = "orchestrator.test-instance"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_KNOWN = {"image", "init", "restart", "command", "user", "cap_drop", "cap_add", "security_opt",
          "read_only", "tmpfs", "stop_grace_period", "ports", "extra_hosts", "volumes",
          "healthcheck"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ``${NAME:-default}``."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"stop_grace_period {duration!r}: this test reads plain seconds ('30s')"
    return float(match.group(1))


def compose_service() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["orchestrator"]


def compose_run_args(service: dict[str, Any], data: Path, config: Path,
                     port: int) -> dict[str, Any]:
    """docker-py ``containers.run`` keyword arguments for the compose service."""
    unknown = set(service) - _KNOWN
    assert not unknown, f"compose.yaml keys this test does not run: {sorted(unknown)}"
    env = {"ORCHESTRATOR_DATA": str(data)}
    volumes: dict[str, dict[str, str]] = {}
    for spec in service["volumes"]:
        source, target, *mode = interpolate(spec, env).split(":")
        if source == "./deploy/compose-config.toml":
            source = str(config)
        volumes[source] = {"bind": target, "mode": mode[0] if mode else "rw"}
    ports: dict[str, tuple[str, int]] = {}
    for spec in service["ports"]:
        host_ip, _, inside = spec.split(":")
        ports[f"{inside}/tcp"] = (host_ip, port)
    hosts = dict(h.split(":", 1) for h in service.get("extra_hosts", []))
    return {
        "image": service["image"], "init": service["init"],
        "command": [interpolate(c, env) for c in service["command"]],
        "user": service["user"], "cap_drop": service["cap_drop"],
        "cap_add": service["cap_add"], "security_opt": service["security_opt"],
        "read_only": service["read_only"], "tmpfs": {t: "" for t in service["tmpfs"]},
        "ports": ports, "extra_hosts": hosts, "volumes": volumes,
    }


def test_compose_interpolation() -> None:
    env = {"ORCHESTRATOR_DATA": "/d"}
    assert interpolate("${ORCHESTRATOR_DATA:-/srv}/c", env) == "/d/c"
    assert interpolate("${ORCHESTRATOR_DATA:-/srv}/c", {}) == "/srv/c"
    assert seconds("30s") == 30.0


@pytest.fixture(scope="module")
def orchestrator_image(docker_client: docker.DockerClient) -> str:
    """orchestrator:latest from this code, FROM the local base (nothing pulled)."""
    try:
        result = build_server_image(IMAGE, base=LOCAL_BASE, client=docker_client)
    except ImageBuildError as exc:
        unavailable(f"cannot build {IMAGE}: {exc}")
    logger.info("{} {} in {:.1f}s", IMAGE, "built" if result.built else "up to date",
                result.seconds)
    return IMAGE


def write_config(tmp_path: Path, instance: str, agent_image: str, hook: str) -> Path:
    """deploy/compose-config.toml with this test's agent image, instance and webhook."""
    data = tomllib.loads((REPO / "deploy" / "compose-config.toml").read_text())
    assert data["data_dir"] == "." and data["runtime"]["kind"] == "docker"
    data["docker"] = {**data.get("docker", {}), "instance": instance, "image": agent_image}
    data["delivery"] = {**data.get("delivery", {}), "channel": "webhook", "url": hook,
                        "retry_base": 0.2}
    path = tmp_path / "compose-config.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def gateway(client: docker.DockerClient) -> str:
    """The default bridge's address on the host (what a container reaches it at)."""
    address = bridge_address(client.networks.get("bridge").attrs["IPAM"]["Config"])
    assert address is not None
    return address


async def ready(api: httpx.AsyncClient) -> bool:
    try:
        return (await api.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_the_image_runs_as_compose_says_and_answers_through_its_api(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        orchestrator_image: str, instance: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    secret = secrets.token_hex(16)
    (data / "webhook-secret").write_text(secret + "\n")
    (data / "webhook-secret").chmod(0o600)
    receiver = await Receiver(secret.encode()).start(host=gateway(docker_client))
    hook = f"http://host.docker.internal:{receiver.port}/hook"
    service = compose_service()
    port = free_port()
    args = compose_run_args(service, data, write_config(tmp_path, instance, agent_image, hook),
                            port)
    started = time.monotonic()
    container = await in_thread(lambda: docker_client.containers.run(
        detach=True, name=f"orch-image-{instance}", labels={TEST_LABEL: instance}, **args))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            await until(lambda: ready(api), 60, "/readyz of the orchestrator container")
            t_ready = time.monotonic() - started
            health = await in_thread(container.exec_run, service["healthcheck"]["test"][1:])
            assert health.exit_code == 0, health.output

            token = (data / "api-token").read_text().strip()
            assert (await api.post("/v1/messages", json={"content": {"text": "x"}},
                                   headers={"Authorization": "Bearer wrong"})).status_code == 401
            sent = time.monotonic()
            r = await api.post("/v1/messages", headers={"Authorization": f"Bearer {token}"},
                               json={"agent_group": "support", "platform_id": "room-1",
                                     "content": {"text": "hello from outside"}})
            assert r.status_code == 201, r.text
            mid = r.json()["message_id"]

            def agents() -> list:
                return docker_client.containers.list(
                    filters={"label": f"{LABEL_INSTANCE}={instance}"})
            await until(lambda: in_thread(agents), 60, "an agent container of this instance")
            got = await until(lambda: [q for q in receiver.replies()
                                       if q.json.get("in_reply_to") == mid], 60,
                              "the reply on the webhook receiver")
            t_reply = time.monotonic() - sent
            assert got[0].signature_ok
            assert "hello from outside" in got[0].json["content"]["text"]

        grace = seconds(service["stop_grace_period"])
        stopping = time.monotonic()
        await in_thread(lambda: container.stop(timeout=int(grace)))
        t_stop = time.monotonic() - stopping
        state = (await in_thread(lambda: docker_client.api.inspect_container(container.id)))
        assert t_stop < grace, f"SIGTERM → exit took {t_stop:.1f}s (grace {grace:g}s)"
        assert state["State"]["ExitCode"] == 0, state["State"]
        logger.info("ready {:.1f}s after run, reply {:.2f}s after the POST, stopped in {:.1f}s",
                    t_ready, t_reply, t_stop)
    finally:
        logs = await in_thread(lambda: container.logs(tail=60).decode(errors="replace"))
        logger.info("orchestrator container log (tail):\n{}", logs)
        await in_thread(lambda: container.remove(force=True))
        await receiver.stop()
