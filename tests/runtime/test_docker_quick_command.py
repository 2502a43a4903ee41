"""The reference agent's container starts as ``python3 -S -P <__main__.py>`` where the
image names that file (``spec.quick_command``; Dockerfile.agent's label)."""

from __future__ import annotations

import re

import pytest

from orchestrator.runtime.docker.image import DOCKERFILE
from orchestrator.runtime.docker.spec import LABEL_AGENT_MAIN, quick_command

MAIN = "/opt/orchestrator/orchestrator/agent/__main__.py"
REF = ["python3", "-m", "orchestrator.agent", "--workspace", "/workspace"]


@pytest.mark.parametrize("command,labels,expected", [
    (REF, {LABEL_AGENT_MAIN: MAIN}, ["python3", "-S", "-P", MAIN, "--workspace", "/workspace"]),
    (REF, {}, REF),  # an image that does not say where its agent is: as configured
    (REF, None, REF),
    (REF, {LABEL_AGENT_MAIN: "relative/__main__.py"}, REF),
    (REF, {LABEL_AGENT_MAIN: "/opt/x/agent.py"}, REF),
    (["python3", "-m", "my_agent"], {LABEL_AGENT_MAIN: MAIN}, ["python3", "-m", "my_agent"]),
    (["node", "agent.js"], {LABEL_AGENT_MAIN: MAIN}, ["node", "agent.js"]),
    (("python3", "-m", "orchestrator.agent"), {LABEL_AGENT_MAIN: MAIN},
     ["python3", "-S", "-P", MAIN]),
])
def test_quick_command(command, labels, expected) -> None:
    assert quick_command(command, labels) == expected


def test_the_agent_image_names_the_file_it_copies() -> None:
    """The label of Dockerfile.agent points into the folder its COPY fills and its
    PYTHONPATH names (what ``-S -P <file>`` relies on)."""
    text = DOCKERFILE.read_text()
    label = re.search(rf'LABEL {re.escape(LABEL_AGENT_MAIN)}="([^"]+)"', text)
    assert label is not None and label.group(1) == MAIN
    assert "COPY orchestrator /opt/orchestrator/orchestrator" in text
    assert "PYTHONPATH=/opt/orchestrator " in text
