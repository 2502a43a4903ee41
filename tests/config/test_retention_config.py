"""[retention] and its per-group keys: loaded, validated, resolved per group (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.groups import resolve
from orchestrator.config.load import load_config
from orchestrator.config.sections import ConfigError


def test_defaults_are_off() -> None:
    r = load_config({}, Path("/")).retention
    assert (r.archive_after, r.delete_after, r.delivered_max_age) == (0, 0, 0)
    assert r.archive_dir == "" and r.batch == 10 and r.duty == 0.25


def test_a_group_overrides_the_global_thresholds() -> None:
    cfg = load_config({"retention": {"archive_after": 3600, "delivered_max_age": 60},
                       "groups": {"short": {"delete_after": 60, "archive_after": 0},
                                  "plain": {}}}, Path("/"))
    assert resolve(cfg, "plain").retention.archive_after == 3600
    short = resolve(cfg, "short").retention
    assert (short.archive_after, short.delete_after) == (0, 60)
    assert resolve(cfg, "unconfigured").retention.archive_after == 3600


@pytest.mark.parametrize("raw, message", [
    ({"retention": {"archive_after": -1}}, "[retention] archive_after"),
    ({"retention": {"duty": 0}}, "[retention] duty"),
    ({"retention": {"keep": 1}}, "unknown key [retention] keep"),
    ({"groups": {"g": {"delete_after": "soon"}}}, "[groups.g] delete_after"),
])
def test_bad_values_are_one_line_naming_the_key(raw, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(raw, Path("/"))
    assert message in str(info.value) and "\n" not in str(info.value)
