"""``compose.make_peers``: ``[cluster]`` off builds nothing; on, it needs the API and a
shared secret (refused in one line before anything opens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.api.auth import ApiConfigError
from orchestrator.cli.compose import make_peers
from orchestrator.config.load import load_config
from orchestrator.config.sections import ConfigError

MEMBERS = ["a=http://127.0.0.1:8750", "b=http://127.0.0.1:8751"]


def test_no_cluster_no_peers(tmp_path: Path) -> None:
    assert make_peers(load_config({}, tmp_path), "token") is None


def test_static_members_and_the_api_token_as_secret(tmp_path: Path) -> None:
    cfg = load_config({"cluster": {"shard": "a", "members": MEMBERS}}, tmp_path)
    peers = make_peers(cfg, "token")
    assert peers is not None and peers.self_id == "a"
    assert [m.id for m in peers.others()] == ["b"] and peers.peer_ok("token")
    assert not peers.peer_ok("wrong") and not peers.peer_ok(None)


def test_own_peer_token_file(tmp_path: Path) -> None:
    cfg = load_config({"cluster": {"shard": "a", "members": MEMBERS,
                                   "peer_token_file": "cluster-secret"}}, tmp_path)
    peers = make_peers(cfg, "token")
    secret = (tmp_path / "data" / "cluster-secret").read_text().strip()
    assert peers is not None and peers.peer_ok(secret) and not peers.peer_ok("token")


@pytest.mark.parametrize("cluster, api, message", [
    ({"shard": "a", "members": MEMBERS}, {"listen": ""}, "[cluster] needs the API"),
    ({"shard": "a", "members": MEMBERS}, {"token_file": ""}, "shared secret"),
])
def test_refused(tmp_path: Path, cluster: dict, api: dict, message: str) -> None:
    cfg = load_config({"cluster": cluster, "api": api}, tmp_path)
    with pytest.raises(ApiConfigError, match=message.replace("[", r"\[")):
        make_peers(cfg, None)


@pytest.mark.parametrize("cluster, message", [
    ({"shard": "c", "members": MEMBERS}, "is not in [cluster] members"),
    ({"shard": "a", "members": ["a=ftp://x"]}, "is not 'ID=http://HOST:PORT'"),
    ({"shard": "a", "members": MEMBERS + ["a=http://h:1"]}, "listed twice"),
    ({"shard": "a b"}, "[cluster] shard"),
    ({"discovery": "kubernetes", "pod_label": "app"}, "[cluster] pod_label"),
])
def test_config_refusals(tmp_path: Path, cluster: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"cluster": cluster}, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shard_ids_by_pod_need_the_pods_name(tmp_path: Path) -> None:
    cfg = load_config({"cluster": {"discovery": "kubernetes", "shard_ids": "pod"}}, tmp_path)
    with pytest.raises(ApiConfigError, match="ORCHESTRATOR_CLUSTER__SHARD"):
        make_peers(cfg, "token")
