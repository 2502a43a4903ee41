"""The webhook channel: pure rules table-tested; then the real thing — the supervisor,
the reference agent, and a real local HTTP receiver that verifies every request with
the Standard Webhooks package from PyPI (``standardwebhooks``), never our own code."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.channels import DeliveryError, PermanentDeliveryError, Reply
from orchestrator.channels.signing import new_secret, parse_secret, rfc3339, signed_headers
from orchestrator.channels.webhook import (
    WebhookChannel,
    classify,
    encode_reply,
    file_entries,
    outcome_of,
    parse_retry_after,
    plan_files,
    plan_reply,
    reply_body,
)
from orchestrator.config.sections import DeliveryConfig
from orchestrator.host.secretfile import read_secret
from tests.support.api_helpers import Receiver, free_port, verified
from tests.support.e2e import Client, make_config, supervised
from tests.support.helpers import query, until

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


# --- pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status, verdict", [
    (200, "delivered"), (201, "delivered"), (204, "delivered"), (299, "delivered"),
    (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"),
    (400, "fail"), (401, "fail"), (403, "fail"), (404, "fail"), (410, "fail"), (422, "fail"),
    (301, "fail"), (302, "fail"), (100, "fail"),
])
def test_classify(status: int, verdict: str) -> None:
    assert classify(status) == verdict


@pytest.mark.parametrize("value, seconds", [
    (None, None), ("", None), ("7", 7.0), (" 30 ", 30.0), ("999999", 3600.0),
    ("Tue, 01 Jan 2030 12:00:20 GMT", 20.0), ("Tue, 01 Jan 2030 11:00:00 GMT", 0.0),
    ("soon", None), ("-5", None),
])
def test_parse_retry_after(value, seconds) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_outcome_of() -> None:
    assert outcome_of(200, None, NOW) is None
    err = outcome_of(429, "12", NOW)
    assert type(err) is DeliveryError and err.retry_after == 12.0
    assert outcome_of(503, None, NOW).retry_after is None
    bad = outcome_of(400, None, NOW)
    assert isinstance(bad, PermanentDeliveryError) and "400" in str(bad)
    assert "redirects are not followed" in str(outcome_of(302, None, NOW))


def _signed(keys: tuple[bytes, ...], body: bytes, stamp: int | None = None,
            msg_id: str = "out-1") -> dict[str, str]:
    return signed_headers(keys, msg_id, int(time.time()) if stamp is None else stamp, body)


def test_the_standard_webhooks_package_accepts_ours_and_refuses_tampering() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    key = parse_secret(secret, "test")[0]
    body = b'{"type":"reply","id":"out-1"}'
    headers = _signed((key,), body)
    assert headers["webhook-id"] == "out-1"
    assert headers["webhook-signature"].startswith("v1,")
    assert verified(secret, body, headers)
    assert not verified(secret, body + b" ", headers)  # tampered body
    assert not verified(secret, body.replace(b"out-1", b"out-2"), headers)
    assert not verified(secret, body, {**headers, "webhook-id": "out-2"})  # id is signed
    assert not verified(new_secret(), body, headers)  # wrong key
    stale = _signed((key,), body, stamp=int(time.time()) - 3600)
    assert not verified(secret, body, stale)  # a replay, too old
    future = _signed((key,), body, stamp=int(time.time()) + 3600)
    assert not verified(secret, body, future)


def test_every_key_signs_so_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    keys = (parse_secret(new, "n")[0], parse_secret(old, "o")[0])
    body = b"{}"
    headers = _signed(keys, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verified(new, body, headers) and verified(old, body, headers)
    assert not verified(new_secret(), body, headers)


@pytest.mark.parametrize("text, key, legacy", [
    ("whsec_" + base64.b64encode(b"k" * 24).decode(), b"k" * 24, False),
    ("plain-old-secret", b"plain-old-secret", True),  # the form from before: its bytes
])
def test_parse_secret(text: str, key: bytes, legacy: bool) -> None:
    assert parse_secret(text, "f") == (key, legacy)


@pytest.mark.parametrize("text, problem", [
    ("whsec_!!!notbase64", "not valid base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "at least 16"),
])
def test_parse_secret_refuses(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_secret(text, "f")


def test_a_legacy_key_verifies_as_whsec_of_its_bytes() -> None:
    key, _ = parse_secret("plain-old-secret", "f")
    headers = _signed((key,), b"{}")
    assert verified("whsec_" + base64.b64encode(b"plain-old-secret").decode(), b"{}", headers)


@pytest.mark.parametrize("value, out", [
    ("2030-01-01 12:00:00.000", "2030-01-01T12:00:00.000Z"),
    ("2030-01-01 12:00:00", "2030-01-01T12:00:00.000Z"),
    ("2030-01-01T13:00:00.25+01:00", "2030-01-01T12:00:00.250Z"),
    ("not a time", "not a time"), (None, None),
])
def test_rfc3339(value, out) -> None:
    assert rfc3339(value) == out


def test_files_inline_up_to_the_limit_then_name_and_size_only(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_bytes(b"hey")
    (tmp_path / "big.bin").write_bytes(b"x" * 11)
    entries = file_entries((str(tmp_path / "small.txt"), str(tmp_path / "big.bin")), 10)
    assert entries == [{"name": "small.txt", "size": 3, "sha256": hashlib.sha256(b"hey")
                        .hexdigest(), "data": "aGV5", "omitted": None},
                       {"name": "big.bin", "size": 11, "sha256": None, "data": None,
                        "omitted": "max_file_bytes"}]
    (tmp_path / "link").symlink_to(tmp_path / "small.txt")
    with pytest.raises(DeliveryError):
        file_entries((str(tmp_path / "link"),), 10)
    os.mkfifo(tmp_path / "fifo")  # never opened for reading in a way that blocks
    with pytest.raises(DeliveryError):
        file_entries((str(tmp_path / "fifo"),), 10)


MiB = 1 << 20


def _plan(sizes: list[int], *, base: int = 1000, max_file: int = MiB, cap: int = 8 * MiB):
    files = [(f"/d/f{i}", f"f{i}", n) for i, n in enumerate(sizes)]
    return plan_files(files, base, max_file, cap)


@pytest.mark.parametrize("sizes, max_file, cap, inline, unlisted", [
    ([], MiB, 8 * MiB, [], 0),
    ([10, 20], MiB, 8 * MiB, [0, 1], 0),
    ([2 * MiB, 10], MiB, 8 * MiB, [1], 0),  # over max_file_bytes: named only
    ([MiB] * 10, MiB, 8 * MiB, list(range(5)), 0),  # 5 × 1.33 MiB of base64 fit in 8 MiB
    ([MiB] * 300, MiB, 8 * MiB, list(range(5)), 0),  # the rest named, not read
    ([6 * MiB, 10], 8 * MiB, 8 * MiB, [1], 0),  # 8 MiB of base64 does not fit; later small does
    ([0] * 200_000, MiB, 8 * MiB, None, "some"),  # names alone over the cap: counted
    ([MiB], MiB, 64 * 1024, [], 0),
])
def test_plan_files_keeps_the_body_under_the_cap(sizes, max_file, cap, inline, unlisted) -> None:
    plan = _plan(sizes, max_file=max_file, cap=cap)
    if inline is not None:
        assert plan.inline == inline
    if unlisted == "some":
        assert 0 < plan.unlisted < len(sizes) and len(plan.entries) + plan.unlisted == len(sizes)
    else:
        assert plan.unlisted == unlisted
    assert plan.size <= cap
    assert all(e["omitted"] == "max_file_bytes" for e in plan.entries if e["size"] > max_file)


def test_encoded_body_is_under_the_cap_and_says_what_it_left_out(tmp_path: Path) -> None:
    paths = []
    for i, n in enumerate([MiB, 3 * MiB, 100, MiB, MiB, MiB, MiB, MiB, 5]):
        (tmp_path / f"f{i}").write_bytes(os.urandom(n))
        paths.append(str(tmp_path / f"f{i}"))
    reply = Reply("out-1", "sess-1", "grp", 3, "chat", None, None, None, None, "t",
                  {"text": "hi", "files": "\u0000files\u0000"}, tuple(paths))
    cfg = DeliveryConfig(max_file_bytes=2 * MiB, max_payload_bytes=4 * MiB)
    plan = plan_reply(reply, cfg)
    data = encode_reply(reply, plan, cfg)
    assert len(data) <= cfg.max_payload_bytes
    body = json.loads(data)
    assert body["content"] == reply.content and body["files_unlisted"] == 0
    sent = {e["name"]: e for e in body["files"]}
    assert [e["name"] for e in body["files"]] == [f"f{i}" for i in range(9)]
    assert sent["f1"]["omitted"] == "max_file_bytes" and sent["f1"]["data"] is None
    for name, e in sent.items():
        raw = (tmp_path / name).read_bytes()
        assert e["size"] == len(raw)
        if e["data"] is not None:
            assert base64.b64decode(e["data"]) == raw and e["omitted"] is None
            assert e["sha256"] == hashlib.sha256(raw).hexdigest()
        else:
            assert e["omitted"] in ("max_file_bytes", "max_payload_bytes")
    assert {n for n, e in sent.items() if e["data"]} == {"f0", "f2", "f3", "f8"}


def test_content_alone_over_the_cap_fails_for_good() -> None:
    reply = Reply("out-1", "sess-1", "grp", 3, "chat", None, None, None, None, "t",
                  {"text": "x" * 70_000}, ())
    with pytest.raises(PermanentDeliveryError, match="max_payload_bytes"):
        plan_reply(reply, DeliveryConfig(max_payload_bytes=65536))


def test_a_file_that_grows_after_planning_is_a_failed_attempt(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    reply = Reply("out-1", "s", "g", 1, "chat", None, None, None, None, "t", {}, (str(tmp_path / "f"),))
    plan = plan_reply(reply, DeliveryConfig())
    (tmp_path / "f").write_bytes(b"abcdef")  # an agent still holding the file open
    with pytest.raises(DeliveryError, match="changed size"):
        encode_reply(reply, plan, DeliveryConfig())


def test_reply_body_fields() -> None:
    reply = Reply("out-1", "sess-1", "grp", 3, "chat", "msg-1", "chat", "room", "t",
                  "2030-01-01 12:00:00", {"text": "hi"}, ())
    assert reply_body(reply, []) == {
        "type": "reply", "id": "out-1", "session_id": "sess-1", "agent_group": "grp", "seq": 3,
        "kind": "chat", "in_reply_to": "msg-1",
        "routing": {"channel_type": "chat", "platform_id": "room", "thread_id": "t"},
        "timestamp": "2030-01-01T12:00:00.000Z", "content": {"text": "hi"}, "files": [],
        "files_unlisted": 0}


def test_secret_file_is_created_0600_in_the_whsec_form_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "s" / "secret"
    cfg = DeliveryConfig(channel="webhook", url="http://127.0.0.1:1/",
                         secret_files=(str(path),))
    WebhookChannel(cfg)
    assert (path.stat().st_mode & 0o777) == 0o600
    first = read_secret(path)
    assert first.startswith("whsec_") and len(base64.b64decode(first[6:])) == 32
    WebhookChannel(cfg)
    assert read_secret(path) == first


def test_a_second_key_file_must_exist(tmp_path: Path) -> None:
    cfg = DeliveryConfig(channel="webhook", url="http://127.0.0.1:1/",
                         secret_files=(str(tmp_path / "a"), str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="missing.*secret_files lists it"):
        WebhookChannel(cfg)


# --- end to end ---------------------------------------------------------------------------


def webhook_config(tmp_path: Path, url: str, **delivery):
    return make_config(tmp_path, delivery={"channel": "webhook", "url": url,
                                           "retry_base": 0.1, "timeout": 2.0, **delivery})


def write_secret(cfg, index: int = 0) -> str:
    """A key in the ``index``-th configured file (0600), before the orchestrator starts,
    so the receiver knows it from the first request."""
    path = Path(cfg.delivery.secret_files[index])
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


async def receiving(cfg, behave=None, port: int = 0, index: int = 0) -> Receiver:
    secret = write_secret(cfg, index)
    receiver = Receiver(secret) if behave is None else Receiver(secret, behave)
    return await receiver.start(port)


def all_verified(receiver: Receiver) -> None:
    assert receiver.requests and all(r.signature_ok for r in receiver.requests), \
        [r.headers for r in receiver.requests if not r.signature_ok]


def delivered(cfg, client: Client, row) -> dict[str, str]:
    return dict(query(client.paths(row).inbound_db,
                      "SELECT message_out_id, status FROM delivered"))


def scripted(*answers: tuple[int, float, dict]):
    """Answers to the reply POSTs in order (the last repeats); failures always 200."""
    calls = {"n": 0}

    def behave(body: dict):
        if body["type"] != "reply":
            return 200, 0.0, {}
        i = min(calls["n"], len(answers) - 1)
        calls["n"] += 1
        return answers[i]
    return behave


async def test_500_then_200_is_delivered_once(tmp_path: Path, reap_agents) -> None:
    receiver = await Receiver("", scripted((500, 0, {}), (200, 0, {}))).start()
    cfg = webhook_config(tmp_path, receiver.url)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, mid = client.send("helpers", "hello", files={"n.txt": b"file bytes"})
        await until(lambda: delivered(cfg, client, row), message="delivered row")
        [(out_id, status)] = delivered(cfg, client, row).items()
        assert status == "delivered"
        posts = receiver.replies(out_id)
        assert len(posts) == 2 and all(p.signature_ok for p in posts)
        assert {p.headers["webhook-id"] for p in posts} == {out_id}
        body = posts[-1].json
        assert body["in_reply_to"] == mid and body["content"]["text"] == "echo: hello"
        assert body["files"] == [{"name": "n.txt", "size": 10, "data": "ZmlsZSBieXRlcw==",
                                  "sha256": hashlib.sha256(b"file bytes").hexdigest(),
                                  "omitted": None}]
        assert body["routing"]["channel_type"] == "cli"
        assert receiver.failures() == []
    assert len(receiver.replies(out_id)) == 2  # nothing more after the 200
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_400_fails_at_once_and_a_failure_record_goes_to_the_same_url(tmp_path: Path,
                                                                   reap_agents) -> None:
    receiver = await Receiver("", scripted((400, 0, {}))).start()
    cfg = webhook_config(tmp_path, receiver.url, max_attempts=5)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="settled")
        [(out_id, status)] = delivered(cfg, client, row).items()
        assert status == "failed"
        await until(lambda: receiver.failures(), message="the failure record")
        # The window has passed once the session has had a later delivery pass after
        # the first retry would have been due (retry_base 0.1 s): a second message, sent
        # then, has its reply posted by a pass that would try an unsettled earlier
        # reply first (seq order). Its POST and failure record prove that pass ran.
        failed_at = time.monotonic()
        await until(lambda: time.monotonic() - failed_at > cfg.delivery.retry_base,
                    message="the first retry's due time")
        client.send("helpers", "again")
        await until(lambda: any(f.json["id"] != out_id for f in receiver.failures()),
                    message="the later pass (the second reply's failure record)")
        assert len(receiver.replies(out_id)) == 1
        failure = receiver.failures()[0]
        assert failure.signature_ok
        assert failure.json["kind"] == "reply" and failure.json["id"] == out_id
        assert "400" in failure.json["reason"]
        assert failure.json["platform_id"] == "local"  # routed like the reply
        assert failure.headers["webhook-id"] == f"failure-reply-{out_id}"
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_a_receiver_that_hangs_past_the_timeout_is_retried(tmp_path: Path,
                                                           reap_agents) -> None:
    receiver = await Receiver("", scripted((200, 5.0, {}), (200, 0, {}))).start()
    cfg = webhook_config(tmp_path, receiver.url, timeout=0.5)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        started = time.monotonic()
        await until(lambda: delivered(cfg, client, row), message="delivered")
        assert time.monotonic() - started >= 0.5
        [(out_id, status)] = delivered(cfg, client, row).items()
        assert status == "delivered" and len(receiver.replies(out_id)) == 2
        err = query(client.registry.path, "SELECT COUNT(*) FROM delivery_attempts")[0][0]
        assert err == 0  # cleared once delivered
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_a_receiver_that_is_down_then_back_gets_the_reply(tmp_path: Path, reap_agents) -> None:
    port = free_port()
    cfg = webhook_config(tmp_path, f"http://127.0.0.1:{port}/hook", max_attempts=20,
                         retry_base=0.05)
    secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        await until(lambda: (query(client.registry.path, "SELECT MAX(attempts) FROM "
                                   "delivery_attempts")[0][0] or 0) >= 2,
                    message="failed attempts while down")
        assert delivered(cfg, client, row) == {}
        receiver = await Receiver(secret).start(port)
        await until(lambda: delivered(cfg, client, row), timeout=30, message="delivered")
        [(out_id, status)] = delivered(cfg, client, row).items()
        assert status == "delivered"
        assert len(receiver.replies(out_id)) == 1 and receiver.replies()[0].signature_ok
    all_verified(receiver)
    await receiver.stop()
    client.close()


def _in_two_seconds() -> str:
    return email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2),
                                       usegmt=True)


@pytest.mark.parametrize("retry_after, least", [
    (lambda: "1", 1.0),  # delta-seconds
    (_in_two_seconds, 1.0),  # an HTTP date (whole seconds: at least 1 s of the 2)
], ids=["seconds", "http-date"])
async def test_429_retry_after_is_honoured(tmp_path: Path, reap_agents, retry_after,
                                           least: float) -> None:
    answers = iter([(429, 0.0, "ask"), (200, 0.0, None)])

    def behave(body: dict):
        if body["type"] != "reply":
            return 200, 0.0, {}
        status, delay, ask = next(answers, (200, 0.0, None))
        return status, delay, ({"Retry-After": retry_after()} if ask else {})

    receiver = await Receiver("", behave).start()
    cfg = webhook_config(tmp_path, receiver.url)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="delivered")
    arrivals = [r.at for r in receiver.replies()]
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= least
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_a_slow_receiver_delays_only_its_own_session(tmp_path: Path, reap_agents) -> None:
    def behave(body: dict):
        slow = body.get("routing", {}).get("platform_id") == "slow"
        return 200, 3.0 if slow else 0.0, {}

    receiver = await Receiver("", behave).start()
    cfg = webhook_config(tmp_path, receiver.url, timeout=10)
    receiver.secret = write_secret(cfg)
    client = Client(cfg)
    async with supervised(cfg):
        slow_row, _ = client.send("helpers", "slow", platform="slow")
        await until(lambda: receiver.replies(), message="the slow POST under way")
        started = time.monotonic()
        fast_row, _ = client.send("helpers", "fast", platform="fast")
        await until(lambda: delivered(cfg, client, fast_row), message="fast delivered")
        assert time.monotonic() - started < 2.5  # not behind the 3 s answer
        assert delivered(cfg, client, slow_row) == {}  # still waiting for its receiver
        await until(lambda: delivered(cfg, client, slow_row), message="slow delivered")
    all_verified(receiver)
    await receiver.stop()
    client.close()


async def test_rotation_two_keys_sign_and_a_receiver_knowing_either_accepts(
        tmp_path: Path, reap_agents) -> None:
    """``secret_files = [new, old]``: every request carries both signatures, so the
    receiver moved to the new key accepts, and one still on the old key does too."""
    receiver = await Receiver("").start()
    cfg = webhook_config(tmp_path, receiver.url,
                         secret_files=["webhook-secret-2", "webhook-secret"])
    new, old = write_secret(cfg, 0), write_secret(cfg, 1)
    receiver.secret = new  # the receiver knows only the new key
    client = Client(cfg)
    async with supervised(cfg):
        row, _ = client.send("helpers", "hello")
        await until(lambda: delivered(cfg, client, row), message="delivered")
    [post] = receiver.replies()
    assert post.signature_ok
    assert len(post.headers["webhook-signature"].split(" ")) == 2
    assert verified(old, post.body, post.headers)  # a receiver still on the old key
    assert not verified(new_secret(), post.body, post.headers)
    all_verified(receiver)
    await receiver.stop()
    client.close()
