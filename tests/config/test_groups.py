"""groups: [groups.<name>] validation, the effective settings, the digest, secrets."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from orchestrator.config import groups
from orchestrator.config.groups import SecretUnreadable, read_env, resolve
from orchestrator.config.load import load_config
from orchestrator.config.model import GROUP_KEYS, GroupConfig
from orchestrator.config.render import render_default
from orchestrator.config.sections import ConfigError

BASE = Path("/base/dir")


def cfg_with(groups_table: dict, **sections) -> object:
    return load_config({"groups": groups_table, **sections}, BASE)


# --- loading ------------------------------------------------------------------------------

def test_every_key_of_a_group_is_loaded():
    cfg = cfg_with({"support": {
        "command": ["bot", "--fast"], "image": "bot:2", "env": {"MODEL": "small", "A": "1"},
        "env_files": {"API_KEY": "secrets/key"}, "mounts": ["/srv/kb:/kb:ro"],
        "group_folder": "{data_dir}/nc/{group}", "memory": "1g", "cpus": 2, "pids_limit": 64, "network": "bridge", "max_agents": 3,
        "idle_after": 5, "stop_idle_after": 6, "ceiling": 7, "claim_stuck": 8}})
    (g,) = cfg.groups
    assert g == GroupConfig(
        name="support", command=("bot", "--fast"), image="bot:2",
        env=(("A", "1"), ("MODEL", "small")), env_files=(("API_KEY", "/base/dir/secrets/key"),),
        mounts=("/srv/kb:/kb:ro",), group_folder="{data_dir}/nc/{group}", memory="1g", cpus=2.0, pids_limit=64, network="bridge",
        max_agents=3, idle_after=5.0, stop_idle_after=6.0, ceiling=7.0, claim_stuck=8.0)
    assert tuple(f.name for f in dataclasses.fields(GroupConfig))[1:] == GROUP_KEYS


def test_groups_are_sorted_and_default_to_none():
    cfg = cfg_with({"b": {}, "a": {"memory": "2g"}})
    assert [g.name for g in cfg.groups] == ["a", "b"]
    assert cfg.groups[1] == GroupConfig(name="b")


BAD = [
    ({"g": {"bogus": 1}}, "unknown key [groups.g] bogus: allowed keys are command, image"),
    ({"../x": {}}, "[groups.../x]: invalid agent group"),
    ({"g": 3}, "[groups.g] must be a table"),
    ({"g": {"memory": 512}}, "[groups.g] memory must be a string"),
    ({"g": {"cpus": 0}}, "[groups.g] cpus must be between 0.01 and 1024"),
    ({"g": {"pids_limit": True}}, "[groups.g] pids_limit must be an integer"),
    ({"g": {"idle_after": "5"}}, "[groups.g] idle_after must be a number"),
    ({"g": {"mounts": "/a:/b"}}, "[groups.g] mounts must be a list of strings"),
    ({"g": {"command": []}}, "[groups.g] command must be a non-empty list of strings"),
    ({"g": {"command": ["a", 1]}}, "[groups.g] command must be a non-empty list of strings"),
    ({"g": {"max_agents": 0}}, "[groups.g] max_agents must be an integer between 1 and"),
    ({"g": {"max_agents": 2.5}}, "[groups.g] max_agents must be an integer between 1 and"),
    ({"g": {"env": ["A=1"]}}, "[groups.g] env must be a table of NAME"),
    ({"g": {"env": {"1A": "x"}}}, "[groups.g] env: '1A' is not a valid variable name"),
    ({"g": {"env": {"ORCHESTRATOR_SESSION": "x"}}}, "ORCHESTRATOR_SESSION is reserved"),
    ({"g": {"env": {"A": 5}}}, "[groups.g] env A must be a string"),
    ({"g": {"env_files": {"K": ""}}}, "[groups.g] env_files K must be a non-empty path"),
    ({"g": {"env": {"K": "v"}, "env_files": {"K": "/p"}}}, "K is in both env and env_files"),
    ("not a table", "[groups] must be a table"),
]


@pytest.mark.parametrize("raw, message", BAD)
def test_bad_group_settings_are_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config({"groups": raw}, BASE)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_a_plain_env_value_is_never_echoed_in_an_error():
    with pytest.raises(ConfigError) as err:
        load_config({"groups": {"g": {"env": {"TOKEN": "hunter2\x00"}}}}, BASE)
    assert "hunter2" not in str(err.value)


def test_the_commented_example_in_the_default_config_is_valid():
    lines = render_default().splitlines()
    start = lines.index("# [groups.support]")
    example = [line[2:] for line in lines[start:] if line.startswith("# ")
               and not line.startswith("#   ")]
    data = tomllib.loads("\n".join(example))
    (g,) = load_config(data, BASE).groups
    assert all(getattr(g, key) is not None for key in GROUP_KEYS)


# --- effective settings: unset keys inherit -----------------------------------------------

RESOLVE = [
    # (groups table, [runtime] kind, getter, expected)
    ({}, "local", lambda s: s.runtime.command, ("{python}", "-m", "orchestrator.agent")),
    ({"g": {"command": ["x"]}}, "local", lambda s: s.runtime.command, ("x",)),
    ({"g": {"command": ["x"]}}, "local", lambda s: s.docker.command,
     ("python3", "-m", "orchestrator.agent", "--workspace", "/workspace")),
    ({"g": {"command": ["x"]}}, "docker", lambda s: s.docker.command, ("x",)),
    ({"g": {"command": ["x"]}}, "docker", lambda s: s.runtime.command,
     ("{python}", "-m", "orchestrator.agent")),
    ({}, "docker", lambda s: (s.docker.image, s.docker.memory, s.docker.cpus,
                              s.docker.pids_limit, s.docker.network),
     ("orchestrator-agent:latest", "512m", 1.0, 256, "none")),
    ({"g": {"image": "i:2", "memory": "1g", "network": "bridge"}}, "docker",
     lambda s: (s.docker.image, s.docker.memory, s.docker.cpus, s.docker.network),
     ("i:2", "1g", 1.0, "bridge")),
    ({"g": {"mounts": ["/a:/b"]}}, "docker", lambda s: s.docker.mounts, ("/a:/b",)),
    ({"g": {"group_folder": "/srv/g"}}, "docker", lambda s: s.docker.group_folder, "/srv/g"),
    ({}, "docker", lambda s: s.docker.group_folder, ""),
    ({"other": {"memory": "9g"}}, "docker", lambda s: s.docker.memory, "512m"),
    ({"g": {"idle_after": 3}}, "local", lambda s: (s.lifecycle.idle_after,
                                                   s.lifecycle.stop_idle_after), (3.0, 300.0)),
    ({"g": {"ceiling": 9, "claim_stuck": 2}}, "local",
     lambda s: (s.lifecycle.ceiling, s.lifecycle.claim_stuck, s.lifecycle.max_tries),
     (9.0, 2.0, 5)),
    ({}, "local", lambda s: (s.env, s.env_files, s.max_agents), ((), (), None)),
    ({"g": {"max_agents": 2, "env": {"A": "1"}}}, "local", lambda s: (s.env, s.max_agents),
     ((("A", "1"),), 2)),
    ({"g": {"image": "i:2"}}, "local", lambda s: s.image, None),
    ({"g": {"image": "i:2"}}, "docker", lambda s: s.image, "i:2"),
]


@pytest.mark.parametrize("table, kind, getter, expected", RESOLVE)
def test_resolve_overrides_and_inherits(table, kind, getter, expected):
    cfg = cfg_with(table, runtime={"kind": kind})
    assert getter(resolve(cfg, "g")) == expected


def test_global_values_keep_the_group_values_they_did_not_override():
    cfg = cfg_with({"g": {"memory": "1g"}}, docker={"cpus": 3.0, "memory": "2g"},
                   lifecycle={"idle_after": 7})
    s = resolve(cfg, "g")
    assert (s.docker.memory, s.docker.cpus, s.lifecycle.idle_after) == ("1g", 3.0, 7.0)


# --- the digest ---------------------------------------------------------------------------

def digest(table: dict, kind: str = "docker") -> str:
    return resolve(cfg_with(table, runtime={"kind": kind}), "g").digest


def test_digest_is_short_stable_and_follows_what_the_agent_runs_with():
    base = digest({"g": {"env": {"A": "1"}}})
    assert len(base) == 12 and base == digest({"g": {"env": {"A": "1"}}})
    assert digest({"g": {"env": {"A": "2"}}}) != base
    assert digest({"g": {"env": {"A": "1"}, "image": "x:1"}}) != base
    assert digest({"g": {"env": {"A": "1"}, "memory": "1g"}}) != base
    assert digest({"g": {"env": {"A": "1"}, "group_folder": "/srv/g"}}) != base
    assert digest({"g": {"env": {"A": "1"}, "env_files": {"K": "/k"}}}) != base
    # host-side timings and the cap are not what the agent runs with
    assert digest({"g": {"env": {"A": "1"}, "idle_after": 3, "max_agents": 2}}) == base
    # the local runtime ignores Docker-only keys
    assert digest({"g": {"memory": "1g"}}, "local") == digest({}, "local")


def test_a_secret_counts_by_path_not_by_content(tmp_path: Path):
    secret = tmp_path / "key"
    secret.write_text("s3cret-one")
    cfg = load_config({"groups": {"g": {"env_files": {"K": str(secret)}}}}, BASE)
    before = resolve(cfg, "g")
    secret.write_text("s3cret-two")
    assert resolve(cfg, "g").digest == before.digest
    assert "s3cret" not in str(before.describe())


# --- reading secrets ----------------------------------------------------------------------

def test_read_env_reads_secret_files_at_call_time(tmp_path: Path):
    (tmp_path / "k").write_text("s3cret-value\n")
    (tmp_path / "crlf").write_bytes(b"two\r\n")
    cfg = load_config({"groups": {"g": {"env": {"PLAIN": "p"},
                                        "env_files": {"KEY": "k", "W": "crlf"}}}}, tmp_path)
    assert read_env(resolve(cfg, "g")) == {"PLAIN": "p", "KEY": "s3cret-value", "W": "two"}
    (tmp_path / "k").write_text("rotated")
    assert read_env(resolve(cfg, "g"))["KEY"] == "rotated"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read (No such file or directory)"),
    (b"\xff\xfe", "not UTF-8 text"),
    (b"a\x00b", "contains a NUL byte"),
    (b"x" * (groups.MAX_SECRET_BYTES + 1), "larger than"),
])
def test_unreadable_secrets_name_the_path_never_the_content(tmp_path: Path, content, message):
    path = tmp_path / "k"
    if content is not None:
        path.write_bytes(content)
    cfg = load_config({"groups": {"g": {"env_files": {"KEY": "k"}}}}, tmp_path)
    with pytest.raises(SecretUnreadable) as err:
        read_env(resolve(cfg, "g"))
    text = str(err.value)
    assert text.startswith(f"[groups.g] env_files KEY ({path}): ") and message in text
    assert isinstance(err.value, OSError)
    if content is not None:
        assert content.decode("latin-1")[:8] not in text


# --- preflight of Docker mounts -----------------------------------------------------------

def test_preflight_refuses_a_group_mount_outside_allowed_mounts(tmp_path: Path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "no").mkdir()
    data = {"runtime": {"kind": "docker"},
            "docker": {"allowed_mounts": [str(tmp_path / "ok")]},
            "groups": {"a": {"mounts": [f"{tmp_path / 'ok'}:/ok"]},
                       "b": {"mounts": [f"{tmp_path / 'no'}:/no:ro"]}}}
    with pytest.raises(ConfigError) as err:
        groups.preflight(load_config(data, tmp_path))
    assert str(err.value).startswith("[groups.b] mounts: [docker] mounts entry")
    assert "is not under any [docker] allowed_mounts" in str(err.value)
    del data["groups"]["b"]
    groups.preflight(load_config(data, tmp_path))  # fine
    data["runtime"]["kind"] = "local"
    data["groups"]["b"] = {"mounts": ["nonsense"]}
    groups.preflight(load_config(data, tmp_path))  # the local runtime mounts nothing
