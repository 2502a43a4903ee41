"""compose: kind kubernetes builds the Kubernetes runtime (no I/O), and the paused tier
is turned off there with one warning line."""

from __future__ import annotations

from pathlib import Path

import pytest
from loguru import logger

from orchestrator.cli.compose import make_runtime, without_paused_tier
from orchestrator.config.load import load_config


@pytest.fixture
def warnings_seen():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


@pytest.mark.parametrize("kind, pause, kept", [
    ("kubernetes", 5.0, 0.0),
    ("kubernetes", 0.0, 0.0),
    ("docker", 5.0, 5.0),
    ("local", 5.0, 5.0),
])
def test_the_paused_tier_is_off_on_kubernetes_only(tmp_path, warnings_seen, kind, pause, kept):
    cfg = load_config({"runtime": {"kind": kind}, "lifecycle": {"pause_idle_after": pause}},
                      tmp_path)
    assert without_paused_tier(cfg).lifecycle.pause_idle_after == kept
    said = [w for w in warnings_seen if "paused tier not available on Kubernetes" in w]
    assert len(said) == (1 if kind == "kubernetes" and pause > 0 else 0)


async def test_kind_kubernetes_makes_the_kubernetes_runtime_without_io(tmp_path: Path):
    cfg = load_config({"runtime": {"kind": "kubernetes", "uid_range": ""},
                       "kubernetes": {"kubeconfig": str(tmp_path / "absent"),
                                      "node_name": "node-1"}}, tmp_path)
    tmp_path.joinpath("data").mkdir()
    runtime = make_runtime(cfg, lambda e: None, lambda: None)
    try:
        assert runtime.name == "kubernetes"
        assert runtime.running() == [] and not runtime.listed
        assert not runtime.is_paused("s")
        await runtime.pause("s")  # a no-op, never an error
        await runtime.resume("s")
    finally:
        await runtime.close()
