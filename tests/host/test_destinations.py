"""destinations: the naming rule and the merge of automatic and hand-set destinations."""

from __future__ import annotations

import pytest

from orchestrator.host.destinations import MAX_NAME, Chat, chat_name, project


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
