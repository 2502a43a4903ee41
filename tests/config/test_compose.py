"""compose.yaml works from a clone: every host path it mounts from the repository
exists, and the config it mounts loads, runs Docker, and serves the API with a token."""

from __future__ import annotations

import re

from orchestrator.api.auth import is_loopback, parse_listen
from orchestrator.config.load import read_config
from tests.support.helpers import REPO


def volumes() -> list[str]:
    text = (REPO / "compose.yaml").read_text()
    return re.findall(r"^\s+- (\S+:\S+?)(?::ro)?\s*$", text, re.M)


def test_repository_paths_mounted_by_compose_exist() -> None:
    local = [v.split(":")[0] for v in volumes() if v.startswith("./")]
    assert local == ["./deploy/compose-config.toml"]
    for path in local:
        assert (REPO / path).is_file(), path


def test_the_mounted_config_is_the_data_dir_runs_docker_and_needs_the_token(tmp_path) -> None:
    data = tmp_path / "srv-data"
    data.mkdir()
    (data / "config.toml").write_text((REPO / "deploy/compose-config.toml").read_text())
    cfg = read_config(data / "config.toml")
    assert cfg.data_dir == data.resolve()  # the data dir, at its host path
    assert cfg.runtime.kind == "docker"
    listen = parse_listen(cfg.api.listen)
    assert listen.port == 8750 and not is_loopback(listen)
    assert cfg.api.token_file == str(data.resolve() / "api-token")


def test_compose_publishes_the_api_port() -> None:
    text = (REPO / "compose.yaml").read_text()
    assert '"127.0.0.1:8750:8750"' in text
    assert "./config:" not in text  # the folder the repository never had
