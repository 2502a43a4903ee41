"""What the Docker runtime makes ahead of demand: network namespaces (``netns.py``) and a
session's next container (``spares.py``).

The bookkeeping rules are table-tested without Docker; against the real engine: an
agent joins a namespace made ahead and then has it alone (loopback only, the holder
removed), a holder that went missing costs nothing but speed, a stopped session's next
container is created ahead and is the one its next start starts — unless what it would
be created with changed —, and closing the runtime leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import docker
import pytest

from orchestrator.runtime.base import SessionRef
from orchestrator.runtime.docker.netns import (
    LABEL_NETNS,
    holder_host_config,
    holder_spec,
    joins,
)
from orchestrator.runtime.docker.spares import Spare, Spares, spare_key, wants_spare
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from tests.runtime.test_docker_runtime import make_runtime
from tests.support.docker_fixtures import in_thread, insert_message, make_session
from tests.support.helpers import holds, ro_db, until

# --- pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("reason,code,wanted", [
    ("stopped", 0, True), ("stopped", 143, True), ("exited", 0, True),
    ("exited", 1, False), ("exited", None, False), ("killed", 137, False),
    ("oom", 137, False), ("vanished", None, False),
])
def test_which_ends_get_a_next_container_ahead(reason: str, code: int | None,
                                               wanted: bool) -> None:
    assert wants_spare(reason, code) is wanted


def _spare(session: str, n: int = 0) -> Spare:
    return Spare(session, f"c-{session}-{n}", None, "k")


@pytest.mark.parametrize("limit,puts,kept,removed", [
    (2, ["a", "b"], ["a", "b"], []),
    (2, ["a", "b", "c"], ["b", "c"], ["c-a-0"]),  # the oldest makes room
    (2, ["a", "a"], ["a"], ["c-a-0"]),  # a newer one of the same session replaces it
    (0, ["a"], [], ["c-a-0"]),  # off: whatever is made is removed at once
])
def test_spares_keep_the_newest_within_the_limit(limit: int, puts: list[str], kept: list[str],
                                                 removed: list[str]) -> None:
    spares = Spares(limit)
    out: list[str] = []
    for i, session in enumerate(puts):
        out += [s.container_id for s in spares.put(Spare(session, f"c-{session}-{0}", None,
                                                         str(i)))]
    assert out == removed
    assert sorted(s.session_id for s in spares.drain()) == kept


def test_a_session_started_twice_is_returning_and_only_recent_ones_count() -> None:
    spares = Spares(4, remember=2)
    spares.started("a")
    assert not spares.returning("a")
    spares.started("a")
    assert spares.returning("a") and not spares.returning("b")
    spares.started("b")
    spares.started("c")  # "a" is the oldest of three: forgotten
    assert not spares.returning("a")


def test_a_spare_is_taken_once_and_known_by_its_container() -> None:
    spares = Spares(4)
    spares.put(_spare("a"))
    assert spares.owns("c-a-0") and not spares.owns("c-b-0")
    assert spares.take("a") == _spare("a")
    assert spares.take("a") is None and not spares.owns("c-a-0") and len(spares) == 0


@pytest.mark.parametrize("change", [
    lambda spec, host, image: ({**spec, "user": "1001:1001"}, host, image),
    lambda spec, host, image: ({**spec, "environment": {**spec["environment"], "K": "2"}},
                               host, image),
    lambda spec, host, image: (spec, {**host, "mem_limit": "256m"}, image),
    lambda spec, host, image: (spec, {**host, "network_mode": "container:other"}, image),
    lambda spec, host, image: (spec, host, "sha256:new"),
])
def test_a_spare_key_changes_with_anything_it_was_created_with(change) -> None:
    spec = {"image": "img", "user": "1000:1000", "environment": {"K": "1"}, "labels": {"a": "b"}}
    host = {"mem_limit": "512m", "network_mode": "container:h", "mounts": [{"Source": "/x"}]}
    key = spare_key(spec, host, "sha256:old")
    assert spare_key(dict(spec), dict(host), "sha256:old") == key  # stable
    assert spare_key(*change(spec, host, "sha256:old")) != key


def test_a_netns_holder_is_least_privilege() -> None:
    host = holder_host_config()
    assert host["network_mode"] == "none" and host["cap_drop"] == ["ALL"]
    assert host["read_only"] and host["security_opt"] == ["no-new-privileges=true"]
    assert host["pids_limit"] <= 4 and host["mem_limit"] == "16m"
    spec = holder_spec("i1", "img")
    assert spec["user"] == "65534:65534" and spec["labels"] == {LABEL_NETNS: "i1"}
    assert LABEL_INSTANCE not in spec["labels"]  # never listed or adopted as an agent
    assert joins("abc") == "container:abc" and joins(None) is None


# --- against the engine ------------------------------------------------------------------------


def _holders(client: docker.DockerClient, instance: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_NETNS}={instance}"},
                                  ignore_removed=True)


def _ours(client: docker.DockerClient, instance: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"},
                                  ignore_removed=True)


def _replied(folder: Path, message_id: str) -> bool:
    with ro_db(folder / "outbound.db") as conn:
        return conn.execute("SELECT 1 FROM messages_out WHERE in_reply_to = ?",
                            (message_id,)).fetchone() is not None


@pytest.mark.docker
async def test_an_agent_joins_a_namespace_made_ahead_kept_for_its_session(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    insert_message(folder, "m2", "hi")
    rt, _ = make_runtime(tmp_path, instance, agent_image, netns_pool=1)
    try:
        rt._netns.fill()
        await until(lambda: rt._netns.ready, 30, "a holder made ahead")
        holder = rt._netns.ready[0]
        handle = await rt.start(SessionRef("g1", "s1", folder))
        info = await in_thread(docker_client.api.inspect_container, handle.ident)
        assert info["HostConfig"]["NetworkMode"] == f"container:{holder}"
        await until(lambda: _replied(folder, "m2"), 30, "the agent's reply")
        res = await in_thread(lambda: docker_client.api.exec_create(
            handle.ident, ["cat", "/proc/net/dev"]))
        out = (await in_thread(docker_client.api.exec_start, res["Id"])).decode()
        assert [line.split(":")[0].strip() for line in out.splitlines()[2:]] == ["lo"]
        # the holder stays the session's while its agent runs (and the pool fills up)
        await until(lambda: len(_holders(docker_client, instance)) == 2, 30, "pool refilled")
        assert holder in [c.id for c in _holders(docker_client, instance)]
        # a namespace outlives its holder: removed by hand, the agent goes on
        await in_thread(lambda: docker_client.api.remove_container(holder, force=True))
        insert_message(folder, "m4", "still there?")
        await until(lambda: _replied(folder, "m4"), 30, "a reply after its holder went")
        await rt.stop("s1", grace=5)
    finally:
        await rt.close()
    assert _holders(docker_client, instance) == [] and _ours(docker_client, instance) == []


@pytest.mark.docker
async def test_a_holder_nothing_will_join_is_removed(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    """No container ahead (prepared_containers = 0): the stop ends the holder's use."""
    folder = make_session(tmp_path, "g1", "s1")
    rt, _ = make_runtime(tmp_path, instance, agent_image, netns_pool=1)
    try:
        rt._netns.fill()
        await until(lambda: rt._netns.ready, 30, "a holder made ahead")
        holder = rt._netns.ready[0]
        await rt.start(SessionRef("g1", "s1", folder))
        await rt.stop("s1", grace=5)
        await until(lambda: holder not in [c.id for c in _holders(docker_client, instance)],
                    15, "its holder removed after the stop")
    finally:
        await rt.close()


@pytest.mark.docker
async def test_a_holder_gone_missing_only_costs_speed(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    insert_message(folder, "m2", "hi")
    rt, _ = make_runtime(tmp_path, instance, agent_image, netns_pool=1)
    try:
        rt._netns.fill()
        await until(lambda: rt._netns.ready, 30, "a holder made ahead")
        await in_thread(lambda: docker_client.api.remove_container(rt._netns.ready[0],
                                                                   force=True))
        handle = await rt.start(SessionRef("g1", "s1", folder))
        info = await in_thread(docker_client.api.inspect_container, handle.ident)
        assert info["HostConfig"]["NetworkMode"] == "none"  # a namespace of its own
        await until(lambda: _replied(folder, "m2"), 30, "the agent's reply")
        await rt.stop("s1", grace=5)
    finally:
        await rt.close()
    assert _holders(docker_client, instance) == [] and _ours(docker_client, instance) == []


@pytest.mark.docker
async def test_a_stopped_session_next_container_is_created_ahead_and_started(
        tmp_path: Path, docker_client: docker.DockerClient, agent_image: str,
        instance: str) -> None:
    folder = make_session(tmp_path, "g1", "s1")
    ref = SessionRef("g1", "s1", folder)
    insert_message(folder, "m2", "hi")
    rt, exits = make_runtime(tmp_path, instance, agent_image, netns_pool=1,
                             prepared_containers=2)

    def created() -> list:
        return [c for c in _ours(docker_client, instance) if c.status == "created"]

    try:
        # a session's first end makes nothing ahead: it has not come back yet
        await rt.start(ref)
        await until(lambda: _replied(folder, "m2"), 30, "the first reply")
        await rt.stop("s1", grace=5)
        await holds(lambda: not created(), 1.0, "nothing created ahead", interval=0.1)
        rt._netns.fill()
        await until(lambda: rt._netns.ready, 30, "a holder made ahead")
        insert_message(folder, "m2b", "back")
        first = await rt.start(ref)
        first_network = (await in_thread(docker_client.api.inspect_container, first.ident)
                         )["HostConfig"]["NetworkMode"]
        await until(lambda: _replied(folder, "m2b"), 30, "the reply of its second run")
        await rt.stop("s1", grace=5)
        spare = (await until(lambda: in_thread(created), 30, "the next container created"))[0]
        assert spare.id != first.ident and not rt.is_running("s1")
        # the same namespace as its first run: a cold cycle makes none
        assert spare.attrs["HostConfig"]["NetworkMode"] == first_network
        await rt.reconcile()  # a created container of ours is not a dead leftover
        assert [c.id for c in await in_thread(created)] == [spare.id]
        assert (spare.attrs["HostConfig"]["NetworkMode"] or "").startswith("container:")
        insert_message(folder, "m4", "again")
        second = await rt.start(ref)
        assert second.ident == spare.id  # only docker start was left
        await until(lambda: _replied(folder, "m4"), 30, "the reply from the spare")
        await rt.stop("s1", grace=5)
        stale = (await until(lambda: in_thread(created), 30, "the next one created"))[0]
        # what a start would create changed (here: the memory limit): never started
        rt.config = replace(rt.config, memory="256m")
        insert_message(folder, "m6", "third")
        third = await rt.start(ref)
        assert third.ident != stale.id
        info = await in_thread(docker_client.api.inspect_container, third.ident)
        assert info["HostConfig"]["Memory"] == 256 * 1024 * 1024
        assert stale.id not in [c.id for c in _ours(docker_client, instance)]
        await until(lambda: _replied(folder, "m6"), 30, "the reply from a new container")
        await rt.stop("s1", grace=5)
        await until(lambda: in_thread(created), 30, "a next container again")
        assert [e.reason for e in exits] == ["stopped"] * 4
    finally:
        await rt.close()
    # closing removes the containers created ahead and every holder
    assert _ours(docker_client, instance) == [] and _holders(docker_client, instance) == []
