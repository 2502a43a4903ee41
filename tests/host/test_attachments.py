"""attachments: hostile names and pre-placed symlinks never write outside the session."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from orchestrator.contract.layout import SessionPaths
from orchestrator.host import attachments
from orchestrator.host.attachments import AttachmentError, Decoded, safe_name, unique_names
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import MessageError, Sessions
from tests.support.helpers import query
from tests.support.mounts import tmpfs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- pure helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("photo.png", "photo.png"),
    ("../../x", "x"),
    ("/etc/passwd", "passwd"),
    ("a/b", "b"),
    ("..\\..\\windows\\evil.exe", "evil.exe"),
    ("C:\\Users\\me\\doc.txt", "doc.txt"),
    ("..", "attachment-3"),
    (".", "attachment-3"),
    ("", "attachment-3"),
    ("   ", "attachment-3"),
    ("dir/", "attachment-3"),
    ("a/..", "attachment-3"),
    ("nul\x00byte.txt", "nul_byte.txt"),
    ("tab\there\nnewline\r.txt", "tab_here_newline_.txt"),
    ("bell\x07\x1b[31m.txt", "bell__[31m.txt"),
    ("del\x7f", "del_"),
    ("  padded.txt  ", "padded.txt"),
    (None, "attachment-3"),
    (42, "attachment-3"),
    (["a"], "attachment-3"),
    ("résumé.pdf", "résumé.pdf"),
    ("...", "..."),  # a legal file name, not a path step
    (".hidden", ".hidden"),
])
def test_safe_name(raw, expected):
    assert safe_name(raw, 3) == expected


@pytest.mark.parametrize("raw, ext", [
    ("a" * 1000 + ".png", ".png"),
    ("é" * 300 + ".txt", ".txt"),
    ("b" * 5000, ""),
    ("c" * 300 + "." + "x" * 40, ""),  # an absurd "extension" is not kept
])
def test_safe_name_cuts_long_names(raw, ext):
    name = safe_name(raw, 1)
    assert len(name.encode("utf-8")) <= attachments.MAX_NAME_BYTES
    assert name.endswith(ext)
    assert "/" not in name and "\x00" not in name
    assert name.encode("utf-8").decode("utf-8") == name  # no half characters


@pytest.mark.parametrize("names, expected", [
    ([], []),
    (["a.png"], ["a.png"]),
    (["a.png", "a.png"], ["a.png", "a-1.png"]),
    (["a.png", "a.png", "a.png"], ["a.png", "a-1.png", "a-2.png"]),
    (["a.png", "a.png", "a-1.png"], ["a.png", "a-1.png", "a-1-1.png"]),
    (["x", "x"], ["x", "x-1"]),
    ([".env", ".env"], [".env", ".env-1"]),
    (["a.tar.gz", "a.tar.gz"], ["a.tar.gz", "a.tar-1.gz"]),
    (["A", "a"], ["A", "a"]),
])
def test_unique_names(names, expected):
    assert unique_names(names) == expected
    assert len(set(unique_names(names))) == len(names)


# --- decode ------------------------------------------------------------------------------

def test_decode_valid_items_keeps_extra_fields_only():
    items = [{"name": "a.txt", "data": b64(b"hello"), "mime": "text/plain",
              "path": "/etc/shadow", "size": 999},
             {"name": "a.txt", "data": b64(b"")}]
    out = attachments.decode(items, max_bytes=100)
    assert out == [Decoded("a.txt", b"hello", {"mime": "text/plain"}),
                   Decoded("a-1.txt", b"", {})]


@pytest.mark.parametrize("items, fragment", [
    ("not a list", "must be a list"),
    ({"name": "a"}, "must be a list"),
    (None, "must be a list"),
    (["x"], "attachment #1 must be an object"),
    ([{"name": "a"}], "attachment #1 must be an object with a base64 'data' string"),
    ([{"name": "a", "data": 5}], "attachment #1 must be an object"),
    ([{"name": "ok", "data": "aGk="}, {"name": "b", "data": "@@not base64@@"}],
     "attachment 'b' is not valid base64"),
    ([{"name": "a", "data": "aGk"}], "not valid base64"),  # bad padding
    ([{"name": "a", "data": "aGk=\n"}], "not valid base64"),  # strict: no stray characters
])
def test_decode_refuses(items, fragment):
    with pytest.raises(AttachmentError) as info:
        attachments.decode(items, max_bytes=100)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size, ok", [(100, True), (101, False), (10_000, False)])
def test_decode_size_limit(size, ok):
    items = [{"name": "big.bin", "data": b64(b"x" * size)}]
    if ok:
        assert len(attachments.decode(items, max_bytes=100)[0].data) == size
    else:
        with pytest.raises(AttachmentError) as info:
            attachments.decode(items, max_bytes=100)
        assert str(info.value) == ("attachment 'big.bin' is larger than the 100-byte limit "
                                   "([sessions] max_attachment_bytes)")


# --- writing into a real session folder --------------------------------------------------

@pytest.fixture
def place(tmp_path):
    """A session folder and, next to it, an 'outside' folder that must stay untouched."""
    root = tmp_path / "data" / "sessions" / "g" / "s"
    (root / "inbox").mkdir(parents=True)
    (root / "outbox").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("original")
    return SessionPaths(root), outside


def _all_files(folder: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(folder))] = p.read_bytes() if not p.is_symlink() else b"<link>"
    return out


def _assert_outside_untouched(outside: Path):
    assert _all_files(outside) == {"keep.txt": b"original"}


HOSTILE = ["../../x", "/etc/passwd", "a/b", "..", "nul\x00.txt", "ctl\x01\x1f.txt", "",
           "z" * 5000, "dup.txt", "dup.txt", "../outside/keep.txt", ".", "inbox", "../../../../" +
           "tmp/pwned"]


def test_hostile_names_stay_inside_the_message_folder(place):
    paths, outside = place
    files = attachments.decode([{"name": n, "data": b64(f"#{i}".encode())}
                                for i, n in enumerate(HOSTILE)], max_bytes=1000)
    entries = attachments.write_inbox(paths, "m1", files)
    target = paths.inbox / "m1"
    written = _all_files(target)
    assert len(written) == len(HOSTILE)  # every file kept, none overwrote another
    assert all("/" not in name for name in written)  # all directly in inbox/m1/
    assert sorted(written.values()) == sorted(f"#{i}".encode() for i in range(len(HOSTILE)))
    for e in entries:
        p = paths.root / e["path"]
        assert p.parent == target and p.read_bytes() == written[e["name"]]
        assert e["size"] == len(written[e["name"]])
        assert not Path(e["path"]).is_absolute() and ".." not in Path(e["path"]).parts
    assert sorted(os.listdir(paths.inbox)) == ["m1"]  # no staging left
    _assert_outside_untouched(outside)
    assert not Path("/tmp/pwned").exists()


def test_symlinked_message_folder_is_refused(place):
    paths, outside = place
    (paths.inbox / "m1").symlink_to(outside, target_is_directory=True)
    files = [Decoded("keep.txt", b"EVIL", {}), Decoded("new.txt", b"EVIL", {})]
    with pytest.raises(AttachmentError, match="already exists"):
        attachments.write_inbox(paths, "m1", files)
    _assert_outside_untouched(outside)
    assert sorted(os.listdir(paths.inbox)) == ["m1"]  # staging cleaned up, link left alone
    assert (paths.inbox / "m1").is_symlink()


def test_symlinked_inbox_is_refused(place):
    paths, outside = place
    (paths.inbox).rmdir()
    paths.inbox.symlink_to(outside, target_is_directory=True)
    with pytest.raises(AttachmentError, match="is missing or is a symlink"):
        attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"EVIL", {})])
    _assert_outside_untouched(outside)


def test_symlinked_session_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    (real / "inbox").mkdir(parents=True)
    link = tmp_path / "s"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(AttachmentError, match="session folder unusable"):
        attachments.write_inbox(SessionPaths(link), "m1", [Decoded("a.txt", b"x", {})])
    assert os.listdir(real / "inbox") == []


def test_missing_inbox_is_refused(place):
    paths, _ = place
    paths.inbox.rmdir()
    with pytest.raises(AttachmentError, match="is missing or is a symlink"):
        attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"x", {})])
    assert not paths.inbox.exists()


def test_existing_message_folder_is_never_overwritten(place):
    paths, _ = place
    attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"first", {})])
    with pytest.raises(AttachmentError, match="already exists"):
        attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"second", {})])
    assert (paths.inbox / "m1" / "a.txt").read_bytes() == b"first"
    assert sorted(os.listdir(paths.inbox)) == ["m1"]


def test_no_files_writes_nothing(place):
    paths, _ = place
    assert attachments.write_inbox(paths, "m1", []) == []
    assert os.listdir(paths.inbox) == []


def test_failure_midway_leaves_no_staging(place, monkeypatch):
    paths, _ = place
    real_fdopen = os.fdopen
    calls = []

    def flaky_fdopen(fd, *a, **kw):
        calls.append(fd)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *a, **kw)

    monkeypatch.setattr(attachments.os, "fdopen", flaky_fdopen)
    with pytest.raises(AttachmentError) as info:
        attachments.write_inbox(paths, "m1", [Decoded("a", b"1", {}), Decoded("b", b"2", {})])
    assert "No space left on device" in str(info.value) and "'b'" in str(info.value)
    assert os.listdir(paths.inbox) == []


def test_disk_full_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """A real small tmpfs (root; fails under CI without it): the kernel's own ENOSPC, a
    short write part-way through the second file, not a fake."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        root = disk / "sessions" / "g" / "s"
        (root / "inbox").mkdir(parents=True)
        paths = SessionPaths(root)
        free = shutil.disk_usage(disk).free
        with pytest.raises(AttachmentError) as info:
            attachments.write_inbox(paths, "m1", [Decoded("small.txt", b"x" * 10, {}),
                                                  Decoded("huge.bin", b"x" * (1 << 20), {})])
        message = str(info.value)
        assert "\n" not in message and "'huge.bin'" in message and "No space left" in message
        assert os.listdir(paths.inbox) == []
        assert shutil.disk_usage(disk).free == free  # every byte written was given back


def test_a_message_with_an_attachment_on_a_full_disk_leaves_no_row_and_no_files(tmp_path):
    """The whole path (Sessions.write_message) on a real small tmpfs data dir: the
    attachment does not fit, the message is refused in one line, nothing is left."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        reg = Registry(disk / "data" / "orchestrator.db")
        try:
            s = Sessions(disk / "data", reg, max_attachment_bytes=8 << 20)
            row = s.resolve("g", None, None, "agent-shared")
            with pytest.raises(MessageError) as info:
                s.write_message(row, {"text": "see file", "attachments": [
                    {"name": "big.bin", "data": b64(b"x" * (4 << 20))}]})
            assert "No space left" in str(info.value) and "'big.bin'" in str(info.value)
            assert "\n" not in str(info.value)
            _assert_nothing_written(s, row)
            # the disk is not left full: a small message with an attachment goes through
            mid, _ = s.write_message(row, {"text": "small", "attachments": [
                {"name": "a.txt", "data": b64(b"fits")}]})
            assert query(s.paths(row).inbound_db, "SELECT id FROM messages_in") == [(mid,)]
        finally:
            reg.close()


def test_remove_inbox_does_not_follow_a_symlink(place):
    paths, outside = place
    (paths.inbox / "m1").symlink_to(outside, target_is_directory=True)
    attachments.remove_inbox(paths, "m1")
    _assert_outside_untouched(outside)
    attachments.write_inbox(paths, "m2", [Decoded("a", b"x", {})])
    attachments.remove_inbox(paths, "m2")
    assert not (paths.inbox / "m2").exists()


# --- whole messages through Sessions: refused means no row and no files ---------------------

@pytest.fixture
def sess(tmp_path):
    reg = Registry(tmp_path / "data" / "orchestrator.db")
    s = Sessions(tmp_path / "data", reg, max_attachment_bytes=64)
    row = s.resolve("g", None, None, "agent-shared")
    yield s, row, tmp_path
    reg.close()


def _assert_nothing_written(s, row):
    paths = s.paths(row)
    assert query(paths.inbound_db, "SELECT COUNT(*) FROM messages_in") == [(0,)]
    assert os.listdir(paths.inbox) == []


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "hi", "attachments": [{"name": "a", "data": "***"}]}', "not valid base64"),
    ({"text": "hi", "attachments": [{"name": "ok.txt", "data": b64(b"fine")},
                                    {"name": "bad.txt", "data": "%%%"}]}, "'bad.txt' is not valid"),
    ('{"text": "hi", "attachments": [', "not valid JSON"),
    ("not json at all", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"attachments": "x"}, "must be a list"),
    ({"attachments": [{"name": "big", "data": b64(b"x" * 65)}]},
     "'big' is larger than the 64-byte limit ([sessions] max_attachment_bytes)"),
    ({"attachments": [{"name": "ok", "data": b64(b"1")}, {"name": "big", "data": b64(b"x" * 99)}]},
     "larger than the 64-byte limit"),
])
def test_refused_message_leaves_no_row_and_no_files(sess, content, fragment):
    s, row, _ = sess
    with pytest.raises(MessageError) as info:
        s.write_message(row, content)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    _assert_nothing_written(s, row)


def test_symlinked_inbox_refuses_the_whole_message(sess):
    s, row, tmp_path = sess
    outside = tmp_path / "outside"
    outside.mkdir()
    paths = s.paths(row)
    paths.inbox.rmdir()
    paths.inbox.symlink_to(outside, target_is_directory=True)
    with pytest.raises(MessageError, match="symlink"):
        s.write_message(row, {"attachments": [{"name": "a", "data": b64(b"x")}]})
    assert os.listdir(outside) == []
    assert query(paths.inbound_db, "SELECT COUNT(*) FROM messages_in") == [(0,)]


def test_failed_row_insert_removes_the_files(sess):
    s, row, _ = sess
    s.write_message(row, {"text": "first"}, message_id="m1")  # no attachments: no inbox dir
    with pytest.raises(MessageError, match="already exists"):
        s.write_message(row, {"attachments": [{"name": "a", "data": b64(b"x")}]},
                        message_id="m1")  # duplicate id: the row insert fails
    assert os.listdir(s.paths(row).inbox) == []
    assert query(s.paths(row).inbound_db, "SELECT id FROM messages_in") == [("m1",)]


def test_accepted_message_stores_paths_not_base64(sess):
    s, row, _ = sess
    mid, seq = s.write_message(row, {"text": "see files", "attachments": [
        {"name": "../../a.txt", "data": b64(b"AAA"), "mime": "text/plain"},
        {"name": "a.txt", "data": b64(b"BB")}]}, message_id="m1")
    assert (mid, seq) == ("m1", 2)
    (content,) = query(s.paths(row).inbound_db, "SELECT content FROM messages_in")[0]
    stored = json.loads(content)
    assert stored == {"text": "see files", "attachments": [
        {"name": "a.txt", "path": "inbox/m1/a.txt", "localPath": "inbox/m1/a.txt", "size": 3,
         "mime": "text/plain"},
        {"name": "a-1.txt", "path": "inbox/m1/a-1.txt", "localPath": "inbox/m1/a-1.txt",
         "size": 2}]}
    assert (s.paths(row).root / "inbox/m1/a.txt").read_bytes() == b"AAA"
    assert (s.paths(row).root / "inbox/m1/a-1.txt").read_bytes() == b"BB"


def test_duplicate_names_reaching_write_inbox_are_refused_not_overwritten(place):
    """decode() makes names unique; write_inbox still never truncates an existing file."""
    paths, _ = place
    with pytest.raises(AttachmentError, match="'a.txt'"):
        attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"one", {}),
                                              Decoded("a.txt", b"two", {})])
    assert os.listdir(paths.inbox) == []


def test_symlink_planted_in_staging_by_a_racer_is_not_followed(place, monkeypatch):
    """An agent racing the host plants a symlink in the staging folder right after it
    is created: O_EXCL | O_NOFOLLOW refuse to write through it."""
    paths, outside = place
    real_mkdir = os.mkdir

    def mkdir_then_plant(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        (paths.inbox / path / "keep.txt").symlink_to(outside / "keep.txt")

    monkeypatch.setattr(attachments.os, "mkdir", mkdir_then_plant)
    with pytest.raises(AttachmentError, match="'keep.txt'"):
        attachments.write_inbox(paths, "m1", [Decoded("keep.txt", b"EVIL", {})])
    monkeypatch.undo()
    _assert_outside_untouched(outside)
    assert os.listdir(paths.inbox) == []  # staging (and the planted link) removed


def test_preplaced_staging_folder_is_refused_and_cleaned(place, monkeypatch):
    """A guessed staging name that already exists: refused, nothing written outside."""
    paths, outside = place

    class FixedUUID:
        hex = "deadbeef" * 4

    monkeypatch.setattr(attachments.uuid, "uuid4", lambda: FixedUUID())
    staging = paths.inbox / ".tmp-m1-deadbeef"
    staging.mkdir()
    (staging / "keep.txt").symlink_to(outside / "keep.txt")
    with pytest.raises(AttachmentError):
        attachments.write_inbox(paths, "m1", [Decoded("keep.txt", b"EVIL", {})])
    _assert_outside_untouched(outside)
    assert not (paths.inbox / "m1").exists()


def test_a_sender_cannot_choose_localpath(sess):
    """``localPath`` (NanoClaw's name for ``path``) is the host's, like ``path``: a value
    in the sent attachment is replaced, never passed on to the agent."""
    s, row, _ = sess
    s.write_message(row, {"attachments": [
        {"name": "x.txt", "data": b64(b"x"), "localPath": "../../etc/passwd",
         "path": "/etc/shadow"}]}, message_id="m2")
    (content,) = query(s.paths(row).inbound_db, "SELECT content FROM messages_in")[0]
    (entry,) = json.loads(content)["attachments"]
    assert (entry["path"], entry["localPath"]) == ("inbox/m2/x.txt", "inbox/m2/x.txt")


@pytest.mark.parametrize("setgid", [False, True])
def test_attachments_are_for_their_agent_only_whatever_the_umask(place, umask_022, setgid):
    """0640 files in a 0750 folder (no access for others), and an inbox's setgid bit
    (the agent's gid, with a uid per session) carries over to the message folder."""
    paths, _ = place
    if setgid:
        os.chmod(paths.inbox, 0o2750)
    attachments.write_inbox(paths, "m1", [Decoded("a.txt", b"hi", {})])
    folder = paths.inbox / "m1"
    assert stat.S_IMODE(folder.stat().st_mode) == (0o2750 if setgid else 0o750)
    assert stat.S_IMODE((folder / "a.txt").stat().st_mode) == 0o640
