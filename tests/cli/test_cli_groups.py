"""cli_groups: send --at/--every, group list/show/destinations, series list/cancel —
driven in-process through cli.main(argv), on real SQLite files."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from orchestrator.cli import commands as cli
from orchestrator.contract import schema
from orchestrator.contract.layout import registry_path, session_paths
from orchestrator.host import inbound
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessagingGroup, Sessions
from orchestrator.rules import scheduling
from tests.support.helpers import query


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('data_dir = "data"\n[sessions]\ntimezone = "Europe/Berlin"\n'
                    '[groups.support]\nenv = { MODEL = "small" }\n'
                    'env_files = { API_KEY = "key.txt" }\n')
    (tmp_path / "key.txt").write_text("top-s3cret\n")
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def registry(tmp_path) -> Registry:
    return Registry(registry_path(tmp_path / "data"))


def rows_of(tmp_path, session_id: str, group: str = "support") -> list[dict]:
    return inbound.read_messages(session_paths(tmp_path / "data", group,
                                               session_id).inbound_db)


# --- send --at / --every ----------------------------------------------------------------------

def test_send_at_relative_writes_process_after_in_whole_utc_seconds(tmp_path, conf, capsys):
    before = schema.utcnow()
    code, out, err = run(capsys, "send", "--config", conf, "--group", "support", "--at", "+10m",
                         "later")
    after = schema.utcnow()
    assert code == 0 and err.startswith("due at ") and err.endswith(" UTC\n")
    (msg,) = rows_of(tmp_path, out.strip())
    due = schema.parse_ts(msg["process_after"])
    assert len(msg["process_after"]) == 19 and msg["process_after"][10] == " "
    assert before + timedelta(minutes=10) <= due <= after + timedelta(minutes=10, seconds=1)
    # not recurring; series_id is the message's own id (as NanoClaw's host sets it)
    assert (msg["recurrence"], msg["series_id"]) == (None, msg["id"])


def test_send_at_without_offset_is_in_sessions_timezone(tmp_path, conf, capsys):
    code, out, _ = run(capsys, "send", "--config", conf, "--group", "support", "--at",
                       "2099-07-01T09:00", "summer")
    assert code == 0
    assert rows_of(tmp_path, out.strip())[0]["process_after"] == "2099-07-01 07:00:00"


def test_send_every_starts_a_series_at_the_next_cron_time(tmp_path, conf, capsys):
    code, out, _ = run(capsys, "send", "--config", conf, "--group", "support", "--every",
                       "0 9 * * *", "standup")
    session_id, series_id = out.split()
    assert code == 0 and series_id.startswith("ser-")
    (msg,) = rows_of(tmp_path, session_id)
    expected = scheduling.next_run("0 9 * * *", schema.utcnow(), "Europe/Berlin")
    assert (msg["process_after"], msg["recurrence"], msg["series_id"]) == (
        scheduling.format_due(expected), "0 9 * * *", series_id)
    with registry(tmp_path) as reg:
        (s,) = reg.series()
    assert (s["id"], s["session_id"], s["agent_group_id"], s["recurrence"], s["timezone"],
            s["cancelled_at"]) == (series_id, session_id, "support", "0 9 * * *",
                                   "Europe/Berlin", None)


def test_send_every_with_at_as_the_first_run(tmp_path, conf, capsys):
    code, out, _ = run(capsys, "send", "--config", conf, "--group", "support", "--every",
                       "0 9 * * *", "--at", "2099-01-01T12:34:56Z", "standup")
    assert code == 0
    (msg,) = rows_of(tmp_path, out.split()[0])
    assert msg["process_after"] == "2099-01-01 12:34:56"


@pytest.mark.parametrize("args, message", [
    (["--at", "+3x"], "--at '+3x': use +N followed by d, h, m and/or s"),
    (["--at", "2001-01-01T00:00Z"], "is not in the future"),
    (["--every", "0 9 * *"], "a cron expression has 5 fields"),
    (["--every", "0 99 * * *"], "Bad hour field"),
    (["--every", "* * * * *", "--at", "soon"], "not an ISO 8601 time"),
])
def test_bad_schedules_are_one_line_and_write_nothing(tmp_path, conf, capsys, args, message):
    code, out, err = run(capsys, "send", "--config", conf, "--group", "support", *args, "x")
    assert code == 2 and out == ""
    assert err.startswith("orchestrator: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "data" / "sessions" / "support").exists()
    if (tmp_path / "data" / "orchestrator.db").exists():
        with registry(tmp_path) as reg:
            assert reg.sessions() == [] and reg.series() == []


# --- series list / cancel ---------------------------------------------------------------------

def test_series_list_and_cancel(tmp_path, conf, capsys):
    _, out, _ = run(capsys, "send", "--config", conf, "--group", "support", "--every",
                    "*/5 * * * *", "tick")
    session_id, series_id = out.split()
    code, out, _ = run(capsys, "series", "list", "--config", conf, "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["series_id"] == series_id and row["state"] == "active"
    assert (row["session_id"], row["recurrence"], row["completed"], row["failed"]) == (
        session_id, "*/5 * * * *", 0, 0)
    assert row["next_run"] == rows_of(tmp_path, session_id)[0]["process_after"]
    code, out, _ = run(capsys, "series", "list", "--config", conf)
    assert out.splitlines()[0].split()[:6] == ["SERIES", "GROUP", "SESSION", "EVERY", "TZ",
                                               "STATE"]
    assert series_id in out and "active" in out

    code, out, _ = run(capsys, "series", "cancel", "--config", conf, series_id)
    assert code == 0 and out == f"cancelled series {series_id} (1 waiting occurrence(s) removed)\n"
    assert rows_of(tmp_path, session_id) == []
    (row,) = json.loads(run(capsys, "series", "list", "--config", conf, "--json")[1])
    assert (row["state"], row["next_run"]) == ("cancelled", None)
    assert json.loads(run(capsys, "series", "list", "--config", conf, "--json", "--group",
                          "other")[1]) == []


def test_series_cancel_of_an_unknown_series_is_one_line(conf, capsys):
    code, out, err = run(capsys, "series", "cancel", "--config", conf, "ser-nope")
    assert code == 2 and out == ""
    assert err == ("orchestrator: error: no series 'ser-nope'; see: orchestrator series list\n")


# --- group list / show ------------------------------------------------------------------------

def test_group_list_and_show_never_print_a_secret(tmp_path, conf, capsys):
    run(capsys, "send", "--config", conf, "--group", "plain", "hi")
    code, out, _ = run(capsys, "group", "list", "--config", conf)
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == ["plain", "support"]
    assert lines[0].split()[2] == "defaults" and lines[1].split()[2] == "configured"
    code, out, _ = run(capsys, "group", "show", "--config", conf, "support")
    shown = json.loads(out)
    assert shown["env"] == {"MODEL": "small"}
    assert shown["env_files"] == {"API_KEY": str(tmp_path / "key.txt")}
    assert len(shown["digest"]) == 12 and shown["digest"] in lines[1]
    listed = json.loads(run(capsys, "group", "list", "--config", conf, "--json")[1])
    assert [g["group"] for g in listed] == ["plain", "support"]
    for text in (out, json.dumps(listed), "\n".join(lines)):
        assert "top-s3cret" not in text


# --- group destinations -------------------------------------------------------------------------

def test_destinations_add_list_remove_and_projection_on_wake(tmp_path, conf, capsys):
    base = ["group", "destinations", "--config", conf, "support"]
    assert run(capsys, *base)[1].startswith("group support has no destinations")
    assert run(capsys, *base, "add", "ops", "--channel", "email", "--platform",
               "ops@example.org", "--display-name", "Ops team")[0] == 0
    assert run(capsys, *base, "add", "coder", "--agent", "coding")[0] == 0
    with registry(tmp_path) as reg:
        # the host's own registry row of the same name (the CLI's wins) and another
        reg.set_destinations("support", [
            {"name": "ops", "type": "channel", "channel_type": "chat", "platform_id": "c-1"},
            {"name": "room", "type": "channel", "channel_type": "chat", "platform_id": "c-2"}])
        # chats that wrote to the group: automatic ones, except the chat set by hand
        reg.record_chat("support", "web", "w-1")
        reg.record_chat("support", "email", "ops@example.org")
    code, out, _ = run(capsys, *base, "list")
    assert code == 0 and out.splitlines() == [
        "coder  agent coding  [manual]",
        "ops  channel email ops@example.org  [manual]  (Ops team)",
        "room  channel chat c-2  [manual]",
        "web:w-1  channel web w-1  [auto]  (web chat w-1)"]

    # projected into inbound.db when a session of the group wakes, manual winning "ops",
    # the session's own chat an automatic destination too (first)
    with registry(tmp_path) as reg:
        sessions = Sessions(tmp_path / "data", reg, 1024)
        row = sessions.resolve("support", MessagingGroup("cli", "local"), None, "shared")
        sessions.write_routing(row)
        db = sessions.paths(row).inbound_db
    assert query(db, "SELECT name, display_name, type, channel_type, platform_id, agent_group_id"
                     " FROM destinations") == [
        ("cli:local", "cli chat local", "channel", "cli", "local", None),
        ("coder", None, "agent", None, None, "coding"),
        ("ops", "Ops team", "channel", "email", "ops@example.org", None),
        ("room", None, "channel", "chat", "c-2", None),
        ("web:w-1", "web chat w-1", "channel", "web", "w-1", None)]

    assert run(capsys, *base, "remove", "coder")[1] == "removed destination coder from group support\n"
    listed = json.loads(run(capsys, *base, "--json")[1])
    assert [(d["name"], d["source"]) for d in listed] == [
        ("cli:local", "auto"), ("ops", "manual"), ("room", "manual"), ("web:w-1", "auto")]


@pytest.mark.parametrize("args, message", [
    (["add", "../x", "--agent", "g"], "destination name '../x': use 1-64 characters"),
    (["add", "x"], "give --channel and --platform (a chat) or --agent GROUP"),
    (["add", "x", "--channel", "c"], "give --channel and --platform (a chat) or --agent GROUP"),
    (["add", "x", "--agent", "g", "--channel", "c"], "give either --agent GROUP or --channel"),
    (["add", "x", "--agent", "a/b"], "--agent: invalid agent group 'a/b'"),
    (["add", "x", "--channel", "c", "--platform", "line\nbreak"], "--platform must be 1-256"),
    (["add", "x", "--channel", "", "--platform", "p"], "--channel must be 1-256"),
    (["remove", "nope"], "group support has no destination 'nope' added by hand"),
])
def test_bad_destination_input_is_one_line(tmp_path, conf, capsys, args, message):
    code, out, err = run(capsys, "group", "destinations", "--config", conf, "support", *args)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1
    with registry(tmp_path) as reg:
        assert reg.manual_destinations("support") == []


def test_adding_a_destination_twice_is_refused(conf, capsys):
    base = ["group", "destinations", "--config", conf, "support", "add", "ops"]
    assert run(capsys, *base, "--agent", "a")[0] == 0
    code, _, err = run(capsys, *base, "--agent", "b")
    assert code == 2 and "already has a destination ops; remove it first" in err


def test_a_bad_group_name_is_one_line(conf, capsys):
    code, _, err = run(capsys, "group", "destinations", "--config", conf, "../etc")
    assert code == 2 and "invalid agent group '../etc'" in err


def test_listing_writes_nothing_not_even_a_registry(tmp_path, conf, capsys):
    assert run(capsys, "series", "list", "--config", conf)[1].startswith("no series yet")
    assert run(capsys, "group", "list", "--config", conf)[1].split()[0] == "support"
    assert not (tmp_path / "data").exists()


def test_config_may_come_before_or_after_the_destination_action(tmp_path, conf, capsys):
    assert run(capsys, "group", "destinations", "support", "add", "a", "--agent", "x",
               "--config", conf)[0] == 0
    assert run(capsys, "group", "destinations", "--config", conf, "support", "add", "b",
               "--agent", "y")[0] == 0
    out = run(capsys, "group", "destinations", "support", "list", "--config", conf)[1]
    assert [line.split()[0] for line in out.splitlines()] == ["a", "b"]
