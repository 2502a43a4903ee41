"""``ORCHESTRATOR_<SECTION>__<KEY>``: typed and checked like the file, errors naming
the variable, unknown configuration-looking variables refused with the nearest key,
precedence environment > file > default, and ``config show`` saying where each value
came from (secrets by path only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import commands as cli
from orchestrator.config.load import read_config, read_config_sources
from orchestrator.config.sections import ConfigError
from orchestrator.config.sources import env_values

FILE = """\
[api]
listen = "127.0.0.1:9100"

[groups.support]
memory = "1g"
env = { MODEL = "small" }
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    return path


@pytest.mark.parametrize("var, text, get, expected", [
    ("ORCHESTRATOR_API__LISTEN", "0.0.0.0:9000", lambda c: c.api.listen, "0.0.0.0:9000"),
    ("ORCHESTRATOR_API__METRICS_AUTH", "true", lambda c: c.api.metrics_auth, True),
    ("ORCHESTRATOR_API__MAX_CONNECTIONS", "5", lambda c: c.api.max_connections, 5),
    ("ORCHESTRATOR_LIFECYCLE__IDLE_AFTER", "2", lambda c: c.lifecycle.idle_after, 2.0),
    ("orchestrator_lifecycle__idle_after", "2.5", lambda c: c.lifecycle.idle_after, 2.5),
    ("ORCHESTRATOR_DOCKER__CAP_DROP", '["NET_RAW", "ALL"]', lambda c: c.docker.cap_drop,
     ("NET_RAW", "ALL")),
    ("ORCHESTRATOR_RUNTIME__MAX_AGENTS", "auto", lambda c: c.runtime.max_agents, "auto"),
    ("ORCHESTRATOR_RUNTIME__MAX_AGENTS", "3", lambda c: c.runtime.max_agents, 3),
    ("ORCHESTRATOR_DOCKER__MEMORY", "2g", lambda c: c.docker.memory, "2g"),
    ("ORCHESTRATOR_API__TOKEN_FILE", "", lambda c: c.api.token_file, ""),
    ("ORCHESTRATOR_SESSIONS__TIMEZONE", "Europe/Berlin", lambda c: c.sessions.timezone,
     "Europe/Berlin"),
    ("ORCHESTRATOR_GROUPS__SUPPORT__MEMORY", "3g", lambda c: c.groups[0].memory, "3g"),
    ("ORCHESTRATOR_GROUPS__SUPPORT__ENV", '{ MODEL = "big" }', lambda c: c.groups[0].env,
     (("MODEL", "big"),)),
    ("ORCHESTRATOR_GROUPS__SUPPORT__MAX_AGENTS", "2", lambda c: c.groups[0].max_agents, 2),
    ("ORCHESTRATOR_URL", "http://elsewhere:1", lambda c: c.api.listen, "127.0.0.1:9100"),
])
def test_a_variable_sets_its_key_typed_as_in_the_file(conf, var, text, get, expected) -> None:
    assert get(read_config(conf, {var: text})) == expected


def test_a_new_group_from_the_environment_is_named_in_lower_case(conf) -> None:
    cfg = read_config(conf, {"ORCHESTRATOR_GROUPS__BILLING__MEMORY": "4g"})
    assert {g.name: g.memory for g in cfg.groups} == {"billing": "4g", "support": "1g"}


def test_data_dir_from_the_environment(conf, tmp_path) -> None:
    cfg = read_config(conf, {"ORCHESTRATOR_DATA_DIR": str(tmp_path / "elsewhere")})
    assert cfg.data_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize("var, text, message", [
    ("ORCHESTRATOR_API__MAX_CONNECTIONS", "0",
     "ORCHESTRATOR_API__MAX_CONNECTIONS: [api] max_connections must be between 1 and"),
    ("ORCHESTRATOR_API__METRICS_AUTH", "yes",
     "ORCHESTRATOR_API__METRICS_AUTH: [api] metrics_auth must be true or false, got 'yes'"),
    ("ORCHESTRATOR_LIFECYCLE__IDLE_AFTER", "soon",
     "ORCHESTRATOR_LIFECYCLE__IDLE_AFTER: [lifecycle] idle_after must be a number"),
    ("ORCHESTRATOR_DOCKER__CAP_DROP", "[1",
     "ORCHESTRATOR_DOCKER__CAP_DROP: not a TOML value"),
    ("ORCHESTRATOR_WATCH__MODE", "inotify",
     "ORCHESTRATOR_WATCH__MODE: [watch] mode must be one of 'events', 'poll'"),
    ("ORCHESTRATOR_SESSIONS__TIMEZONE", "Mars/Base",
     "ORCHESTRATOR_SESSIONS__TIMEZONE: [sessions] timezone 'Mars/Base' is not a known"),
    ("ORCHESTRATOR_API__LISTN", "x",
     "ORCHESTRATOR_API__LISTN: no such configuration key; did you mean "
     "ORCHESTRATOR_API__LISTEN ([api] listen)?"),
    ("ORCHESTRATOR_LIFECYCLE__IDLE", "1",
     "ORCHESTRATOR_LIFECYCLE__IDLE: no such configuration key; did you mean "
     "ORCHESTRATOR_LIFECYCLE__IDLE_AFTER ([lifecycle] idle_after)?"),
    ("ORCHESTRATOR_GROUPS__SUPPORT__MEMROY", "1g",
     "ORCHESTRATOR_GROUPS__SUPPORT__MEMROY: no such configuration key; did you mean "
     "ORCHESTRATOR_GROUPS__SUPPORT__MEMORY?"),
    ("ORCHESTRATOR_GROUPS__SUPPORT__CPUS", "many",  # a bare word is checked as a string
     "ORCHESTRATOR_GROUPS__SUPPORT__CPUS: [groups.support] cpus must be a number, got 'many'"),
    ("ORCHESTRATOR_GROUPS__SUPPORT__CPUS", "0",
     "ORCHESTRATOR_GROUPS__SUPPORT__CPUS: [groups.support] cpus must be between"),
])
def test_a_bad_variable_is_one_line_naming_it(conf, var, text, message) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(conf, {var: text})
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_variables_without_a_double_underscore_are_not_configuration() -> None:
    assert env_values({"ORCHESTRATOR_URL": "x", "ORCHESTRATOR_TOKEN": "y",
                       "ORCHESTRATOR_AGENT": "1", "PATH": "/bin"}) == []


def test_origins_say_default_file_or_env(conf) -> None:
    cfg, origins = read_config_sources(conf, {"ORCHESTRATOR_API__METRICS_AUTH": "true"})
    assert origins["[api] listen"] == "file" and cfg.api.listen == "127.0.0.1:9100"
    assert origins["[api] metrics_auth"] == "env" and cfg.api.metrics_auth is True
    assert origins["[api] max_connections"] == "default"
    assert origins["[groups.support] memory"] == "file"


def test_config_show_prints_values_and_origins_with_secrets_by_path(
        conf, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_API__LISTEN", "127.0.0.1:9200")
    monkeypatch.setenv("ORCHESTRATOR_GROUPS__SUPPORT__ENV", '{ KEY = "hunter2" }')
    assert cli.main(["config", "show", "--config", str(conf), "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["[api] listen"] == {"key": "[api] listen", "value": "127.0.0.1:9200",
                                    "origin": "env"}
    assert rows["[api] max_wait"]["origin"] == "default"
    assert rows["[api] token_file"]["value"].endswith("api-token")
    assert rows["[groups.support] memory"]["origin"] == "file"
    assert rows["[groups.support] env"] == {"key": "[groups.support] env",
                                            "value": {"KEY": "(set)"}, "origin": "env"}
    assert cli.main(["config", "show", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert any(line.startswith("[api] listen") and " env " in line
               and '"127.0.0.1:9200"' in line for line in out.splitlines())


def test_a_bad_variable_stops_every_command_with_one_line(conf, capsys,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_API__LISTN", "x")
    assert cli.main(["status", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ORCHESTRATOR_API__LISTEN" in err


def test_the_command_line_wins_over_the_environment_and_the_file(conf, capsys,
                                                                  monkeypatch) -> None:
    env = {"ORCHESTRATOR_API__LISTEN": "127.0.0.1:9200"}
    cfg, origins = read_config_sources(conf, env, ("api.listen=127.0.0.1:9300",
                                                   "groups.support.memory=5g"))
    assert cfg.api.listen == "127.0.0.1:9300" and origins["[api] listen"] == "cli"
    assert cfg.groups[0].memory == "5g" and origins["[groups.support] memory"] == "cli"
    monkeypatch.setenv("ORCHESTRATOR_API__LISTEN", "127.0.0.1:9200")
    assert cli.main(["config", "show", "--config", str(conf), "--json",
                     "--set", "api.listen=127.0.0.1:9300"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["[api] listen"]["value"] == "127.0.0.1:9300"
    assert rows["[api] listen"]["origin"] == "cli"


@pytest.mark.parametrize("item, message", [
    ("api.max_connections=0", "--set api.max_connections: [api] max_connections must be"),
    ("api.listn=x", "--set api.listn: no such configuration key; did you mean"),
    ("listen", "--set 'listen': write SECTION.KEY=VALUE"),
    ("a.b.c.d=1", "--set 'a.b.c.d=1': write SECTION.KEY=VALUE"),
])
def test_a_bad_set_is_one_line_naming_it(conf, item, message) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(conf, {}, (item,))
    assert str(info.value).startswith(message), str(info.value)
