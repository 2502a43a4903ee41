"""The ``[delivery]`` keys of Standard Webhooks, retries and events: loaded, resolved
against data_dir, refused in one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.load import load_config
from orchestrator.config.render import render_default
from orchestrator.config.sections import ConfigError


def test_defaults_and_paths(tmp_path: Path) -> None:
    cfg = load_config({"delivery": {"secret_files": ["new", "/abs/old"]}}, tmp_path)
    d = cfg.delivery
    assert d.secret_files == (str(cfg.data_dir / "new"), "/abs/old")
    assert d.retry_horizon == 86400.0 and d.retry_max_delay == 3600.0 and d.max_attempts == 100
    assert load_config({}, tmp_path).delivery.secret_files == (
        str(cfg.data_dir / "webhook-secret"),)
    assert load_config({}, tmp_path).delivery.events == ()


@pytest.mark.parametrize("delivery, message", [
    ({"secret_file": "webhook-secret"},
     '[delivery] secret_file is no longer read: write secret_files = ["<file>"]'),
    ({"secret_files": []}, "[delivery] secret_files must list at least one file"),
    ({"secret_files": [""]}, "[delivery] secret_files must list at least one file"),
    ({"secret_files": "one"}, "[delivery] secret_files must be a list of strings"),
    ({"channel": "webhook", "url": "http://x/", "events": ["status", "replies"]},
     "[delivery] events: each must be one of 'status', 'failure', got 'replies'"),
    ({"events": ["status"]}, "[delivery] events is for the webhook channel (channel = "
     "'jsonl'); remove it, or read GET /v1/events"),
    ({"retry_horizon": -1}, "[delivery] retry_horizon must be between 0 and"),
    ({"retry_max_delay": 0}, "[delivery] retry_max_delay must be between 0.1 and"),
])
def test_refusals_are_one_line(tmp_path: Path, delivery: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"delivery": delivery}, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_init_writes_the_new_keys_with_their_help() -> None:
    text = render_default()
    for line in ('secret_files = [\n    "webhook-secret",\n]', "retry_horizon = 86400.0",
                 "retry_max_delay = 3600.0", "events = []"):
        assert line in text, line
    assert "\nsecret_file =" not in text  # (a group's egress_credentials has one, inline)
