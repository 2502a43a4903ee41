"""``[cluster] members`` read again on SIGHUP (``config.cluster.reload_problem``): only
appended members and changed URLs are taken — placement reads the list as the order
the shards joined, and a removed member's conversations would be placed afresh."""

from __future__ import annotations

import pytest

from orchestrator.config.cluster import Member, reload_problem

A, B, C = Member("a", "http://1:1"), Member("b", "http://2:2"), Member("c", "http://3:3")


@pytest.mark.parametrize("new, problem", [
    ([A, B], None),                                   # unchanged
    ([A, B, C], None),                                # appended
    ([A, Member("b", "http://9:9")], None),           # a URL changed
    ([B, A, C], "start with the current members"),    # reordered
    ([A, C], "start with the current members"),       # b removed
    ([A], "start with the current members"),          # the last one removed
    ([A, B, B], "twice"),
    ([B, C], "this shard (a) is not in the list"),
])
def test_a_reloaded_list_may_only_grow(new, problem) -> None:
    got = reload_problem([A, B], new, "a")
    assert got is None if problem is None else problem in (got or "")
