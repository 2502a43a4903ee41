"""destinations: the naming rule and the merge of automatic and hand-set destinations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator.host.destinations import (
    MAX_NAME,
    Chat,
    DestinationError,
    add,
    chat_name,
    display_name,
    parse,
    project,
    projected,
    remove,
)
from orchestrator.host.inbound import Destination
from orchestrator.host.registry import Registry


@pytest.mark.parametrize(("chat", "name"), [
    (Chat("cli", "local"), "cli:local"),
    (Chat("slack", "C0EXAMPLE", "t-42"), "slack:C0EXAMPLE:t-42"),
    (Chat("mail", "ann@example.org"), "mail:ann@example.org"),
    (Chat("tg", "+4912"), "tg:+4912"),
])
def test_readable_names_are_kept(chat: Chat, name: str) -> None:
    assert chat_name(chat) == name


@pytest.mark.parametrize("chat", [
    Chat("chat", "room 9"), Chat("x", 'a"b'), Chat("x", "a:b"), Chat("x", ""),
    Chat("x", "y" * 100), Chat("x", "é"),
])
def test_changed_or_long_names_get_a_hash_so_chats_never_collide(chat: Chat) -> None:
    name = chat_name(chat)
    assert len(name) <= MAX_NAME and "~" in name
    assert all(c.isascii() and (c.isalnum() or c in "._@+-:~") for c in name)
    assert chat_name(chat) == name  # stable


def test_sanitising_never_merges_two_chats() -> None:
    assert chat_name(Chat("x", "a:b")) != chat_name(Chat("x:a", "b"))
    assert chat_name(Chat("x", "a b")) != chat_name(Chat("x", "a_b"))


def test_threads_differ_from_the_chat() -> None:
    assert chat_name(Chat("s", "C", "t1")) != chat_name(Chat("s", "C"))
    assert chat_name(Chat("s", "C", "")) != chat_name(Chat("s", "C"))


MANUAL = [{"name": "team", "type": "channel", "display_name": "Team", "channel_type": "slack",
           "platform_id": "C1", "target_agent_group_id": None},
          {"name": "helper", "type": "agent", "display_name": None, "channel_type": None,
           "platform_id": None, "target_agent_group_id": "g2"},
          {"name": "cli:local", "type": "channel", "display_name": None, "channel_type": "cli",
           "platform_id": "other", "target_agent_group_id": None}]


def rows(dests) -> list[tuple]:
    return [(d.name, d.type, d.channel_type, d.platform_id, d.agent_group_id) for d in dests]


def test_project_merges_hand_set_and_automatic() -> None:
    chats = [Chat("slack", "C1"), Chat("slack", "C1", "t1"), Chat("cli", "local"),
             Chat("web", "w1"), Chat("web", "w1")]
    out = rows(project(chats, MANUAL))
    taken = chat_name(Chat("cli", "local"))
    assert out == [
        ("team", "channel", "slack", "C1", None),
        ("helper", "agent", None, None, "g2"),
        ("cli:local", "channel", "cli", "other", None),
        # the name was taken by hand: hashed; slack C1 has a hand-set one: not added
        (taken[:MAX_NAME - 9] + out[3][0][-9:], "channel", "cli", "local", None),
        ("web:w1", "channel", "web", "w1", None),
    ]
    assert out[3][0].startswith("cli:local~")


def test_the_sessions_own_chat_comes_first() -> None:
    chats = [Chat("a", "1"), Chat("b", "2"), Chat("b", "2", "t")]
    assert [d.name for d in project(chats, [], Chat("b", "2", "t"))] == ["b:2:t", "a:1", "b:2"]
    # its chat set by hand: that destination first
    assert [d.name for d in project(chats, MANUAL, Chat("slack", "C1"))][0] == "team"
    assert [d.name for d in project([], [], None)] == []


# --- exact names (the rule is a contract: NanoClaw's rows and the CLI show them) ------------


def hashed(*parts: str) -> str:
    return "~" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


@pytest.mark.parametrize(("chat", "name"), [
    (Chat("chat", "room 9"), "chat:room_9" + hashed("chat", "room 9", "")),
    (Chat("x", ""), "x:_" + hashed("x", "", "")),
    (Chat("s", "C", "a b"), "s:C:a_b" + hashed("s", "C", "a b")),
    (Chat("x", "y" * 62), "x:" + "y" * 62),  # boundary: exactly 64 characters are kept
    (Chat("x", "y" * 63), ("x:" + "y" * 63)[:55] + hashed("x", "y" * 63, "")),
])
def test_exact_names(chat: Chat, name: str) -> None:
    assert chat_name(chat) == name and len(name) <= MAX_NAME


def test_display_names() -> None:
    assert display_name(Chat("s", "C")) == "s chat C"
    assert display_name(Chat("s", "C", "t")) == "s chat C, thread t"
    assert display_name(Chat("s", "C", "")) == "s chat C, thread "


def full(dests) -> list[tuple]:
    return [(d.name, d.type, d.display_name, d.channel_type, d.platform_id, d.agent_group_id)
            for d in dests]


def test_project_keeps_every_field_and_the_first_row_of_a_name() -> None:
    manual = [{"name": "one", "type": "channel", "display_name": "First", "channel_type": "m",
               "platform_id": "1"},
              {"name": "one", "type": "channel", "display_name": "Again", "channel_type": "m",
               "platform_id": "9"},
              {"name": "two", "type": "agent", "agent_group_id": "g3"}]
    out = full(project([Chat("b", "2", "A"), Chat("b", "2")], manual))
    assert out == [("one", "channel", "First", "m", "1", None),
                   ("two", "agent", None, None, None, "g3"),
                   ("b:2", "channel", "b chat 2", "b", "2", None),  # no thread sorts first
                   ("b:2:A", "channel", "b chat 2, thread A", "b", "2", None)]


def test_a_long_automatic_name_taken_by_hand_is_hashed_to_64_characters() -> None:
    chat = Chat("x", "y" * 62)
    manual = [{"name": chat_name(chat), "type": "agent", "agent_group_id": "g"}]
    [_, auto] = project([chat], manual)
    assert auto.name == chat_name(chat)[:55] + hashed("x", "y" * 62, "")
    assert len(auto.name) == MAX_NAME


def test_own_chat_set_by_hand_moves_only_its_first_hand_set_row() -> None:
    manual = [{"name": "helper", "type": "agent", "agent_group_id": "g2"}, *MANUAL[:1],
              {"name": "team2", "type": "channel", "channel_type": "slack", "platform_id": "C1"},
              *MANUAL[2:]]
    names = [d.name for d in project([], manual, Chat("slack", "C1"))]
    assert names == ["team", "helper", "team2", "cli:local"]
    names = [d.name for d in project([], MANUAL, Chat("cli", "other"))]
    assert names == ["cli:local", "team", "helper"]


# --- hand-set destinations: parse ----------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("team", {"channel": "slack", "platform": "C1"},
     Destination("team", "channel", None, "slack", "C1")),
    ("a" * 64, {"channel": "s", "platform": "p", "display_name": "x" * 256},
     Destination("a" * 64, "channel", "x" * 256, "s", "p")),
    ("h.1_-", {"agent": "g2", "display_name": "The helper"},
     Destination("h.1_-", "agent", "The helper", agent_group_id="g2")),
    ("t", {"channel": "s", "platform": "a b"}, Destination("t", "channel", None, "s", "a b")),
])
def test_parse(name: str, kwargs: dict, expected: Destination) -> None:
    assert parse(name, **kwargs) == expected


BAD_NAME = ("destination name {!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, starting with "
            "a letter or digit")
BOTH = "destination d: give either --agent GROUP or --channel and --platform, not both"
NEITHER = ("destination d: give --channel and --platform (a chat) or --agent GROUP (another "
           "agent group)")


def printable(what: str, value: str) -> str:
    return f"{what} must be 1-256 printable characters, got {value!r}"


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("-x", {"channel": "s", "platform": "p"}, BAD_NAME.format("-x")),
    ("a" * 65, {"channel": "s", "platform": "p"}, BAD_NAME.format("a" * 65)),
    ("", {"channel": "s", "platform": "p"}, BAD_NAME.format("")),
    (5, {"channel": "s", "platform": "p"}, BAD_NAME.format(5)),
    ("d", {"channel": "s", "platform": "p", "display_name": ""}, printable("--display-name", "")),
    ("d", {"agent": "g", "display_name": " "}, printable("--display-name", " ")),
    ("d", {"agent": "g", "display_name": "x" * 257}, printable("--display-name", "x" * 257)),
    ("d", {"agent": "g", "display_name": "a\x1f"}, printable("--display-name", "a\x1f")),
    ("d", {"agent": "g", "channel": "s"}, BOTH),
    ("d", {"agent": "g", "platform": "p"}, BOTH),
    ("d", {}, NEITHER),
    ("d", {"channel": "s"}, NEITHER),
    ("d", {"platform": "p"}, NEITHER),
    ("d", {"channel": "", "platform": "p"}, printable("--channel", "")),
    ("d", {"channel": "s", "platform": "a\nb"}, printable("--platform", "a\nb")),
])
def test_parse_refuses_in_one_line(name, kwargs: dict, message: str) -> None:
    with pytest.raises(DestinationError) as info:
        parse(name, **kwargs)
    assert str(info.value) == message


def test_parse_refuses_a_bad_agent_group() -> None:
    with pytest.raises(DestinationError) as info:
        parse("d", agent="../x")
    assert str(info.value) == (
        "--agent: invalid agent group '../x': use 1-128 characters from A-Z a-z 0-9 . _ @ + -,"
        " starting with a letter or digit, without '..'")


def test_add_and_remove_refuse_in_one_line(tmp_path: Path) -> None:
    """A real registry: a second destination of the same name, and removing one that
    was never added by hand, are refused with the fix named."""
    with Registry(tmp_path / "orchestrator.db") as registry:
        add(registry, "ops", parse("team", channel="slack", platform="C1"))
        with pytest.raises(DestinationError) as again:
            add(registry, "ops", parse("team", channel="mail", platform="x@example.org"))
        assert str(again.value) == "group ops already has a destination team; remove it first"
        with pytest.raises(DestinationError) as missing:
            remove(registry, "ops", "nope")
        assert str(missing.value) == ("group ops has no destination 'nope' added by hand; "
                                      "see: orchestrator group destinations ops list")
        remove(registry, "ops", "team")
        assert [d.name for d, _ in projected(registry, "ops")] == []
