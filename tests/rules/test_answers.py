"""answers: which acked messages still wait for a reply, as tables of reads.

Each case is a sequence of reads of outbound.db as the host would see them:
``(claims, completed {id: ack second}, replies [(in_reply_to, reply second)])``,
times in seconds after ``T0``. The expected value is what still waits afterwards.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.rules import answers
from orchestrator.rules.answers import Answers, Reply

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
WAIT = 600.0


def at(s: float | None) -> datetime | None:
    return None if s is None else T0 + timedelta(seconds=s)


def run_reads(reads: list[tuple], now: float = 100.0) -> Answers:
    state = Answers()
    for claims, completed, replies in reads:
        if not isinstance(claims, dict):
            claims = {c: at(0) for c in claims}
        state = answers.step(state, now=at(now), answer_wait=WAIT, claims=claims,
                             completed={m: at(s) for m, s in completed.items()},
                             replies=[Reply(irt, at(s)) for irt, s in replies])
    return state


CASES = [
    ("nothing acked: nothing waits", [((), {}, [])], []),
    ("reference agent: claim, then reply and ack in one transaction",
     [(("m1",), {}, []), ((), {"m1": 5}, [("m1", 4.999)])], []),
    ("everything in one read: the reply names it", [((), {"m1": 5}, [("m1", 4.999)])], []),
    ("one read, reply not named but not older than the ack", [((), {"m1": 5}, [(None, 5)])], []),
    ("one read, a reply older than the ack and not naming it answers nothing",
     [((), {"m1": 5}, [(None, 4)])], ["m1"]),
    ("NanoClaw follow-up: acked at once, answered later",
     [(("m1",), {}, []), (("m1",), {"m2": 1}, []), ((), {"m1": 20}, [("m2", 20)])], ["m2"]),
    ("... and its own reply comes next", [
        (("m1",), {}, []), (("m1",), {"m2": 1}, []), ((), {"m1": 20}, [("m2", 20)]),
        ((), {}, [("m2", 40)])], []),
    ("NanoClaw's mock: ten follow-ups, one reply each, in order", [
        (("m1",), {}, []), *[(("m1",), {f"f{i}": i}, []) for i in range(2, 11)],
        ((), {"m1": 20}, [("f10", 20)]), *[((), {}, [("f10", 20 + i)]) for i in range(2, 10)]],
     ["f10"]),
    ("follow-ups pushed together are one prompt: one reply answers them",
     [(("m1",), {}, []), ((), {"m1": 3}, [("m1", 3)]), ((), {"f1": 4, "f2": 4}, []),
      ((), {}, [("f2", 9)])], []),
    ("reply first, ack after (separate transactions): answered when the ack comes",
     [(("m1",), {}, []), (("m1",), {}, [("m1", 2)]), ((), {"m1": 3}, [])], []),
    ("reply first naming nothing: counts for the oldest claim",
     [(("m1", "m2"), {}, []), (("m1", "m2"), {}, [(None, 2)]), (("m2",), {"m1": 3}, []),
      ((), {"m2": 4}, [])], ["m2"]),
    ("a reply after a follow-up's ack in a later read answers it even if it names another",
     [((), {"f": 1}, []), ((), {}, [("zzz", 2)])], []),
    ("claim and follow-ups first seen in one read: the claim came first (its stamp)",
     [({"m1": at(0)}, {"f1": 1, "f2": 1}, []), ((), {"m1": 2}, [("f2", 2)])], ["f1", "f2"]),
    ("... the follow-ups' answers come in one prompt's replies",
     [({"m1": at(0)}, {"f1": 1, "f2": 1}, []), ((), {"m1": 2}, [("f2", 2)]),
      ((), {}, [("f2", 5), ("f2", 5)])], []),
    ("history after a restart: acks older than answer_wait never wait",
     [((), {"old": -700}, [])], []),
    ("an ack stamped in the future counts from when the host saw it",
     [((), {"m": 10_000}, [])], ["m"]),
    # --- boundaries and rows the mutation run asked for ----------------------------------
    ("a claim with no stamp dates from when the host saw it",
     [({"m1": None}, {}, []), ((), {"m1": 5}, [("m1", 5)])], []),
    ("an ack with no stamp dates from when the host saw it", [((), {"m": None}, [])], ["m"]),
    ("history is skipped, not the end: a fresh ack after it still waits",
     [((), {"old": -700, "new": 5}, [])], ["new"]),
    ("reply first, then its ack and a follow-up's in one read: the follow-up waits",
     [(("m1",), {}, []), (("m1",), {}, [("m1", 2)]), ((), {"m1": 3, "f1": 3}, [])], ["f1"]),
    ("two replies naming nothing pay two claims, not the first one twice",
     [(("m1", "m2"), {}, []), (("m1", "m2"), {}, [(None, 2)]), (("m1", "m2"), {}, [(None, 3)]),
      ((), {"m1": 4, "m2": 4}, [])], []),
    ("a reply paying a claim does not end the read: the next reply answers a group",
     [((), {"f": 1}, []), (("m1",), {}, [("m1", 2), (None, 3)])], []),
    ("a reply naming nothing pays the claim seen first, not the smallest id",
     [(("b",), {}, []), (("b", "a"), {}, []), (("b", "a"), {}, [(None, 2)]),
      (("a",), {"b": 3}, []), ((), {"a": 4}, [])], ["a"]),
    ("a paid claim is remembered after it leaves processing, until its ack",
     [(("m1",), {}, []), (("m1",), {}, [("m1", 2)]), ((), {}, []), ((), {"m1": 3}, [])], []),
]


@pytest.mark.parametrize(("case", "reads", "waiting"), CASES, ids=[c[0] for c in CASES])
def test_waiting(case: str, reads: list[tuple], waiting: list[str]) -> None:
    state = run_reads(reads)
    assert answers.awaiting(state, at(100), WAIT) == waiting


def test_answer_due_is_the_last_window_end() -> None:
    state = run_reads([((), {"a": 10}, []), ((), {"b": 30}, [])])
    assert answers.answer_due(state, WAIT) == at(30 + WAIT)
    assert answers.answer_due(Answers(), WAIT) is None


def test_a_group_expires_after_answer_wait_and_is_reported_once() -> None:
    state = run_reads([((), {"a": 10}, [])])
    later = answers.step(state, now=at(10 + WAIT), answer_wait=WAIT, claims={}, completed={},
                         replies=[])
    assert (later.groups, later.expired) == ((), frozenset({"a"}))
    again = answers.step(later, now=at(20 + WAIT), answer_wait=WAIT, claims={}, completed={},
                         replies=[])
    assert again.expired == frozenset()


def test_forget_keeps_nothing_but_the_read_count() -> None:
    state = run_reads([(("c",), {"a": 1}, [])])
    assert state.reads == 1
    assert answers.forget(state) == Answers(reads=1)
    assert run_reads([((), {}, [])] * 3).reads == 3


def test_an_ack_exactly_answer_wait_old_is_history_not_an_expiry() -> None:
    """Skipped on the way in, so it is never reported as given up on."""
    state = run_reads([((), {"old": 100 - WAIT}, [])])
    assert (state.groups, state.expired) == ((), frozenset())


def test_a_waiting_group_is_not_reported_expired() -> None:
    assert run_reads([((), {"a": 10}, [])]).expired == frozenset()


def test_a_group_stops_waiting_exactly_answer_wait_after_its_ack() -> None:
    state = run_reads([((), {"a": 10}, [])])
    assert answers.awaiting(state, at(10 + WAIT - 0.001), WAIT) == ["a"]
    assert answers.awaiting(state, at(10 + WAIT), WAIT) == []


def test_a_paid_claim_is_settled_by_its_ack() -> None:
    """Reply first, ack after: the ack uses the payment up (nothing prepaid is left)."""
    state = run_reads([(("m1",), {}, []), (("m1",), {}, [("m1", 2)])])
    assert state.prepaid == frozenset({"m1"})
    state = run_reads([(("m1",), {}, []), (("m1",), {}, [("m1", 2)]), ((), {"m1": 3}, [])])
    assert (state.prepaid, state.groups) == (frozenset(), ())


def test_memory_is_bounded_for_an_agent_that_never_replies() -> None:
    state = Answers()
    for i in range(answers.MAX_GROUPS + 50):
        state = answers.step(state, now=at(100), answer_wait=WAIT, claims={},
                             completed={f"m{i}": at(i / 100)}, replies=[])
    assert len(state.groups) == answers.MAX_GROUPS
    assert state.first_seen == {}  # no claims: the groups carry their own order


@pytest.mark.parametrize(("content", "expected"), [
    ('{"text":"hi"}', True),
    ('{"type":"ask_question","questionId":"q1","options":[]}', False),
    ("not json", True),
    ('"a string"', True),
])
def test_a_question_is_not_an_answer(content: str, expected: bool) -> None:
    assert answers.is_answer(content) is expected
