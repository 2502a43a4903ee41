"""``[gateway]`` and a group's ``egress`` / ``egress_credentials``: loaded, resolved,
shown by path, and every bad value refused in one line naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from orchestrator.config.groups import resolve
from orchestrator.config.load import load_config
from orchestrator.config.render import render_default
from orchestrator.config.sections import ConfigError, EgressCredential
from orchestrator.config.show import effective

BASE = Path("/etc/orch")
CRED = {"host": "api.anthropic.com", "header": "x-api-key", "secret_file": "keys/anthropic"}


def group(**keys: object) -> dict:
    return {"groups": {"g": keys}}


def test_egress_is_loaded_normalised_and_resolved():
    cfg = load_config(group(egress=["API.Anthropic.com:443", "*.example.com:8443",
                                    "api.anthropic.com:443"],
                            egress_credentials=[{**CRED, "prefix": "Bearer ",
                                                 "base_url_env": "ANTHROPIC_BASE_URL",
                                                 "key_env": "ANTHROPIC_API_KEY"}]), BASE)
    g = cfg.groups[0]
    assert g.egress == ("*.example.com:8443", "api.anthropic.com:443")
    assert g.egress_credentials == (EgressCredential(
        host="api.anthropic.com", header="x-api-key", secret_file="/etc/orch/keys/anthropic",
        prefix="Bearer ", base_url_env="ANTHROPIC_BASE_URL", key_env="ANTHROPIC_API_KEY"),)
    settings = resolve(cfg, "g")
    assert settings.egress == g.egress and settings.egress_credentials == g.egress_credentials
    assert resolve(cfg, "other").egress == ()
    # the digest changes with the list, and shows the secret file by path only
    plain = resolve(load_config(group(), BASE), "g")
    assert plain.digest != settings.digest
    assert settings.describe()["egress_credentials"][0]["secret_file"] == \
        "/etc/orch/keys/anthropic"
    shown = {r["key"]: r["value"] for r in effective(cfg, {})}
    assert shown["[groups.g] egress_credentials"][0]["host"] == "api.anthropic.com"
    assert shown["[gateway] port"] == 8760


def test_gateway_defaults_and_render():
    cfg = load_config({}, BASE)
    assert cfg.gateway.enabled and cfg.gateway.port == 8760 and cfg.gateway.host == ""
    text = render_default()
    assert tomllib.loads(text)["gateway"]["max_requests_per_minute"] == 600
    assert "# egress = [\"api.anthropic.com:443\"]" in text
    assert "# egress_credentials = [{ host = \"api.anthropic.com\"" in text


@pytest.mark.parametrize("raw, fragment", [
    (group(egress="api.anthropic.com:443"), "[groups.g] egress must be a list of strings"),
    (group(egress=["api.anthropic.com"]), "is not HOST:PORT"),
    (group(egress=["api.anthropic.com:0"]), "is not HOST:PORT"),
    (group(egress=["api.anthropic.com:65536"]), "is not HOST:PORT"),
    (group(egress=["http://api.anthropic.com:443"]), "is not HOST:PORT"),
    (group(egress=["a b:443"]), "is not HOST:PORT"),
    (group(egress=["*:443"]), "is not HOST:PORT"),
    (group(egress=["api.anthropic.com:443"], egress_credentials={"host": "x"}),
     "egress_credentials must be a list of tables"),
    (group(egress=["api.anthropic.com:443"], egress_credentials=[{**CRED, "colour": "red"}]),
     "unknown field 'colour'"),
    (group(egress=["api.anthropic.com:443"],
           egress_credentials=[{"host": "api.anthropic.com", "header": "x-api-key"}]),
     "needs secret_file"),
    (group(egress=["api.anthropic.com:443"], egress_credentials=[{**CRED, "header": "a b"}]),
     "is not a header the gateway can inject"),
    (group(egress=["api.anthropic.com:443"], egress_credentials=[{**CRED, "header": "Host"}]),
     "is not a header the gateway can inject"),
    (group(egress=["api.anthropic.com:443"],
           egress_credentials=[{**CRED, "host": "api.anthropic.com:443"}]),
     "must be a host name"),
    (group(egress=["api.anthropic.com:443"], egress_credentials=[{**CRED, "prefix": "a\nb"}]),
     "prefix must be one line"),
    (group(egress=["api.anthropic.com:443"],
           egress_credentials=[{**CRED, "key_env": "ORCHESTRATOR_X"}]),
     "key_env: 'ORCHESTRATOR_X' is not a variable name"),
    (group(egress=["api.anthropic.com:443"],
           egress_credentials=[{**CRED, "base_url_env": "1X"}]), "base_url_env"),
    (group(egress=["api.anthropic.com:443"], egress_credentials=[CRED, CRED]),
     "a host appears twice"),
    (group(egress=["example.com:443"], egress_credentials=[CRED]),
     "host 'api.anthropic.com' is not on [groups.g] egress; add \"api.anthropic.com:443\""),
    (group(egress_credentials=[CRED]), "is not on [groups.g] egress"),
    ({"gateway": {"port": 0}}, "[gateway] port must be between 1 and 65535"),
    ({"gateway": {"enabled": "yes"}}, "[gateway] enabled must be true or false"),
    ({"gateway": {"max_body_bytes": 10}}, "[gateway] max_body_bytes must be between"),
    ({"gateway": {"listen": "x"}}, "unknown key [gateway] listen"),
])
def test_bad_egress_config_is_one_line(raw, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(raw, BASE)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
