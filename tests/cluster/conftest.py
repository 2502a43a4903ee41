"""Fixtures of the tests on the real Kubernetes test cluster that run the orchestrator
itself in Pods (tests/cluster/test_deploy.py, tests/cluster/test_two_shards.py).

``orchestrator_image``: the server image of the current code
(``runtime.docker.server_image``), built once per run (skipped when its tag already
carries the code's hash). ``ORCHESTRATOR_TEST_SERVER_IMAGE`` names another tag, so two
checkouts testing at once on one machine do not retag each other's image between its
build and its import into the cluster.
"""

from __future__ import annotations

import os

import pytest

from orchestrator.runtime.docker.image import ImageBuildError
from orchestrator.runtime.docker.server_image import LOCAL_BASE, build_server_image
from tests.support.docker_fixtures import unavailable

SERVER_IMAGE = os.environ.get("ORCHESTRATOR_TEST_SERVER_IMAGE", "orchestrator:latest")


@pytest.fixture(scope="session")
def orchestrator_image() -> str:
    try:
        build_server_image(SERVER_IMAGE, base=LOCAL_BASE)
    except ImageBuildError as exc:
        unavailable(f"cannot build {SERVER_IMAGE}: {exc}")
    return SERVER_IMAGE
