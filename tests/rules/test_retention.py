"""rules.retention: what the sweep and a removal by hand do with one session (pure)."""

from __future__ import annotations

import pytest

from orchestrator.rules.retention import Action, Facts, by_hand, due, threshold

DAY = 86400.0


def facts(running: bool = False, pending: int = 0, undelivered: int = 0,
          idle: float = 10 * DAY) -> Facts:
    return Facts(running, pending, undelivered, idle)


@pytest.mark.parametrize("archive_after, delete_after, expected", [
    (0, 0, None),
    (DAY, 0, (DAY, Action.ARCHIVE)),
    (0, DAY, (DAY, Action.DELETE)),
    (DAY, 2 * DAY, (DAY, Action.ARCHIVE)),
    (2 * DAY, DAY, (DAY, Action.DELETE)),
    (DAY, DAY, (DAY, Action.ARCHIVE)),  # a tie: the one that can be undone
])
def test_threshold(archive_after, delete_after, expected) -> None:
    assert threshold(archive_after, delete_after) == expected


@pytest.mark.parametrize("f, archive_after, delete_after, expected", [
    (facts(), 0, 0, Action.KEEP),  # retention off
    (facts(), DAY, 0, Action.ARCHIVE),
    (facts(), 0, DAY, Action.DELETE),
    (facts(idle=DAY - 1), DAY, 0, Action.KEEP),  # not inactive long enough
    (facts(idle=DAY), DAY, 0, Action.ARCHIVE),  # exactly at the threshold
    (facts(running=True), DAY, 0, Action.KEEP),  # a running agent: never by the sweep
    (facts(pending=1), DAY, 0, Action.KEEP),  # pending inbound messages
    (facts(undelivered=1), 0, DAY, Action.KEEP),  # a reply not settled
    (facts(pending=2, undelivered=3), DAY, DAY, Action.KEEP),
    (facts(idle=3 * DAY), 2 * DAY, 5 * DAY, Action.ARCHIVE),
    (facts(idle=3 * DAY), 5 * DAY, 2 * DAY, Action.DELETE),
])
def test_due(f, archive_after, delete_after, expected) -> None:
    assert due(f, archive_after, delete_after) is expected


@pytest.mark.parametrize("f, force, stop_first, reason", [
    (facts(), False, None, None),  # nothing in the way
    (facts(idle=0), False, None, None),  # by hand: inactivity does not matter
    (facts(running=True), False, True, "its agent is running"),
    (facts(running=True), True, True, "its agent is running"),  # force never skips the stop
    (facts(pending=1), False, False, "it has 1 pending message;"),
    (facts(pending=2), False, False, "it has 2 pending messages;"),
    (facts(undelivered=1), False, False, "it has 1 undelivered reply;"),
    (facts(pending=1, undelivered=2), False, False,
     "it has 1 pending message and 2 undelivered replies;"),
    (facts(pending=1, undelivered=2), True, None, None),  # forced: dropped
])
def test_by_hand(f, force, stop_first, reason) -> None:
    refusal = by_hand(f, force=force)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.reason.startswith(reason)
        assert refusal.stop_first is stop_first
        assert "\n" not in refusal.reason
