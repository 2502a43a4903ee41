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
from orchestrator.runtime.docker.spec import LABEL_SETTINGS
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
    assert a["Config"]["Cmd"] == AGENT and b["Config"]["Cmd"] == AGENT + ["--work-seconds", "0.1"]
    env = {g: dict(e.split("=", 1) for e in i["Config"]["Env"]) for g, i in info.items()}
    assert (env["alpha"]["ROLE"], env["beta"]["ROLE"]) == ("alpha", "beta")
    assert env["beta"]["TOKEN"] == SECRET and "TOKEN" not in env["alpha"]
    assert env["beta"]["ORCHESTRATOR_AGENT_GROUP"] == "beta"
    limits = {g: (i["HostConfig"]["Memory"], i["HostConfig"]["NanoCpus"],
                  i["HostConfig"]["PidsLimit"], i["HostConfig"]["NetworkMode"])
              for g, i in info.items()}
    assert limits == {"alpha": (256 * 2**20, 500_000_000, 64, "none"),
                      "beta": (384 * 2**20, 1_500_000_000, 128, "none")}
    labels = {g: i["Config"]["Labels"][LABEL_SETTINGS] for g, i in info.items()}
    assert labels == {g: s.digest for g, s in settings.items()}
    assert labels["alpha"] != labels["beta"]
    assert [e.reason for e in exits] == ["stopped", "stopped"]
    assert logged and not [line for line in logged if SECRET in line]


@pytest.mark.docker
def test_a_spare_container_is_made_with_its_groups_settings_and_dropped_when_they_differ(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        second_tag: str, instance: str) -> None:
    """[docker] precreate: the container created ahead for a group's session carries
    that group's image, env, group folder and settings label; a start with other settings (a new
    config after a restart) or other mounts (a ``container.json`` written since) does not
    start it but creates a fresh container."""
    def config(role: str):
        return load_config({
            "data_dir": "data", "runtime": {"kind": "docker"},
            "docker": {"instance": instance, "image": agent_image, "command": AGENT,
                       "network": "none", "precreate": 2},
            "groups": {"beta": {"image": second_tag, "env": {"ROLE": role},
                                "group_folder": "{data_dir}/groups/{group}"}}}, tmp_path)

    cfg, changed = config("one"), config("two")
    folder = make_session(cfg.data_dir, "beta", "s1")
    first, second = groups.resolve(cfg, "beta"), groups.resolve(changed, "beta")

    def containers() -> list:
        return docker_client.containers.list(
            all=True, filters={"label": f"orchestrator.instance={instance}"},
            ignore_removed=True)

    async def main() -> tuple[dict, str, str]:
        rt = DockerRuntime(cfg.docker, cfg.data_dir, lambda e: None)
        try:
            await rt.start(SessionRef("beta", "s1", folder, first))
            await rt.stop("s1", grace=5)
            (spare,) = await until(lambda: [c for c in containers() if c.status == "created"],
                                   20, "a spare for s1")
            same = await rt.start(SessionRef("beta", "s1", folder, first))
            assert same.ident == spare.id  # the same settings: the spare is started
            await rt.stop("s1", grace=5)
            (spare,) = await until(lambda: [c for c in containers() if c.status == "created"],
                                   20, "a new spare for s1")
            # a container.json written since the spare was made: it needs its own mount
            (cfg.data_dir / "groups" / "beta" / "container.json").write_text("{}")
            fresh = await rt.start(SessionRef("beta", "s1", folder, first))
            assert fresh.ident != spare.id
            mounted = await in_thread(docker_client.api.inspect_container, fresh.ident)
            assert "/workspace/agent/container.json" in {
                m["Destination"] for m in mounted["Mounts"]}
            await until(lambda: spare.id not in {c.id for c in containers()}, 20,
                        "the spare without container.json removed")
            await rt.stop("s1", grace=5)
            (spare,) = await until(lambda: [c for c in containers() if c.status == "created"],
                                   20, "a new spare for s1")
            info = await in_thread(docker_client.api.inspect_container, spare.id)
            handle = await rt.start(SessionRef("beta", "s1", folder, second))
            await until(lambda: spare.id not in {c.id for c in containers()}, 20,
                        "the outdated spare removed")
            await rt.stop("s1", grace=5)
            return info, spare.id, handle.ident
        finally:
            await rt.close()

    info, spare_id, started = asyncio.run(main())
    assert info["Config"]["Image"] == second_tag
    assert "ROLE=one" in info["Config"]["Env"]
    assert info["Config"]["Labels"][LABEL_SETTINGS] == first.digest
    # the group's own group_folder, mounted in the spare as in a container started at once
    assert [(m["Source"], m["RW"]) for m in info["Mounts"]
            if m["Destination"] == "/workspace/agent"] == [
        (str((cfg.data_dir / "groups" / "beta").resolve()), True)]
    assert started != spare_id  # not started with the old settings
