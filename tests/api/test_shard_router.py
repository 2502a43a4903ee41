"""The shard router (issue 23): the body → conversation check (pure), and two real
``orchestrator run`` shards for what crosses between them — peer authentication, the
loop guard, forwarded session routes, the merged and paged session list, a shard down."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from orchestrator.api.peers import FORWARDED_BY, HOLDS_PATH, PEER_AUTH
from orchestrator.api.shard_router import conversation_of, key_of
from orchestrator.rules.placement import ranking
from tests.support.helpers import wait_for
from tests.support.shards import TOKEN, ShardSet

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("body, expected", [
    ({"agent_group": "g", "content": "x"},
     {"agent_group": "g", "channel": "api", "platform_id": "default", "thread_id": None,
      "mode": "shared"}),
    ({"agent_group": "g", "channel": "tg", "platform_id": "42", "thread_id": "t",
      "mode": "per-thread", "content": {"text": "x"}},
     {"agent_group": "g", "channel": "tg", "platform_id": "42", "thread_id": "t",
      "mode": "per-thread"}),
    ({"content": {"text": "x"}}, None),                       # no agent group: the local 400
    ({"agent_group": 3, "content": {"text": "x"}}, None),
    ({"agent_group": "g", "platform_id": ["x"]}, None),
    ([1, 2], None),
])
def test_conversation_of(body, expected):
    assert conversation_of(json.dumps(body).encode(), "shared") == expected


def test_conversation_of_not_json():
    assert conversation_of(b"{nope", "shared") is None


def _chat_owned_by(owner: str, start: int = 0) -> str:
    """A platform id whose conversation rendezvous hashing puts on ``owner`` of a, b."""
    for i in range(start, start + 1000):
        parts = conversation_of(json.dumps({"agent_group": "g", "platform_id": f"p{i}"})
                                .encode(), "shared")
        assert parts is not None
        if ranking(key_of(parts), ["a", "b"])[0] == owner:
            return f"p{i}"
    raise AssertionError("no key")


@pytest.fixture
def two(tmp_path: Path):
    shards = ShardSet(tmp_path, ["a", "b"])
    for name in ("a", "b"):
        shards.start(name)
    try:
        shards.wait_up("a", "b")
        yield shards
    finally:
        shards.stop_all()


def test_two_shards(two: ShardSet) -> None:
    a, b = two.url("a"), two.url("b")
    on_b = _chat_owned_by("b")
    with httpx.Client(timeout=30) as client:
        # a client's message for b's conversation, sent to a: written on b
        resp = client.post(a + "/v1/messages", headers={**AUTH, "Idempotency-Key": "k1"},
                           json={"agent_group": "g", "platform_id": on_b, "content": {"text": "hi"}})
        assert resp.status_code == 201 and resp.headers["x-orchestrator-shard"] == "b"
        sid = resp.json()["session_id"]
        assert sid in two.sessions("b") and sid not in two.sessions("a")
        again = client.post(a + "/v1/messages", headers={**AUTH, "Idempotency-Key": "k1"},
                            json={"agent_group": "g", "platform_id": on_b, "content": {"text": "hi"}})
        assert again.json() == resp.json()  # replayed by the owner

        # every session route from the other shard
        got = client.get(a + f"/v1/sessions/{sid}", headers=AUTH)
        assert got.status_code == 200 and got.json()["session_id"] == sid
        msgs = client.get(a + f"/v1/sessions/{sid}/messages", headers=AUTH)
        assert msgs.status_code == 200 and len(msgs.json()["messages"]) >= 1
        stop = client.post(a + f"/v1/sessions/{sid}/stop", headers=AUTH)
        assert stop.status_code in (202, 409) and stop.headers["x-orchestrator-shard"] == "b"
        assert client.get(a + "/v1/sessions/sess-0000000000000000",
                          headers=AUTH).status_code == 404

        # failed deliveries: one session's on its shard, everyone's summed
        retry = client.post(a + "/v1/deliveries/retry", headers=AUTH, json={"session_id": sid})
        assert retry.status_code == 200 and retry.headers["x-orchestrator-shard"] == "b"
        assert client.post(a + "/v1/deliveries/retry", headers=AUTH,
                           json={}).json() == {"retried": 0}
        assert client.post(a + "/v1/deliveries/retry", headers=AUTH, json={
            "session_id": "sess-0000000000000000"}).status_code == 404

        # wrong client token: refused here, never forwarded
        assert client.post(a + "/v1/messages", headers={"Authorization": "Bearer x"},
                           json={"agent_group": "g", "content": {"text": "x"}}).status_code == 401
        assert client.get(a + f"/v1/sessions/{sid}", headers={
            "Authorization": "Bearer x"}).status_code == 401

        # peer calls: the secret is required; a client cannot use the peer routes
        assert client.get(a + HOLDS_PATH, params={"agent_group": "g", "mode": "shared"},
                          headers=AUTH).status_code == 403
        assert client.get(a + HOLDS_PATH, headers={FORWARDED_BY: "b", PEER_AUTH: "wrong"}
                          ).status_code == 401
        held = client.get(b + HOLDS_PATH, headers={FORWARDED_BY: "a", PEER_AUTH: TOKEN},
                          params={"agent_group": "g", "mode": "shared", "channel": "api",
                                  "platform_id": on_b})
        assert held.json() == {"holds": True}

        # the loop guard: a forwarded request is answered where it arrives
        on_a = _chat_owned_by("a")
        fwd = client.post(b + "/v1/messages", headers={FORWARDED_BY: "a", PEER_AUTH: TOKEN},
                          json={"agent_group": "g", "platform_id": on_a, "content": {"text": "x"}})
        assert fwd.status_code == 201 and "x-orchestrator-shard" not in fwd.headers
        assert fwd.json()["session_id"] in two.sessions("b")

        # more sessions on both, then the merged list, paged
        for i in range(6):
            assert client.post(b + "/v1/messages", headers=AUTH, json={
                "agent_group": "g", "platform_id": f"x{i}", "content": {"text": "x"}}).status_code == 201
        everything = client.get(b + "/v1/sessions", headers=AUTH).json()
        expected = set(two.sessions("a")) | set(two.sessions("b"))
        assert {r["session_id"] for r in everything} == expected
        assert {r["shard"] for r in everything} == {"a", "b"}
        for sort, want in (
                ({}, [r["session_id"] for r in everything]),  # the single-shard order
                ({"sort": "session_id"}, sorted(expected)),
                ({"sort": "session_id", "order": "desc"}, sorted(expected, reverse=True))):
            pages, cursor = [], None
            while True:
                page = client.get(a + "/v1/sessions", headers=AUTH, params={
                    "limit": 3, **sort, **({"cursor": cursor} if cursor else {})})
                assert page.headers["x-total-count"] == str(len(expected))
                pages.extend(r["session_id"] for r in page.json())
                cursor = page.headers.get("x-next-cursor")
                if cursor is None:
                    break
            assert pages == want, sort
        offset = client.get(a + "/v1/sessions", headers=AUTH,
                            params={"limit": 3, "offset": 3, "sort": "session_id"})
        assert [r["session_id"] for r in offset.json()] == sorted(expected)[3:6]

        # b down: its sessions answer 503 naming it, the list says it is missing
        two.kill("b")
        wait_for(lambda: "shard b is unreachable" in two.procs["a"].text(), timeout=10)
        down = client.get(a + f"/v1/sessions/{sid}/messages", headers=AUTH)
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert "shard b" in down.json()["error"]
        listed = client.get(a + "/v1/sessions", headers=AUTH)
        assert listed.status_code == 200 and listed.headers["x-unavailable-shards"] == "b"
        refused = client.post(a + "/v1/messages", headers=AUTH, json={
            "agent_group": "g", "platform_id": on_b, "content": {"text": "x"}})
        assert refused.status_code == 503 and refused.json()["shard"] == "b"
        placed = client.post(a + "/v1/messages", headers=AUTH, json={
            "agent_group": "g", "platform_id": _chat_owned_by("a", start=5000),
            "content": {"text": "x"}})
        assert placed.status_code == 201  # a new conversation a ranks first for: placed
