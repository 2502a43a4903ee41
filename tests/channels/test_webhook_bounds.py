"""Issue #21, class 5: a reply's files never make an unbounded webhook POST.

The real channel POSTs to a real local receiver (uvicorn, signatures verified); the
files are real (sparse, so hundreds of MB cost no disk). A ``LoopWatch`` ticker on
the same loop measures the process's resident memory and the loop's longest stall.
Before the cap, the 300 × 1 MiB reply went out as one 419 MB POST (VmHWM 35 MB →
1.6 GB, the loop stalled 7.7 s); now it is one POST under ``max_payload_bytes``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from orchestrator.channels import InFlight, Reply
from orchestrator.channels.signing import new_secret, parse_secret
from orchestrator.channels.webhook import WebhookChannel
from orchestrator.config.sections import DeliveryConfig
from tests.support.bounds import LeanReceiver, LoopWatch, MiB

SECRET = new_secret()


def sparse_files(folder: Path, count: int, size: int, prefix: str = "f") -> tuple[str, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:05}.bin"
        with open(path, "wb") as fh:
            fh.truncate(size)
        paths.append(str(path))
    return tuple(paths)


def reply_of(files: tuple[str, ...], rid: str = "out-1", session: str = "sess-1") -> Reply:
    return Reply(rid, session, "grp", 1, "chat", None, "chat", "room", None,
                 "2030-01-01 12:00:00", {"text": "many files", "files": [
                     os.path.basename(f) for f in files]}, files)


async def deliver_all(channel: WebhookChannel, replies: list[Reply]) -> None:
    """What the Deliverer does: hand each over (InFlight), wait for the wake-up, ask again."""
    woken: asyncio.Queue[str] = asyncio.Queue()
    channel.bind(woken.put_nowait)
    for reply in replies:
        try:
            await channel.deliver(reply)
        except InFlight:
            pass
    by_session = {r.session_id: r for r in replies}
    for _ in replies:
        sid = await asyncio.wait_for(woken.get(), 120)
        assert await channel.deliver(by_session[sid]) is None


async def _run(tmp_path: Path, replies: list[Reply], **cfg) -> tuple[LeanReceiver, LoopWatch]:
    receiver = await LeanReceiver(SECRET).start()
    config = DeliveryConfig(channel="webhook", url=receiver.url, timeout=60, **cfg)
    channel = WebhookChannel(config, keys=(parse_secret(SECRET, "test")[0],))
    try:
        async with LoopWatch() as watch:
            await deliver_all(channel, replies)
    finally:
        await channel.aclose()
        await receiver.stop()
    assert all(r.signature_ok for r in receiver.requests)
    return receiver, watch


async def test_300_files_of_1_mib_go_out_as_one_post_under_the_cap(tmp_path: Path) -> None:
    files = sparse_files(tmp_path / "delivered" / "out-1", 300, MiB)
    receiver, watch = await _run(tmp_path, [reply_of(files)])
    [size] = receiver.sizes
    assert size <= 8 * MiB  # the default [delivery] max_payload_bytes
    [post] = receiver.replies()
    entries = post.json["files"]
    assert [e["name"] for e in entries] == [os.path.basename(f) for f in files]
    assert post.json["files_unlisted"] == 0
    inline = [e for e in entries if e["data"] is not None]
    assert len(inline) == 5  # 5 × 1.33 MiB of base64 fit under 8 MiB
    assert all(e["omitted"] == "max_payload_bytes" and e["sha256"] is None and e["size"] == MiB
               for e in entries if e["data"] is None)
    assert watch.rss_growth < 100 * MiB, watch.rss_growth  # was 1.6 GB
    assert watch.max_lag < 0.25, watch.max_lag  # was 7.7 s


async def test_many_big_replies_at_once_share_one_memory_budget(tmp_path: Path) -> None:
    files = sparse_files(tmp_path / "delivered" / "shared", 300, MiB)
    replies = [reply_of(files, f"out-{i}", f"sess-{i}") for i in range(12)]
    receiver, watch = await _run(tmp_path, replies)
    assert len(receiver.replies()) == 12 and max(receiver.sizes) <= 8 * MiB
    # 12 bodies of 8 MiB, each also received in this process: without the shared budget
    # (4 bodies at once) this would be well over 300 MB
    assert watch.rss_growth < 200 * MiB, watch.rss_growth
    assert watch.max_lag < 0.5, watch.max_lag


async def test_one_huge_file_is_named_never_read(tmp_path: Path) -> None:
    files = sparse_files(tmp_path / "delivered" / "out-1", 1, 1 << 30)  # 1 GiB
    receiver, watch = await _run(tmp_path, [reply_of(files)], max_file_bytes=2**31)
    [entry] = receiver.replies()[0].json["files"]
    assert entry == {"name": "f00000.bin", "size": 1 << 30, "sha256": None, "data": None,
                     "omitted": "max_payload_bytes"}
    assert watch.rss_growth < 50 * MiB and watch.max_lag < 0.25


async def test_many_small_files_fill_the_cap_and_the_rest_are_named(tmp_path: Path) -> None:
    files = sparse_files(tmp_path / "delivered" / "out-1", 4000, 4096)
    receiver, _ = await _run(tmp_path, [reply_of(files)], max_payload_bytes=4 * MiB)
    [size] = receiver.sizes
    assert size <= 4 * MiB
    entries = receiver.replies()[0].json["files"]
    assert len(entries) == 4000 and receiver.replies()[0].json["files_unlisted"] == 0
    inline = [e for e in entries if e["data"] is not None]
    assert 500 < len(inline) < 4000  # as many as fit, in order, then names only
    assert entries[: len(inline)] == inline


async def test_more_names_than_fit_are_counted_not_listed(tmp_path: Path) -> None:
    files = sparse_files(tmp_path / "delivered" / "out-1", 3000, 0, prefix="n" * 200)
    reply = Reply("out-1", "sess-1", "grp", 1, "chat", None, None, None, None, "t",
                  {"text": "files listed elsewhere"}, files)
    receiver, _ = await _run(tmp_path, [reply], max_payload_bytes=256 * 1024)
    [size] = receiver.sizes
    body = receiver.replies()[0].json
    assert size <= 256 * 1024
    assert body["files_unlisted"] > 0
    assert len(body["files"]) + body["files_unlisted"] == 3000
