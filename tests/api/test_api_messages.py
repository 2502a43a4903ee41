"""Replies over the API, end to end (a real supervisor, uvicorn, the reference agent):
``POST /v1/messages`` with a wait answers with the reply, ``GET
/v1/sessions/{id}/messages`` pages through both directions newest first, a reply's file
downloads by its URL, and a planted symlink in ``delivered/`` is refused, never
followed. The pure parts (Prefer, wait, cursors, the bounded reply event) are
table-tested."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest

from orchestrator.api.checks import BadRequest, prefer_wait, wait_seconds
from orchestrator.api.hub import reply_event
from orchestrator.contract.layout import delivered_root
from orchestrator.host.messages import CursorError, check_name, decode_cursor, encode_cursor
from tests.support.api_helpers import SseReader, api_supervised, message
from tests.support.e2e import make_config, replies_to, run
from tests.support.helpers import until


@pytest.mark.parametrize("header, expected", [
    (None, None), ("", None), ("wait=5", 5.0), ("respond-async, wait=10", 10.0),
    ("wait=600", 60.0), ("WAIT = 3", 3.0), ("wait=abc", None), ("wait=-1", None),
    ("wait=1.5", None), ("return=minimal", None), ('wait="7"', 7.0),
])
def test_prefer_wait(header, expected) -> None:
    assert prefer_wait(header) == expected


@pytest.mark.parametrize("value, ok", [
    (None, True), (0, True), (60, True), (2.5, True), (61, False), (-1, False),
    (True, False), ("5", False), ([], False),
])
def test_wait_field(value, ok) -> None:
    if ok:
        assert wait_seconds(value) == (None if value is None else float(value))
    else:
        with pytest.raises(BadRequest, match="wait must be"):
            wait_seconds(value)


@pytest.mark.parametrize("key", [("2030-01-01 00:00:00.000", "in", "msg-1"),
                                 ("", "out", "ü/x"), ("t", "in", "")])
def test_a_cursor_round_trips(key) -> None:
    assert decode_cursor(encode_cursor(key)) == key


@pytest.mark.parametrize("text", ["", "!!", "bm9wZQ", encode_cursor(("a", "b", "c")),
                                  "W10", "x" * 3000, "WzEsMiwzXQ"])
def test_a_foreign_cursor_is_refused(text) -> None:
    with pytest.raises(CursorError, match="cursor"):
        decode_cursor(text)


@pytest.mark.parametrize("name, bad", [("a.txt", False), ("..", True), (".", True), ("", True),
                                       ("a/b", True), ("a\x00", True), ("x" * 256, True),
                                       (".hidden", False), ("ü" * 100, False)])
def test_file_names(name, bad) -> None:
    assert (check_name(name) is not None) == bad


@pytest.mark.parametrize("text, limit, content, truncated", [
    ('{"text": "hi"}', 100, {"text": "hi"}, False),
    ('{"text": "hi"}', 5, None, True),
    ('{"text": "ü"}', 13, None, True),  # 13 characters, 14 bytes
    ("not json", 100, None, False),
    (None, 100, None, False),
])
def test_reply_event_bounds_the_content(text, limit, content, truncated) -> None:
    out = reply_event({"session_id": "s", "message_id": "o", "content_text": text}, limit)
    assert "content_text" not in out
    assert (out["content"], out["truncated"]) == (content, truncated)
    assert out["url"] == "/v1/sessions/s/messages/o"


def test_a_waited_post_answers_with_the_reply_and_the_messages_page_back(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path)

    async def body() -> None:
        async with api_supervised(cfg) as (_sup, client):
            reader = SseReader(client).start()
            await until(lambda: reader.connected.is_set())
            data = base64.b64encode(b"file bytes").decode()
            started = time.monotonic()
            resp = await client.post("/v1/messages", json=message(
                "hi", content={"text": "hi", "attachments": [{"name": "a b.txt",
                                                              "data": data}]}, wait=30))
            assert resp.status_code == 200, resp.text
            assert time.monotonic() - started < 30
            got = resp.json()
            sid, mid, reply = got["session_id"], got["message_id"], got["reply"]
            assert reply["in_reply_to"] == mid and reply["truncated"] is False
            assert "hi" in reply["content"]["text"]
            assert [f["name"] for f in reply["files"]] == ["a b.txt"]
            # the same reply on the event stream, with its content
            await until(lambda: any(e["event"] == "reply_delivered" for e in reader.events))
            event = next(e for e in reader.events if e["event"] == "reply_delivered")["data"]
            assert event["content"] == reply["content"] and event["in_reply_to"] == mid
            await reader.stop()

            file = await client.get(reply["files"][0]["url"])
            assert file.status_code == 200 and file.content == b"file bytes"
            assert file.headers["content-type"] == "application/octet-stream"

            # more messages, then page through them two at a time
            for text in ("two", "three"):
                r = await client.post("/v1/messages", json=message(text), headers={
                    "Prefer": "wait=30"})
                assert r.status_code == 200 and r.headers["preference-applied"] == "wait=30"
            seen, cursor = [], None
            while True:
                page = (await client.get(f"/v1/sessions/{sid}/messages", params={
                    "limit": 2, **({"cursor": cursor} if cursor else {})})).json()
                assert len(page["messages"]) <= 2
                seen += page["messages"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert [m["direction"] for m in seen].count("in") == 3
            assert [m["direction"] for m in seen].count("out") == 3
            keys = [(m["timestamp"], m["direction"], m["id"]) for m in seen]
            assert keys == sorted(keys, reverse=True) and len(set(keys)) == 6
            first_in = next(m for m in seen if m["id"] == mid)
            assert first_in["files"] == [{"name": "a b.txt", "url": None}]
            assert first_in["status"] == "completed"
            out = next(m for m in seen if m["id"] == reply["message_id"])
            assert out["status"] == "delivered" and out["in_reply_to"] == mid
            one = (await client.get(reply["url"])).json()
            assert one == out

            # no reply within the wait: 202 with the ids
            r = await client.post("/v1/messages", json=message(
                "later", process_after="2099-01-01T00:00:00Z", wait=0.2))
            assert r.status_code == 202 and set(r.json()) == {"session_id", "message_id"}

            # the errors, in the error shape
            for path, status in ((f"/v1/sessions/{sid}/messages?limit=0", 400),
                                 (f"/v1/sessions/{sid}/messages?cursor=zz", 400),
                                 ("/v1/sessions/nope/messages", 404),
                                 (f"/v1/sessions/{sid}/messages/nope", 404),
                                 (f"{reply['url']}/files/missing", 404),
                                 (f"/v1/sessions/{sid}/messages/{mid}/files/a%20b.txt", 404)):
                r = await client.get(path)
                assert r.status_code == status, (path, r.text)
                assert set(r.json()) == {"error"}

            # a symlink planted in delivered/<id>/ is refused, not followed
            secret = tmp_path / "secret"
            secret.write_text("do not serve")
            link = delivered_root(cfg.data_dir) / reply["message_id"] / "link"
            os.symlink(secret, link)
            r = await client.get(f"{reply['url']}/files/link")
            assert r.status_code == 409 and "symlink" in r.json()["error"]
            assert "do not serve" not in r.text
            # a FIFO there: refused at once (opened non-blocking), not waited on
            os.mkfifo(delivered_root(cfg.data_dir) / reply["message_id"] / "pipe")
            r = await asyncio.wait_for(client.get(f"{reply['url']}/files/pipe"), 5)
            assert r.status_code == 409 and "not a regular file" in r.json()["error"]
            assert replies_to(cfg, mid)

    run(body(), timeout=120)
