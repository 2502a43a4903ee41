"""``GET /v1/events`` over real HTTP: the ``gap`` event when a client comes back with a
``Last-Event-ID`` older than the oldest kept event, none when it is not, ``hello`` for a
new client, and a reader that falls behind disconnected by the server (then replaying
the rest, with no gap). A real uvicorn inside the supervisor's loop, a real httpx client
over a socket, the real event log (SQLite) — events appended to it directly, so the test
decides exactly which ids exist."""

from __future__ import annotations

from pathlib import Path

import httpx

from orchestrator.api import events as events_mod
from tests.support.api_helpers import SseReader, token_of
from tests.support.e2e import make_config, run, serving
from tests.support.helpers import until


def kinds(reader: SseReader) -> list[str]:
    return [e["event"] for e in reader.events]


def test_gap_only_when_events_after_last_event_id_were_pruned(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def body() -> None:
        async with serving(cfg) as service:
            store = service.api.events
            assert service.api.url is not None
            async with httpx.AsyncClient(base_url=service.api.url, timeout=10, headers={
                    "Authorization": f"Bearer {token_of(cfg)}"}) as client:
                ids = [store.append("probe", {"n": n}).id for n in range(6)]
                store.keep = 3
                store.prune()  # the three oldest are gone
                oldest = store.oldest_id()
                assert oldest == ids[3]

                behind = SseReader(client, last_id=ids[1]).start()
                await until(lambda: behind.ids() == ids[3:], message="replay after the gap")
                assert kinds(behind)[0] == "gap"
                assert "pruned" in behind.events[0]["data"]["reason"]
                assert kinds(behind).count("gap") == 1

                # boundary: the client saw the event just before the oldest kept one, so
                # nothing it has not seen was pruned: no gap
                exact = SseReader(client, last_id=oldest - 1).start()
                await until(lambda: exact.ids() == ids[3:], message="replay without a gap")
                live = store.append("probe", {"n": "live"}).id
                await until(lambda: exact.ids() == ids[3:] + [live], message="live event")
                assert "gap" not in kinds(exact)

                # a new client (no Last-Event-ID): hello with the newest id, then live ones
                fresh = SseReader(client).start()
                await until(lambda: fresh.events, message="hello")
                assert fresh.events[0]["event"] == "hello" and fresh.events[0]["id"] == live
                later = store.append("probe", {"n": "later"}).id
                await until(lambda: fresh.ids() == [later], message="live after hello")
                assert "gap" not in kinds(fresh)
                for reader in (behind, exact, fresh):
                    await reader.stop()

    run(body(), timeout=60)


def test_a_reader_that_falls_behind_is_disconnected_and_replays_the_rest(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(events_mod, "QUEUE_MAX", 3)  # each new subscriber's queue
    cfg = make_config(tmp_path)

    async def body() -> None:
        async with serving(cfg) as service:
            store = service.api.events
            assert service.api.url is not None
            async with httpx.AsyncClient(base_url=service.api.url, timeout=10, headers={
                    "Authorization": f"Bearer {token_of(cfg)}"}) as client:
                slow = SseReader(client).start()
                await until(lambda: kinds(slow) == ["hello"], message="subscribed")
                # ten events in one go, before the stream can take any off its queue:
                # three fit, the rest overflow it
                ids = [store.append("probe", {"n": n}).id for n in range(10)]
                await until(slow.done, message="the server ends the slow reader's stream")
                assert slow.ids() == ids[:3]  # what was queued is sent, then the end
                # the client comes back with its last id: the rest, in order, no gap
                back = SseReader(client, last_id=slow.ids()[-1]).start()
                await until(lambda: back.ids() == ids[3:], message="replay of the rest")
                assert "gap" not in kinds(back)
                assert not back.done()  # a reader that keeps up stays connected
                await back.stop()

    run(body(), timeout=60)
