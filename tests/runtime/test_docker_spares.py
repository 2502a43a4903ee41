"""The bookkeeping of containers created ahead (runtime/docker_spares.py): pure."""

from __future__ import annotations

import pytest

from orchestrator.runtime.docker.spares import Spares


@pytest.mark.parametrize(("capacity", "puts", "evicted", "left"), [
    (2, [("a", "c1"), ("b", "c2")], [], {"a": "c1", "b": "c2"}),
    (2, [("a", "c1"), ("b", "c2"), ("c", "c3")], ["c1"], {"b": "c2", "c": "c3"}),
    (1, [("a", "c1"), ("a", "c2")], ["c1"], {"a": "c2"}),  # replaced: the old one goes
    (2, [("a", "c1"), ("a", "c1")], [], {"a": "c1"}),  # the same one again: kept
    (0, [("a", "c1")], ["c1"], {}),  # off: whatever is made is removed again
])
def test_put_evicts_the_oldest_beyond_capacity(capacity: int, puts: list, evicted: list,
                                               left: dict) -> None:
    spares = Spares(capacity)
    out = [cid for sid, cid in puts for cid in spares.put(sid, cid)]
    assert out == evicted
    assert {sid: spares.take(sid) for sid in list(left)} == left
    assert len(spares) == 0


def test_take_forget_and_ids() -> None:
    spares = Spares(3)
    spares.put("a", "c1")
    spares.put("b", "c2")
    assert spares.ids() == {"c1", "c2"} and spares.has("a")
    assert spares.forget_missing({"c2"}) == ["a"]
    assert spares.take("a") is None and spares.take("b") == "c2" and spares.take("b") is None
