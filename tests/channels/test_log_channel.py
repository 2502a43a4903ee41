"""Issue #21 (low): the log channel wrote agent-controlled fields raw — a newline in a
reply forged a whole "delivered" log line, and terminal escapes passed through.
``printable`` is table-tested; then the real channel into a real loguru sink. The
jsonl channel is safe by construction (``json.dumps`` escapes controls; ``json_line``
also the three Unicode line breaks)."""

from __future__ import annotations

import json

import pytest
from loguru import logger

from orchestrator.channels import Failure, Reply
from orchestrator.channels.jsonl import json_line
from orchestrator.channels.log import LogChannel
from orchestrator.support.printable import printable
from tests.support.e2e import run


@pytest.mark.parametrize("value, shown", [
    ("hello", "hello"),
    ("héllo wörld ✓ 日本", "héllo wörld ✓ 日本"),  # printable non-ASCII stays
    (None, "-"),
    (42, "42"),
    ("a\nb", "a\\x0ab"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # ANSI colour
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC: the terminal's title
    ("tab\there", "tab\\x09here"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("c1\x9b31m", "c1\\x9b31m"),  # the 8-bit CSI
    ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
    ("rtl\u202eevil", "rtl\\u202eevil"),  # bidi override
    ("zw\u200bj", "zw\\u200bj"),
    ("back\\x0a", "back\\\\x0a"),  # a typed escape never reads as a real one
    ("priv\U000f0000", "priv\\U000f0000"),
])
def test_printable(value, shown) -> None:
    assert printable(value) == shown


def test_printable_caps_the_length() -> None:
    assert printable("x" * 5000, 10) == "x" * 10 + "…(+4990 chars)"
    assert printable("\n" * 3, 2) == "\\x0a\\x0a…(+1 chars)"


FORGED = "ok\n2030-01-01 12:00:00.000 | INFO     | reply r-fake [grp/sess] delivered\x1b[2K"


def _lines(action) -> list[str]:
    out: list[str] = []
    sink = logger.add(lambda m: out.append(str(m)), level="INFO",
                      format="{time} | {level} | {message}")
    try:
        run(action)
    finally:
        logger.remove(sink)
    return "".join(out).splitlines()


def test_a_reply_is_one_log_line_whatever_the_agent_wrote() -> None:
    reply = Reply("r1", "sess", "grp", 1, "chat", None, "chat\nINFO forged",
                  "room\x1b[8m", None, "t", {"text": FORGED}, ("/d/r1/evil\nname\x1b[0m",))
    [line] = _lines(LogChannel().deliver(reply))
    assert "\x1b" not in line and "reply r-fake" in line  # shown, escaped, on the one line
    assert "\\x0a2030-01-01" in line and "chat\\x0aINFO forged" in line
    assert "evil\\x0aname\\x1b[0m" in line


def test_a_failure_record_is_one_log_line() -> None:
    failure = Failure("reply", "r1", "sess", "grp", f"bad: {FORGED}", "chat\n", "room\r", None)
    [line] = _lines(LogChannel().report_failure(failure))
    assert "\x1b" not in line and "\r" not in line and "bad: ok\\x0a2030" in line


# --- the jsonl channel: safe by construction ------------------------------------------------


@pytest.mark.parametrize("text", [FORGED, "a\u2028b\u2029c\x85d", "\r\x1c\x1d\x1e\x0b\x0c"])
def test_a_jsonl_record_is_one_line_and_reads_back_the_same(text: str) -> None:
    record = {"message_id": "r1", "content": {"text": text}, "platform_id": text}
    line = json_line(record)
    decoded = line.decode("utf-8")
    assert decoded.endswith("\n") and len(decoded.splitlines()) == 1
    assert "\x1b" not in decoded and json.loads(decoded) == record
