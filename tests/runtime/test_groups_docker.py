"""Agent groups on a real Docker engine: two groups side by side, each container with
its group's image, command, environment (a secret from a file included), limits and
settings label. Fails, never skips, when CI is set and no engine answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest
from loguru import logger

from orchestrator.config import groups
from orchestrator.config.load import load_config
from orchestrator.runtime.base import AgentExit, SessionRef
from orchestrator.runtime.docker.runtime import DockerRuntime
from orchestrator.runtime.docker.spec import LABEL_SETTINGS, quick_command
from tests.support.docker_fixtures import in_thread, insert_message, make_session
from tests.support.helpers import query, until

AGENT = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace",
         "--poll-interval", "0.05", "--heartbeat-interval", "0.2"]
SECRET = "d0cker-s3cret-77"


@pytest.fixture
def second_tag(docker_client: docker.DockerClient, agent_image: str):
    """The agent image under a second tag of this test's own (removed afterwards)."""
    repo, tag = agent_image.rsplit(":", 1)
    name = f"{repo}:{tag}-group-b"
    docker_client.images.get(agent_image).tag(repo, f"{tag}-group-b")
    yield name
    docker_client.images.remove(name)  # only the tag: the image itself stays


@pytest.mark.docker
def test_two_groups_side_by_side_with_their_own_image_env_and_limits(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        second_tag: str, instance: str) -> None:
    (tmp_path / "token").write_text(SECRET + "\n")
    cfg = load_config({
        "data_dir": "data",
        "runtime": {"kind": "docker"},
        "docker": {"instance": instance, "image": agent_image, "command": AGENT,
                   "network": "none"},
        "groups": {
            "alpha": {"env": {"ROLE": "alpha"}, "memory": "256m", "cpus": 0.5,
                      "pids_limit": 64},
            "beta": {"image": second_tag, "command": AGENT + ["--work-seconds", "0.1"],
                     "env": {"ROLE": "beta"}, "env_files": {"TOKEN": "token"},
                     "memory": "384m", "cpus": 1.5, "pids_limit": 128}}}, tmp_path)
    data_dir = cfg.data_dir
    folders = {g: make_session(data_dir, g, f"s-{g}") for g in ("alpha", "beta")}
    for g, folder in folders.items():
        insert_message(folder, f"m-{g}", f"hello {g}")
    settings = {g: groups.resolve(cfg, g) for g in folders}
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="TRACE", format="{message}")
    exits: list[AgentExit] = []

    async def main() -> dict[str, dict]:
        rt = DockerRuntime(cfg.docker, data_dir, exits.append)
        try:
            handles = {g: await rt.start(SessionRef(g, f"s-{g}", folder, settings[g]))
                       for g, folder in folders.items()}
            for g, folder in folders.items():
                await until(lambda: query(folder / "outbound.db", "SELECT in_reply_to FROM"
                                          " messages_out"), 60, f"the {g} agent's reply")
            info = {g: await in_thread(docker_client.api.inspect_container, h.ident)
                    for g, h in handles.items()}
            for g in folders:
                await rt.stop(f"s-{g}", grace=5)
            return info
        finally:
            await rt.close()

    try:
        info = asyncio.run(main())
    finally:
        logger.remove(sink)
    a, b = info["alpha"], info["beta"]
    assert a["State"]["Running"] and b["State"]["Running"]  # side by side
    assert (a["Config"]["Image"], b["Config"]["Image"]) == (agent_image, second_tag)
    # the reference agent, started the quick way the image's label allows (quick_command)
    labels = {g: (i["Config"].get("Labels") or {}) for g, i in info.items()}
    assert a["Config"]["Cmd"] == quick_command(AGENT, labels["alpha"])
    assert b["Config"]["Cmd"] == quick_command(AGENT + ["--work-seconds", "0.1"], labels["beta"])
    env = {g: dict(e.split("=", 1) for e in i["Config"]["Env"]) for g, i in info.items()}
    assert (env["alpha"]["ROLE"], env["beta"]["ROLE"]) == ("alpha", "beta")
    assert env["beta"]["TOKEN"] == SECRET and "TOKEN" not in env["alpha"]
    assert env["beta"]["ORCHESTRATOR_AGENT_GROUP"] == "beta"
    # network "none": a namespace of its own, or one made ahead (netns.py) it joined
    limits = {g: (i["HostConfig"]["Memory"], i["HostConfig"]["NanoCpus"],
                  i["HostConfig"]["PidsLimit"],
                  "none" if i["HostConfig"]["NetworkMode"].startswith("container:")
                  else i["HostConfig"]["NetworkMode"])
              for g, i in info.items()}
    assert limits == {"alpha": (256 * 2**20, 500_000_000, 64, "none"),
                      "beta": (384 * 2**20, 1_500_000_000, 128, "none")}
    labels = {g: i["Config"]["Labels"][LABEL_SETTINGS] for g, i in info.items()}
    assert labels == {g: s.digest for g, s in settings.items()}
    assert labels["alpha"] != labels["beta"]
    assert [e.reason for e in exits] == ["stopped", "stopped"]
    assert logged and not [line for line in logged if SECRET in line]
