"""A restart's first watch: built ahead in a thread (watch.head_start), a big group's
session watches added by a child process (watch.bulk_add) with each folder's
``lstat`` taken after its watch. Real inotify, real folders, a real child."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.config.sections import WatchConfig
from orchestrator.watch import start_walk
from orchestrator.watch.bulk_add import Listing, big_group, parse_answer
from orchestrator.watch.folder_watch import MODIFIED, FolderWatch
from orchestrator.watch.head_start import HeadStart
from orchestrator.watch.muted import Muted
from orchestrator.watch.watch_table import watched_folders
from tests.support.helpers import wait_for

SESSIONS = [f"s{i}" for i in range(5)]


@pytest.fixture
def small_child_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 3 sessions or more go to the child (2000 in production)."""
    monkeypatch.setattr(start_walk, "CHILD_FROM", 3)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "sessions"
    for name in SESSIONS:
        (root / "g" / name).mkdir(parents=True)
        (root / "g" / name / "inbound.db").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (root / "g" / "linked").symlink_to(tmp_path / "elsewhere")  # never watched
    (root / "g" / "a-file").write_bytes(b"")
    return root


def _lstat_as_seen(watch: FolderWatch, group: Path, name: str) -> tuple[int, ...]:
    values, index, _ = watch.seen[str(group)]
    return tuple(values[index[name] + 1:index[name] + 6])  # (the lstat fields)


def test_a_big_groups_sessions_are_watched_by_a_child(tmp_path: Path,
                                                      small_child_groups: None) -> None:
    root = _tree(tmp_path)
    group = root / "g"
    with FolderWatch(root, keep_seen=True) as watch:
        assert watched_folders(watch) == sorted(
            [str(root), str(group)] + [str(group / n) for n in SESSIONS])
        assert set(watch.seen[str(group)][1]) == set(SESSIONS)
        st = os.lstat(group / "s2")
        assert _lstat_as_seen(watch, group, "s2") == (
            st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
        values, index, (idents, times) = watch.seen[str(group)]
        at = list(index).index("s2")
        assert (idents[at], times[at]) == (f"{st.st_dev}:{st.st_ino}",
                                           f"{st.st_mtime_ns}:{st.st_ctime_ns}")
        # the child's watches are the parent's: their events arrive here
        (group / "s3" / ".heartbeat").write_bytes(b"")
        got: set = set()

        def heard() -> bool:
            raw = watch.watch(debounce_ms=50, step_ms=5, timeout_ms=50, stop_event=None)
            if isinstance(raw, set):
                got.update(raw)
            return (MODIFIED, str(group / "s3" / ".heartbeat")) in got

        wait_for(heard, message="the heartbeat in a child-watched session")


def test_past_the_budget_the_child_stops_and_the_rest_is_polled(
        tmp_path: Path, small_child_groups: None) -> None:
    root = _tree(tmp_path)
    with FolderWatch(root, limit=4, keep_seen=True) as watch:  # the root, the group, two
        assert watch.counts() == (4, 3)
        assert len(watch.seen[str(root / "g")][1]) == 2


def test_the_lstats_are_kept_only_for_who_takes_them(tmp_path: Path,
                                                     small_child_groups: None) -> None:
    with FolderWatch(_tree(tmp_path)) as watch:  # (~15 MB at 100 000 sessions)
        assert len(watch.sessions) == len(SESSIONS) and watch.seen == {}


def test_a_failed_child_leaves_the_adds_to_the_walk(tmp_path: Path, small_child_groups: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    monkeypatch.setattr(start_walk, "add_in_child", lambda *args: None)
    with FolderWatch(root, keep_seen=True) as watch:
        assert len(watched_folders(watch)) == 2 + len(SESSIONS)
        assert watch.seen == {}


def test_the_head_start_is_taken_once_and_its_lstats_given_once(
        tmp_path: Path, small_child_groups: None) -> None:
    root = _tree(tmp_path)
    head = HeadStart.begin(root, WatchConfig(), (None, None))
    assert head is not None
    muted, retiring = Muted(), {"sess-x"}
    watch = head.take(root, muted, retiring)
    assert watch is not None and watch.muted is muted and watch._mutes is muted
    assert watch.retiring is retiring  # a prune's removals are dropped by this watch too
    try:
        assert head.take(root, muted) is None  # a restarted watch builds its own
        seen = head.seen()
        assert set(seen) == {"g"} and set(seen["g"][1]) == set(SESSIONS)
        assert head.seen() == {}
    finally:
        watch.close()
    head.close()


def test_the_childs_listing_is_given_once_with_the_links(tmp_path: Path,
                                                         small_child_groups: None) -> None:
    """The start-up's look for unregistered folders uses it instead of a listing."""
    root = _tree(tmp_path)
    head = HeadStart.begin(root, WatchConfig(), (None, None))
    assert head is not None
    watch = head.take(root, frozenset())
    assert watch is not None
    try:
        listed = head.listed()
        assert set(listed) == {"g"} and sorted(listed["g"]) == sorted(SESSIONS + ["linked"])
        assert head.listed() == {}
        assert set(head.seen()["g"][1]) == set(SESSIONS)  # (either order)
    finally:
        watch.close()


@pytest.mark.parametrize("nlink, big", [
    (2, False),  # empty
    (2 + 1999, False),
    (2 + 2000, True),
    (1, True),  # not counted (btrfs; ext4 past 65 000 subfolders): the child lists it
])
def test_a_big_group_is_told_by_its_link_count(nlink: int, big: bool) -> None:
    st = os.stat_result((0o40755, 1, 1, nlink, 0, 0, 4096, 0, 0, 0))
    assert big_group(st) is big


def _answer(names: list[bytes], links: list[bytes], values: list[int],
            texts: list[bytes] | None = None) -> bytes:
    import array

    blob = b"\0".join(names + links)
    text = b"\0".join(texts if texts is not None else [b"1:2\x003:4"] * len(names))
    return (array.array("q", (len(names), len(links), len(blob), len(text))).tobytes()
            + blob + array.array("q", values).tobytes() + text)


@pytest.mark.parametrize("code, answer, expect", [
    (0, _answer([b"s1", b"s2"], [b"l"], list(range(14)), [b"1:2\x003:4", b"\0"]),
     (["s1", "s2"], ["l"], 14, ["1:2", ""], ["3:4", ""])),
    (0, _answer([], [], []), ([], [], 0, [], [])),
    (0, _answer([], [b"l"], []), ([], ["l"], 0, [], [])),
    (0, _answer([b"s\xff"], [], list(range(7))),
     (["s\udcff"], [], 7, ["1:2"], ["3:4"])),  # (a name as os.scandir gives it)
    (0, _answer([b"s1"], [], list(range(7)), [b"1:2"]), None),  # one text short
    (0, _answer([b"s1"], [], list(range(6))), None),  # cut short
    (1, _answer([b"s1"], [], list(range(7))), None),  # the child failed
    (0, b"\0" * 10, None),
])
def test_the_childs_answer_is_taken_whole_or_not_at_all(code: int, answer: bytes,
                                                        expect: tuple | None) -> None:
    got = parse_answer(code, answer)
    if expect is None:
        assert got is None
    else:
        assert isinstance(got, Listing)
        assert (got.names, got.links, len(got.values), got.idents, got.times) == expect


def test_a_closed_head_watch_gives_no_lstats(tmp_path: Path, small_child_groups: None) -> None:
    """The watch restarted before the check: its folders were unwatched a while."""
    root = _tree(tmp_path)
    head = HeadStart.begin(root, WatchConfig(), (None, None))
    assert head is not None
    watch = head.take(root, frozenset())
    assert watch is not None
    watch.close()
    assert head.seen() == {}
    assert head.listed() == {}


def test_an_untaken_head_start_is_closed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    head = HeadStart.begin(root, WatchConfig(), (None, None))
    assert head is not None
    head.close()
    assert head.take(root, frozenset()) is None
    assert head._watch is None


@pytest.mark.parametrize("mode, make_root", [("poll", True), ("events", False)])
def test_no_head_start_in_poll_mode_or_without_a_root(tmp_path: Path, mode: str,
                                                      make_root: bool) -> None:
    root = tmp_path / "sessions"
    if make_root:
        root.mkdir()
    assert HeadStart.begin(root, WatchConfig(mode=mode), (None, None)) is None
