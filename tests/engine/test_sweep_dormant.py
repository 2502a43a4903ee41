"""The sweep at scale: dormant sessions swept once per dormant cycle, start-up passes
behind event marks (orchestrator.engine.sweep, .ports.Dirty)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.engine.ports import Dirty
from orchestrator.engine.sweep import dormant_rounds
from orchestrator.engine.tracked import Flag


@pytest.mark.parametrize(("interval", "dormant", "rounds"), [
    (30.0, 600.0, 20), (30.0, 30.0, 1), (30.0, 10.0, 1), (5.0, 600.0, 120), (30.0, 44.0, 1)])
def test_dormant_rounds(interval: float, dormant: float, rounds: int) -> None:
    assert dormant_rounds(interval, dormant) == rounds


def test_an_event_is_served_before_the_start_up_backlog() -> None:
    async def body() -> None:
        dirty = Dirty()
        for sid in ("a", "b", "c"):
            dirty.queue_backlog(sid, Flag.FULL | Flag.FORCE)
        dirty.mark("c", Flag.OUTBOUND)  # a reply while the start-up passes are queued
        dirty.mark("z", Flag.HEARTBEAT)
        order = []
        while dirty.pending():
            order.append(dirty.pop())
        # c keeps its start-up flags (FORCE: it counts as reconciled), and comes first
        assert order == [("c", Flag.FULL | Flag.FORCE | Flag.OUTBOUND),
                         ("z", Flag.HEARTBEAT), ("a", Flag.FULL | Flag.FORCE),
                         ("b", Flag.FULL | Flag.FORCE)]
        dirty.queue_backlog("y", Flag.FULL)
        dirty.mark("x", Flag.TIMER)
        dirty.queue_backlog("x", Flag.FORCE)  # already marked: joins that mark
        assert dirty.pop() == ("x", Flag.TIMER | Flag.FORCE)
        dirty.drop("y")
        assert not dirty.pending()

    asyncio.run(body())


async def test_dormant_sessions_are_swept_on_their_turn_the_others_every_round(
        tmp_path) -> None:
    """A real supervisor over 12 settled sessions and one that is not (its pass failed:
    a folder that is a file): each round sweeps the unsettled one, and every settled
    one exactly once over ``rounds`` rounds."""
    from orchestrator.contract.layout import sessions_root
    from tests.support.e2e import Client, make_config, supervised
    from tests.support.helpers import until

    cfg = make_config(tmp_path, watch={"sweep_interval": 0.2, "dormant_sweep_interval": 0.8})
    client = Client(cfg)
    rows = [client.session("grp", thread=f"t{i}", mode="per-thread") for i in range(12)]
    async with supervised(cfg) as sup:
        await until(lambda: len(sup.book.saved) == 12, timeout=15,
                    message="every session settled and saved")
        broken = rows[0].id  # unsettled from now on: its folder is not a folder any more
        folder = sessions_root(cfg.data_dir) / "grp" / broken
        for p in sorted(folder.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        folder.rmdir()
        folder.write_text("not a folder")
        sup.dirty.mark(broken, Flag.FULL)
        await until(lambda: broken not in sup.book.saved, timeout=15,
                    message="the broken session unsettled")
        rounds = 4
        seen: list[str] = []
        for turn in range(rounds):
            order = sup._sweep_order(turn, rounds)
            assert broken in order
            seen += [sid for sid in order if sid != broken]
        assert sorted(seen) == sorted(row.id for row in rows[1:])


@pytest.mark.parametrize("flags, reading", [
    (Flag.OUTBOUND, True), (Flag.OUTBOUND | Flag.HEARTBEAT, True),
    (Flag.INBOUND, False), (Flag.TIMER, False), (Flag.SWEEP, False),
])
def test_a_mark_that_reads_outbound_is_in_reading_until_its_pass(flags, reading) -> None:
    """``Dirty.reading`` (the watch drops those sessions' outbound.db events): a mark
    with OUTBOUND puts the session in it; its pop (the pass begins), a drop and a
    clear take it out."""
    dirty = Dirty()
    dirty.mark("s", flags)
    assert ("s" in dirty.reading) is reading
    dirty.mark("t", Flag.OUTBOUND)
    assert dirty.pop()[0] == "s" and "s" not in dirty.reading and "t" in dirty.reading
    dirty.drop("t")
    assert dirty.reading == set()
    dirty.mark("u", Flag.OUTBOUND)
    dirty.clear()
    assert dirty.reading == set()
