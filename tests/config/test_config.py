"""config: load_config is pure and table-tested; read_config/render_default at the edge."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from loguru import logger

from orchestrator.config import model as config
from orchestrator.config.load import load_config, read_config
from orchestrator.config.model import Config
from orchestrator.config.render import render_default, write_default
from orchestrator.config.sections import ConfigError
from tests.support.helpers import REPO

BASE = Path("/base/dir")


# --- defaults -------------------------------------------------------------------

def test_empty_dict_gives_documented_defaults():
    cfg = load_config({}, BASE)
    assert cfg.data_dir == BASE / "data"
    assert cfg.runtime.kind == "local"
    assert cfg.runtime.on_shutdown == "leave"
    assert cfg.lifecycle.ceiling == 1800.0
    assert cfg.lifecycle.claim_stuck == 60.0
    assert cfg.lifecycle.max_tries == 5
    assert cfg.lifecycle.backoff_base == 5.0
    assert cfg.watch.debounce_ms == 50 and cfg.watch.step_ms == 3
    assert cfg.sessions.default_mode == "shared"
    assert cfg.sessions.max_attachment_bytes == 25 * 1024 * 1024
    assert cfg.docker.cap_drop == ("ALL",)
    # [delivery] path is relative to data_dir, not to the config file
    assert cfg.delivery.path == BASE / "data" / "delivered.jsonl"
    assert cfg.source is None


def test_config_is_frozen():
    cfg = load_config({}, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lifecycle.max_tries = 3  # type: ignore[misc]


# --- accepted values ----------------------------------------------------------------

@pytest.mark.parametrize("data, getter, expected", [
    ({"lifecycle": {"idle_after": 5}}, lambda c: c.lifecycle.idle_after, 5.0),  # int → float
    ({"lifecycle": {"max_tries": 1}}, lambda c: c.lifecycle.max_tries, 1),  # lower bound
    ({"lifecycle": {"max_tries": 100}}, lambda c: c.lifecycle.max_tries, 100),  # upper bound
    ({"lifecycle": {"backoff_base": 0}}, lambda c: c.lifecycle.backoff_base, 0.0),
    ({"runtime": {"kind": "docker"}}, lambda c: c.runtime.kind, "docker"),
    ({"runtime": {"command": ["a", "b"]}}, lambda c: c.runtime.command, ("a", "b")),
    ({"docker": {"mounts": []}}, lambda c: c.docker.mounts, ()),
    ({"docker": {"read_only_rootfs": False}}, lambda c: c.docker.read_only_rootfs, False),
    ({"sessions": {"default_mode": "per-thread"}}, lambda c: c.sessions.default_mode, "per-thread"),
    ({"log": {"level": "DEBUG", "json": True}}, lambda c: (c.log.level, c.log.json), ("DEBUG", True)),
    ({"data_dir": "var/x"}, lambda c: c.data_dir, BASE / "var" / "x"),
    ({"data_dir": "/abs/place"}, lambda c: c.data_dir, Path("/abs/place")),
    ({}, lambda c: c.runtime.max_agents, "auto"),  # resolved on the host at run time
    ({"runtime": {"max_agents": 0}}, lambda c: c.runtime.max_agents, 0),  # no cap
    ({"runtime": {"max_agents": 12}}, lambda c: c.runtime.max_agents, 12),
    ({"runtime": {"make_room_after": 0}}, lambda c: c.runtime.make_room_after, 0.0),
    ({"data_dir": "/d", "delivery": {"path": "out/r.jsonl"}}, lambda c: c.delivery.path,
     Path("/d/out/r.jsonl")),
    ({"data_dir": "/d", "delivery": {"path": "/elsewhere/r.jsonl"}}, lambda c: c.delivery.path,
     Path("/elsewhere/r.jsonl")),
])
def test_valid_values(data, getter, expected):
    value = getter(load_config(data, BASE))
    assert value == expected
    assert type(value) is type(expected)


def test_data_dir_tilde_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_config({"data_dir": "~/orch"}, BASE).data_dir == Path("/home/someone/orch")


# --- refused values: one line, naming the key ------------------------------------------

BAD = [
    pytest.param({"bogus": 1}, "unknown key bogus", id="unknown-top-level-key"),
    pytest.param({"runtime": {"bogus": 1}}, "unknown key [runtime] bogus", id="unknown-section-key"),
    pytest.param({"runtime": 3}, "[runtime] must be a table", id="section-not-a-table"),
    pytest.param({"runtime": {"stop_grace": "ten"}}, "[runtime] stop_grace must be a number",
                 id="string-for-number"),
    pytest.param({"docker": {"pids_limit": True}}, "[docker] pids_limit must be an integer",
                 id="bool-for-int"),
    pytest.param({"lifecycle": {"idle_after": True}}, "[lifecycle] idle_after must be a number",
                 id="bool-for-float"),
    pytest.param({"docker": {"pids_limit": 2.5}}, "[docker] pids_limit must be an integer",
                 id="float-for-int"),
    pytest.param({"log": {"json": 1}}, "[log] json must be true or false", id="int-for-bool"),
    pytest.param({"docker": {"image": 5}}, "[docker] image must be a string", id="int-for-string"),
    pytest.param({"lifecycle": {"max_tries": 0}}, "[lifecycle] max_tries must be between 1 and 100",
                 id="below-min"),
    pytest.param({"lifecycle": {"max_tries": 101}}, "[lifecycle] max_tries must be between 1 and 100",
                 id="above-max"),
    pytest.param({"watch": {"poll_interval": 0.01}}, "[watch] poll_interval must be between",
                 id="float-below-min"),
    pytest.param({"runtime": {"stop_grace": float("inf")}}, "[runtime] stop_grace must be between",
                 id="infinity"),
    pytest.param({"runtime": {"stop_grace": float("nan")}}, "[runtime] stop_grace must be a number",
                 id="nan"),
    pytest.param({"runtime": {"kind": "podman"}}, "[runtime] kind must be one of 'local', 'docker'",
                 id="bad-choice"),
    pytest.param({"sessions": {"default_mode": "Shared"}}, "[sessions] default_mode must be one of",
                 id="choice-is-case-sensitive"),
    pytest.param({"runtime": {"command": "python agent.py"}}, "[runtime] command must be a list",
                 id="string-for-list"),
    pytest.param({"docker": {"cap_drop": ["ALL", 1]}}, "[docker] cap_drop must be a list of strings",
                 id="list-with-non-string"),
    pytest.param({"data_dir": ""}, "data_dir must be a non-empty path string", id="empty-data-dir"),
    pytest.param({"data_dir": 5}, "data_dir must be a non-empty path string", id="int-data-dir"),
    pytest.param({"delivery": {"path": ""}}, "[delivery] path must be a non-empty path string",
                 id="empty-path"),
    pytest.param({"runtime": {"max_agents": -1}},
                 '[runtime] max_agents must be "auto" or a whole number from 0', id="cap-negative"),
    pytest.param({"runtime": {"max_agents": 2.5}},
                 '[runtime] max_agents must be "auto" or a whole number', id="cap-float"),
    pytest.param({"runtime": {"max_agents": "lots"}},
                 '[runtime] max_agents must be "auto" or a whole number', id="cap-string"),
    pytest.param({"runtime": {"max_agents": True}},
                 '[runtime] max_agents must be "auto" or a whole number', id="cap-bool"),
    pytest.param({"runtime": {"make_room_after": -1}},
                 "[runtime] make_room_after must be between 0", id="make-room-negative"),
]


@pytest.mark.parametrize("data, fragment", BAD)
def test_invalid_values_are_one_line_errors(data, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(data, BASE)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        load_config({"lifecycle": {"idle": 1}}, BASE)
    assert "idle_after" in str(info.value) and "max_tries" in str(info.value)


def test_a_removed_key_is_one_warning_and_no_refusal():
    """[docker] precreate once created containers ahead; a config that still sets it
    starts as before, told once to delete the line (its other keys still checked)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        cfg = load_config({"docker": {"precreate": 4, "memory": "1g"}}, BASE)
    finally:
        logger.remove(sink)
    assert cfg.docker.memory == "1g" and not hasattr(cfg.docker, "precreate")
    assert len(lines) == 1 and lines[0].startswith(
        "[docker] precreate is no longer read and has no effect (") and lines[0].endswith(
        "delete the line"), lines
    with pytest.raises(ConfigError, match=r"unknown key \[docker\] precreatee"):
        load_config({"docker": {"precreate": 4, "precreatee": 1}}, BASE)


def test_load_config_touches_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_config({"data_dir": "d", "delivery": {"path": "x/y.jsonl"}}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_replace_changes_only_named_keys():
    cfg = load_config({}, BASE)
    new = cfg.replace(lifecycle={"idle_after": 1.5}, data_dir=Path("/x"))
    assert new.lifecycle.idle_after == 1.5
    assert new.lifecycle.max_tries == cfg.lifecycle.max_tries
    assert new.data_dir == Path("/x")
    assert cfg.lifecycle.idle_after == 30.0  # the original is untouched


# --- files ------------------------------------------------------------------------------

def test_read_config_resolves_relative_to_the_file_not_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "o.toml"
    path.write_text('data_dir = "state"\n[lifecycle]\nmax_tries = 7\n')
    monkeypatch.chdir(tmp_path)
    cfg = read_config(path)
    assert cfg.data_dir == (conf_dir / "state").resolve()
    assert cfg.lifecycle.max_tries == 7
    assert cfg.source == path


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "config file not found"),
    (lambda p: p.write_text("[runtime\nkind = 'local'\n"), "not valid TOML"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not valid TOML"),
    (lambda p: p.mkdir(), "cannot read config"),
    (lambda p: p.write_text("[runtime]\nkind = 'podman'\n"), "[runtime] kind must be one of"),
])
def test_read_config_errors_name_the_file(tmp_path, setup, fragment):
    path = tmp_path / "c.toml"
    setup(path)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert fragment in message
    assert "\n" not in message


def test_render_default_loads_back_to_the_defaults():
    text = render_default()
    data = tomllib.loads(text)
    assert load_config(data, BASE) == load_config({}, BASE)
    # every key of every section is written out (so the file documents them all)
    for name, cls in config.SECTIONS.items():
        assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, name
    # and each key carries its help comment
    for cls in config.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f"# {f.metadata['help']}\n{f.name} = " in text


def test_render_default_data_dir_argument():
    assert tomllib.loads(render_default("/srv/orch"))["data_dir"] == "/srv/orch"


def test_repo_config_toml_equals_render_default():
    """The committed config.toml is generated; they must never drift apart."""
    assert (REPO / "config.toml").read_text(encoding="utf-8") == render_default()


def test_write_default_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("# mine\n")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        write_default(path)
    assert path.read_text() == "# mine\n"
    write_default(path, force=True)
    assert path.read_text() == render_default()


def test_write_default_into_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot write config"):
        write_default(tmp_path / "no" / "such" / "config.toml")


def test_written_default_reads_back(tmp_path):
    path = tmp_path / "config.toml"
    write_default(path)
    cfg = read_config(path)
    assert cfg == dataclasses.replace(load_config({}, tmp_path.resolve()), source=path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("value", ["abc", "300-200", "0-10", "10", "-5-10"])
def test_a_bad_uid_range_is_refused_when_the_config_loads(tmp_path: Path, value: str) -> None:
    """Refused with the other config errors, before `run` locks or creates anything."""
    with pytest.raises(ConfigError, match=r"\[runtime\] uid_range"):
        load_config({"runtime": {"uid_range": value}}, tmp_path)
    assert not (tmp_path / "data").exists()
