"""host.agent_logs on real files: runs numbered and rotated, the cap (collected and in
place under a live O_APPEND writer), bounded reads, links refused, the escaping for a
terminal, and the log of a session from before runs were kept apart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.contract.layout import InvalidId
from orchestrator.host.agent_logs import AgentLogs, cut_mark, shown


def store(tmp_path: Path, max_bytes: int = 100, keep_runs: int = 3) -> AgentLogs:
    return AgentLogs(tmp_path, max_bytes, keep_runs)


def test_each_run_gets_the_next_number_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    logs = store(tmp_path)
    for i in range(1, 6):
        assert logs.keep("g", "s1", f"run {i}\n".encode()) == i
    assert logs.runs("g", "s1") == [3, 4, 5]
    assert logs.read("g", "s1").data == b"run 5\n"  # the newest by default
    got = logs.read("g", "s1", 4)
    assert (got.run, got.data, got.runs) == (4, b"run 4\n", (3, 4, 5))
    assert logs.read("g", "s1", 1) is None  # rotated away
    assert logs.read("g", "other") is None and logs.runs("g", "other") == []
    folder = tmp_path / "logs" / "g" / "s1"
    assert sorted(os.listdir(folder)) == ["run-3.log", "run-4.log", "run-5.log"]
    assert oct(os.stat(folder).st_mode & 0o777) == "0o700"
    assert oct(os.stat(folder / "run-5.log").st_mode & 0o777) == "0o600"


def test_collected_output_keeps_its_end_and_says_what_was_cut(tmp_path: Path) -> None:
    logs = store(tmp_path, max_bytes=100)
    logs.keep("g", "s", b"0123456789" * 30, cut=5)
    data = logs.read("g", "s", max_bytes=1000).data
    mark, tail = data.split(b"\n", 1)
    assert len(data) <= 100  # the mark counts within the cap
    assert mark + b"\n" == cut_mark(305 - len(tail))
    assert tail == (b"0123456789" * 30)[-len(tail):] and len(tail) >= 30


def test_cap_trims_a_live_file_in_place_and_the_writer_appends_after_it(tmp_path: Path) -> None:
    logs = store(tmp_path, max_bytes=400)
    written = b"x" * 600 + b"END-OF-FIRST\n"
    run, fd = logs.begin("g", "s")
    try:
        os.write(fd, written)
        cut = logs.cap("g", "s")
        os.write(fd, b"after\n")  # O_APPEND: lands at the new end, no hole before it
    finally:
        os.close(fd)
    data = (tmp_path / "logs" / "g" / "s" / f"run-{run}.log").read_bytes()
    kept = len(written) - cut
    assert data == cut_mark(cut) + written[-kept:] + b"after\n"
    assert len(cut_mark(cut)) + kept <= 200  # its newest half, the mark included
    assert logs.cap("g", "s") == 0  # under the cap now


def test_a_new_run_caps_the_previous_one(tmp_path: Path) -> None:
    logs = store(tmp_path, max_bytes=400)
    _, fd = logs.begin("g", "s")
    os.write(fd, b"y" * 5000)
    os.close(fd)
    os.close(logs.begin("g", "s")[1])
    data = logs.read("g", "s", 1, max_bytes=10_000).data
    assert data.startswith(b"[orchestrator: ") and data.endswith(b"y") and len(data) <= 200


def test_reads_are_bounded_and_follow_from_an_offset(tmp_path: Path) -> None:
    logs = store(tmp_path, max_bytes=1000)
    logs.keep("g", "s", b"a" * 500 + b"b" * 500)
    assert logs.read("g", "s", max_bytes=10).data == b"b" * 10
    got = logs.read("g", "s", offset=990)
    assert (got.data, got.size) == (b"b" * 10, 1000)
    assert logs.read("g", "s", offset=5000).data == b""


def test_a_link_in_place_of_a_run_is_never_followed(tmp_path: Path) -> None:
    logs = store(tmp_path)
    logs.keep("g", "s", b"one\n")
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    path = tmp_path / "logs" / "g" / "s" / "run-1.log"
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(OSError):
        logs.read("g", "s")
    with pytest.raises(OSError):
        logs.cap("g", "s", 1)


def test_ids_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidId):
        store(tmp_path).read("g", "../etc")


def test_the_log_of_a_session_from_before_runs_becomes_its_run_0(tmp_path: Path) -> None:
    logs = store(tmp_path, max_bytes=400)
    legacy = tmp_path / "logs" / "g" / "s.log"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"old " * 1000)
    assert logs.keep("g", "s", b"new\n") == 1
    assert logs.runs("g", "s") == [0, 1]
    assert not legacy.exists()
    old = logs.read("g", "s", 0).data
    assert old.startswith(b"[orchestrator: ") and old.endswith(b"old ") and len(old) <= 200


@pytest.mark.parametrize(("raw", "text"), [
    (b"plain line\n", "plain line\n"),
    (b"tab\there\n", "tab\there\n"),
    (b"\x1b[2Jcleared", "\\x1b[2Jcleared"),  # no escape sequence reaches the terminal
    (b"\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    (b"carriage\rreturn", "carriage\\x0dreturn"),  # no overwritten line
    (b"nul\x00", "nul\\x00"),
    ("c1 \u009b31m".encode(), "c1 \\x9b31m"),  # the 8-bit CSI too
    (b"bad \xff utf-8", "bad \ufffd utf-8"),
])
def test_shown_escapes_control_characters(raw: bytes, text: str) -> None:
    assert shown(raw) == text
