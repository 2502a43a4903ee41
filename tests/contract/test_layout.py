"""layout: pure path arithmetic, table-tested without touching a filesystem."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from orchestrator.contract import layout
from orchestrator.contract.layout import InvalidId, Kind, PathInfo, classify, validate_id

ROOT = PurePosixPath("/data/sessions")


@pytest.mark.parametrize("value", [
    "a", "A", "0", "main", "sess-0123abcd", "msg_1", "user@example.com", "a+b", "v1.2",
    "x" * 128, "a.b.c", "a-", "9.",
])
def test_validate_id_accepts(value):
    assert validate_id(value) == value


@pytest.mark.parametrize("value", [
    "", ".", "..", ".hidden", "-flag", "_x", "a/b", "a\\b", "/abs", "../up", "a..b", "a b",
    "tab\tx", "nul\x00", "new\nline", "x" * 129, "é", None, 5, b"bytes",
])
def test_validate_id_refuses(value):
    with pytest.raises(InvalidId) as info:
        validate_id(value, "session id")  # type: ignore[arg-type]
    assert "invalid session id" in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_id_is_a_value_error():
    """The CLI maps ValueError to exit code 2; InvalidId must be one."""
    assert issubclass(InvalidId, ValueError)


def test_paths_of_a_session():
    data = Path("/d")
    p = layout.session_paths(data, "grp", "s1")
    assert p.root == Path("/d/sessions/grp/s1")
    assert p.inbound_db == Path("/d/sessions/grp/s1/inbound.db")
    assert p.outbound_db == Path("/d/sessions/grp/s1/outbound.db")
    assert p.heartbeat == Path("/d/sessions/grp/s1/.heartbeat")
    assert p.inbox == Path("/d/sessions/grp/s1/inbox")
    assert p.outbox == Path("/d/sessions/grp/s1/outbox")
    assert p.inbox_dir("m1") == Path("/d/sessions/grp/s1/inbox/m1")
    assert p.outbox_dir("o1") == Path("/d/sessions/grp/s1/outbox/o1")
    assert layout.registry_path(data) == Path("/d/orchestrator.db")
    assert layout.sessions_root(data) == Path("/d/sessions")
    assert layout.delivered_root(data) == Path("/d/delivered")


@pytest.mark.parametrize("group, session", [("../x", "s"), ("g", "../../etc"), ("g", "a/b"),
                                            ("", "s"), ("g", "..")])
def test_session_dir_refuses_unsafe_ids(group, session):
    with pytest.raises(InvalidId):
        layout.session_dir(Path("/d"), group, session)


@pytest.mark.parametrize("message_id", ["../x", "..", "a/b", ""])
def test_inbox_and_outbox_dirs_refuse_unsafe_message_ids(message_id):
    p = layout.session_paths(Path("/d"), "g", "s")
    with pytest.raises(InvalidId):
        p.inbox_dir(message_id)
    with pytest.raises(InvalidId):
        p.outbox_dir(message_id)


@pytest.mark.parametrize("rel, expected", [
    ("g", PathInfo("g", None, Kind.GROUP)),
    ("g/s", PathInfo("g", "s", Kind.SESSION)),
    ("g/s/.heartbeat", PathInfo("g", "s", Kind.HEARTBEAT)),
    ("g/s/outbound.db", PathInfo("g", "s", Kind.OUTBOUND_DB)),
    ("g/s/inbound.db", PathInfo("g", "s", Kind.INBOUND_DB)),
    ("g/s/outbound.db-journal", PathInfo("g", "s", Kind.OTHER)),
    ("g/s/inbound.db-journal", PathInfo("g", "s", Kind.OTHER)),
    ("g/s/outbox", PathInfo("g", "s", Kind.OUTBOX)),
    ("g/s/outbox/o1", PathInfo("g", "s", Kind.OUTBOX, "o1")),
    ("g/s/outbox/o1/a.png", PathInfo("g", "s", Kind.OUTBOX, "o1")),
    ("g/s/inbox", PathInfo("g", "s", Kind.INBOX)),
    ("g/s/inbox/m1/doc.pdf", PathInfo("g", "s", Kind.INBOX, "m1")),
    ("g/s/.agent.pid", PathInfo("g", "s", Kind.OTHER)),
    ("g/s/notes.txt", PathInfo("g", "s", Kind.OTHER)),
    ("g/s/.heartbeat/x", PathInfo("g", "s", Kind.OTHER)),  # a file can't have children
    ("g/s/outbound.db/x", PathInfo("g", "s", Kind.OTHER)),
    ("", None),  # the root itself
    (".DS_Store", None),
    ("g/.tmp-x", None),
    ("../elsewhere/g/s", None),
])
def test_classify(rel, expected):
    path = ROOT / rel if rel else ROOT
    assert classify(ROOT, path) == expected


@pytest.mark.parametrize("path", ["/data/other/g/s/.heartbeat", "/data", "/", "relative/g/s"])
def test_classify_outside_root_is_none(path):
    assert classify(ROOT, path) is None


def test_classify_accepts_strings_and_paths_alike():
    assert classify(str(ROOT), str(ROOT / "g/s/.heartbeat")) == classify(
        Path(ROOT), Path(ROOT) / "g" / "s" / ".heartbeat") == PathInfo("g", "s", Kind.HEARTBEAT)


def test_layout_is_stdlib_only():
    """The reference agent imports layout inside a python3-only container."""
    source = Path(layout.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "collections", "enum", "os", "re"}
