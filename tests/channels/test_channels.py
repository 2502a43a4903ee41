"""Channels: the jsonl file (its own record of what it took) and the log channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loguru import logger

from orchestrator.channels import DeliveryError, Failure, Reply, StorageFull
from orchestrator.channels.jsonl import JsonlChannel, read_ids, read_lines
from orchestrator.channels.log import LogChannel
from orchestrator.cli.compose import make_channel
from orchestrator.config.sections import DeliveryConfig
from tests.support.e2e import run


def reply(mid: str, content: object = None, files: tuple[str, ...] = ()) -> Reply:
    return Reply(message_id=mid, session_id="sess-1", agent_group="grp", seq=3, kind="chat",
                 in_reply_to="msg-1", channel_type="chat", platform_id="room",
                 thread_id=None, timestamp="2025-03-01 12:00:00.000",
                 content={"text": "hi"} if content is None else content, files=files)


def test_jsonl_appends_one_object_per_reply(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"  # parent created on first use
    channel = JsonlChannel(path)
    assert not channel.already_delivered("r1")
    assert run(channel.deliver(reply("r1", files=("/d/r1/a.txt",)))) is None
    run(channel.deliver(reply("r2", content={"text": "héllo ✓"})))
    assert channel.already_delivered("r1") and channel.already_delivered("r2")
    channel.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "héllo ✓" in lines[1]  # UTF-8, not \\u escapes
    first = json.loads(lines[0])
    assert first == {"message_id": "r1", "session_id": "sess-1", "agent_group": "grp",
                     "seq": 3, "kind": "chat", "in_reply_to": "msg-1", "channel_type": "chat",
                     "platform_id": "room", "thread_id": None,
                     "timestamp": "2025-03-01 12:00:00.000", "content": {"text": "hi"},
                     "files": ["/d/r1/a.txt"]}
    assert read_ids(path) == ["r1", "r2"]


def test_jsonl_remembers_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    first = JsonlChannel(path)
    run(first.deliver(reply("r1")))
    first.close()
    again = JsonlChannel(path)
    assert again.already_delivered("r1") and not again.already_delivered("r2")
    run(again.deliver(reply("r2")))
    again.close()
    assert read_ids(path) == ["r1", "r2"]


def test_jsonl_after_a_torn_last_line_new_replies_stay_readable(tmp_path: Path) -> None:
    """A crash mid-write leaves a line without its newline; the next reply must not
    be glued onto it (and so lost to every reader of the file)."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"message_id": "r1"}) + "\n" + '{"message_id": "r2", "con')
    channel = JsonlChannel(path)
    assert channel.already_delivered("r1") and not channel.already_delivered("r2")
    run(channel.deliver(reply("r2")))
    channel.close()
    assert read_ids(path) == ["r1", "r2"]
    assert [line["message_id"] for line in read_lines(path)] == ["r1", "r2"]
    assert JsonlChannel(path).already_delivered("r2")


@pytest.mark.parametrize("where", ["path is a folder", "parent is a file"])
def test_jsonl_unwritable_is_a_delivery_error(tmp_path: Path, where: str) -> None:
    """Also from ``already_delivered``: a deliverer counts it as a failed attempt."""
    if where == "path is a folder":
        path = tmp_path / "out.jsonl"
        path.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "out.jsonl"
    channel = JsonlChannel(path)
    with pytest.raises(DeliveryError, match="cannot open"):
        channel.already_delivered("r1")
    with pytest.raises(DeliveryError):
        run(channel.deliver(reply("r1")))
    channel.close()


def test_read_helpers_on_missing_and_damaged_files(tmp_path: Path) -> None:
    assert read_ids(tmp_path / "missing.jsonl") == []
    assert read_lines(tmp_path / "missing.jsonl") == []
    path = tmp_path / "out.jsonl"
    path.write_text('{"message_id": "a"}\nnot json\n[1, 2]\n{"no_id": 1}\n{"message_id": "b"}\n')
    assert read_ids(path) == ["a", "b"]
    assert len(read_lines(path)) == 4


def test_log_channel_logs_and_never_claims_a_past_delivery() -> None:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(str(m)), level="INFO", format="{message}")
    try:
        channel = LogChannel()
        assert run(channel.deliver(reply("r1", content={"text": "hello"}))) is None
        run(channel.deliver(reply("r2", content="raw text", files=("/d/f",))))
        channel.close()
    finally:
        logger.remove(sink)
    assert any("r1" in line and "'hello'" in line for line in seen)
    assert any("r2" in line and "'raw text'" in line and "/d/f" in line for line in seen)
    assert not channel.already_delivered("r1")


def test_make_channel(tmp_path: Path) -> None:
    jsonl = make_channel(DeliveryConfig(channel="jsonl", path=tmp_path / "x.jsonl"))
    assert isinstance(jsonl, JsonlChannel) and jsonl.path == tmp_path / "x.jsonl"
    assert jsonl.name == "jsonl"
    assert isinstance(make_channel(DeliveryConfig(channel="log")), LogChannel)


@pytest.mark.parametrize("kind", ["jsonl", "log", "webhook"])
def test_every_channel_has_the_whole_protocol(tmp_path: Path, kind: str) -> None:
    """``bind`` and ``aclose`` are part of ``Channel``: a caller never probes for them
    (the jsonl and log channels answer at once and hold nothing: no-ops)."""
    channel = make_channel(DeliveryConfig(channel=kind, path=tmp_path / "x.jsonl",
                                          url="http://127.0.0.1:9/hook",
                                          secret_files=(str(tmp_path / "secret"),)))
    woken: list[str] = []
    channel.bind(woken.append)
    run(channel.aclose())
    channel.close()
    assert woken == []


# --- failure records (issue 9.5) ---------------------------------------------------------

def failure(fid: str = "r9", kind: str = "reply") -> Failure:
    return Failure(kind=kind, id=fid, session_id="sess-1", agent_group="grp",
                   reason="content is not valid UTF-8", channel_type="chat",
                   platform_id="room", thread_id="t1")


def test_jsonl_failure_records_are_typed_once_and_never_taken_for_replies(
        tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    channel = JsonlChannel(path)
    run(channel.deliver(reply("r1")))
    run(channel.report_failure(failure("r9")))
    run(channel.report_failure(failure("m1", kind="message")))
    run(channel.report_failure(failure("r9")))  # reported again: still one record
    channel.close()
    again = JsonlChannel(path)  # a restart: the file says what was reported
    run(again.report_failure(failure("r9")))
    assert not again.already_delivered("r9")  # a failure record is not a delivery
    again.close()

    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert [x.get("type") for x in lines] == [None, "failure", "failure"]
    assert lines[1] == {"type": "failure", "kind": "reply", "id": "r9", "session_id": "sess-1",
                        "agent_group": "grp", "reason": "content is not valid UTF-8",
                        "channel_type": "chat", "platform_id": "room", "thread_id": "t1"}
    assert (lines[2]["kind"], lines[2]["id"]) == ("message", "m1")
    assert read_ids(path) == ["r1"]


def test_log_channel_logs_a_failure_record() -> None:
    seen: list[str] = []
    handler = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        run(LogChannel().report_failure(failure("r9")))
    finally:
        logger.remove(handler)
    assert len(seen) == 1 and "failed reply r9" in seen[0] and "not valid UTF-8" in seen[0]


# --- a full disk: a real, small tmpfs ------------------------------------------------------

def test_jsonl_on_a_full_disk_writes_whole_lines_or_nothing(tmp_path: Path) -> None:
    """A line that does not fit (the kernel writes what fits: a short write) leaves
    the file as it was, however often it is retried; once space is freed the
    reply is written exactly once. Before: every retry appended the buffered
    bytes again (39 replies became 54 lines)."""
    from tests.support.mounts import fill, tmpfs

    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "out.jsonl"
        channel = JsonlChannel(path)
        run(channel.deliver(reply("r1")))
        filler = fill(disk)
        before = path.read_bytes()
        big = reply("r2", content={"text": "x" * 20000})  # more than the last page holds
        for _ in range(5):
            with pytest.raises(StorageFull, match="cannot append"):
                run(channel.deliver(big))
            assert path.read_bytes() == before  # no partial line, no duplicate
        assert not channel.already_delivered("r2")
        filler.unlink()
        run(channel.deliver(big))
        channel.close()
        assert read_ids(path) == ["r1", "r2"]
        data = path.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") == 2
        assert [json.loads(line)["message_id"] for line in data.splitlines()] == ["r1", "r2"]


def test_jsonl_a_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"message_id": "r1"}))  # complete, only the newline missing
    channel = JsonlChannel(path)
    assert channel.already_delivered("r1")
    run(channel.deliver(reply("r2")))
    channel.close()
    assert read_ids(path) == ["r1", "r2"]
