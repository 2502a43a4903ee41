"""The fixtures every test module may ask for by name (pytest finds them here).

- (autouse) after each test, loguru is back to one sink on the process's own stderr
  (``sys.__stderr__``: pytest captures it per test at the descriptor, and ``capsys``
  never sees it): a test that calls ``setup_logging`` (the CLI does) would otherwise
  leave a sink on its own captured stream, closed when the test ends, and every later
  test's log lines would fail against it.
- ``anyio_backend``: async tests (``async def test_...``; the anyio plugin runs
  them all, ``anyio_mode = "auto"`` in pyproject.toml) run on asyncio, like the
  orchestrator.
- ``reap_agents``: after the test, SIGKILL any process whose command line names
  this test's tmp folder (only processes the test started).
- ``docker_client``: a connected docker-py client. Unreachable daemon: the test
  FAILS when ``CI`` is set (CI must never silently skip Docker tests) and is
  skipped otherwise.
- ``agent_image``: the agent image built from the current code with the
  project's own ``build_image`` (idempotent: skipped when up to date).
- ``instance``: a unique ``orchestrator.instance`` label value; every container
  carrying it is force-removed after the test.
- ``private_dockerd`` / ``private_dockerd_live``: a throwaway second dockerd a test
  may stop and start (see ``docker_fixtures.PrivateDockerd``).
- ``kube_cluster`` (session): a ``tests.support.kube.Cluster`` for the real single-node
  Kubernetes test cluster that ``.ci/setup-kubernetes.sh`` starts. Unreachable: the test
  FAILS when ``CI`` is set and is skipped otherwise, like Docker.
- ``kube_namespace``: a fresh namespace (created) for one test; deleted after it,
  without waiting for its Pods to go.

Helpers that are not fixtures live in the tests/support package: helpers.py (waiting,
SQLite peeks, ``REPO``), e2e.py (configs, the sending side, ``supervised``,
``OrchestratorProcess``), fakes.py (every shared fake: channels, runtimes, the
watchfiles binding), api_helpers.py, docker_fixtures.py and mounts.py. Test modules
import them absolutely (``from tests.support.e2e import supervised``) and never
import another test module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Iterator

import docker
import pytest
from docker.errors import DockerException
from loguru import logger

from orchestrator.runtime.docker.image import ImageBuildError, build_image
from orchestrator.runtime.docker.spec import LABEL_INSTANCE
from tests.support.docker_fixtures import (
    TEST_IMAGE,
    PrivateDockerd,
    in_ci,
    private_daemon,
    remove_labelled,
    unavailable,
)
from tests.support.e2e import processes_mentioning
from tests.support.kube import SETUP_SCRIPT, Cluster, ClusterUnavailable, connect


@pytest.fixture(autouse=True)
def loguru_sinks_end_with_the_test() -> Iterator[None]:
    yield
    logger.remove()
    logger.add(sys.__stderr__, level="DEBUG")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def reap_agents(tmp_path: Path) -> Iterator[None]:
    """After the test, SIGKILL any process still naming this test's tmp folder."""
    yield
    for pid in processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(version="auto", timeout=60)
        client.ping()
    except DockerException as exc:
        unavailable(f"Docker daemon unreachable: {str(exc).splitlines()[0]}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def agent_image(docker_client: docker.DockerClient) -> str:
    """Build (or confirm up to date) the agent image under a test-only tag."""
    try:
        build_image(TEST_IMAGE, client=docker_client)
    except ImageBuildError as exc:
        unavailable(f"cannot build the agent image: {exc}")
    return TEST_IMAGE


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    value = f"t{uuid.uuid4().hex[:10]}"
    yield value
    remove_labelled(docker_client, f"{LABEL_INSTANCE}={value}")
    remove_labelled(docker_client, f"orchestrator.netns={value}")  # its netns holders


@pytest.fixture
def private_dockerd(docker_client: docker.DockerClient) -> Iterator[PrivateDockerd]:
    """Stopping it stops its containers (the default: no live restore)."""
    yield from private_daemon(live_restore=False)


@pytest.fixture
def private_dockerd_live(docker_client: docker.DockerClient) -> Iterator[PrivateDockerd]:
    """``--live-restore``: its containers keep running while it is down."""
    yield from private_daemon(live_restore=True)


@pytest.fixture(scope="session")
def kube_cluster() -> Cluster:
    try:
        return connect()
    except ClusterUnavailable as exc:
        if in_ci():
            pytest.fail(f"Kubernetes test cluster unusable: {exc} (CI is set: start it with "
                        f"sudo bash {SETUP_SCRIPT})", pytrace=False)
        pytest.skip(f"Kubernetes test cluster unusable: {exc} (start it with {SETUP_SCRIPT})")


@pytest.fixture
def kube_namespace(kube_cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.delete_namespace(name)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, whatever the test runner's: what the host writes must not
    depend on it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)
