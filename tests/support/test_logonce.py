"""LogOnce: a trouble is said once per distinct message, and its end is noticed once."""

from __future__ import annotations

import pytest

from orchestrator.support.logonce import LogOnce


@pytest.mark.parametrize("steps, said", [
    # (what happens, key, message) -> whether the caller logs
    ([("say", "a", "disk full")], [True]),
    ([("say", "a", "disk full"), ("say", "a", "disk full")], [True, False]),
    ([("say", "a", "disk full"), ("say", "a", "read-only")], [True, True]),  # a new trouble
    ([("say", "a", "x"), ("say", "b", "x")], [True, True]),  # keys are apart
    ([("say", "a", "x"), ("clear", "a", None), ("say", "a", "x")], [True, "x", True]),
    ([("clear", "a", None)], [None]),  # nothing said: nothing cleared
    ([("say", ("image", "i:1"), "missing"), ("clear", ("image", "i:2"), None),
      ("say", ("image", "i:1"), "missing")], [True, None, False]),
])
def test_say_and_clear(steps, said) -> None:
    once = LogOnce()
    out = [once.say(key, message) if op == "say" else once.clear(key)
           for op, key, message in steps]
    assert out == said


def test_last_and_membership() -> None:
    once = LogOnce()
    assert once.last("k") is None and "k" not in once
    once.say("k", "first")
    once.say("k", "second")
    assert once.last("k") == "second" and "k" in once
    assert once.clear("k") == "second" and once.last("k") is None and "k" not in once
