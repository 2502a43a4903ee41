"""The event log over HTTP: ``GET /v1/events`` as a Server-Sent Events stream (the
stored events after ``Last-Event-ID``, then live ones, a keep-alive comment every
``KEEPALIVE`` s) or, asked for as JSON, one page for a client that polls. A mixin of
``app.Api``; a subscriber that falls behind is dropped and replays on reconnect, so
a slow client never holds the loop or the other subscribers.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orchestrator.api.checks import last_event_id
from orchestrator.api.events import EventStore, Subscription, gap_after

KEEPALIVE = 15.0  # s between two keep-alive comments of an idle stream


class EventRoutes:
    events: EventStore
    closing: asyncio.Event

    async def stream_events(self, request: Request) -> Response:
        after = last_event_id(request)
        accept = request.headers.get("accept", "").lower()
        if "application/json" in accept and "text/event-stream" not in accept:
            return self.events_page(after)
        sub = self.events.subscribe()  # before the replay: nothing falls in between
        return StreamingResponse(self._stream(after, sub, self.events.last_id()),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def _stream(self, after: int, sub: Subscription, live_from: int
                      ) -> AsyncIterator[str]:
        try:
            last = after
            yield "retry: 1000\n\n"
            if after >= 0:
                if gap_after(after, self.events.oldest_id()):
                    yield ('event: gap\ndata: {"reason": "events after your Last-Event-ID '
                           'were pruned; re-read /v1/sessions"}\n\n')
                while True:
                    batch = self.events.since(last)
                    for ev in batch:
                        last = ev.id
                        yield ev.sse()
                    if len(batch) < 1000:
                        break
            else:
                last = live_from
                yield f"id: {last}\nevent: hello\ndata: {{}}\n\n"
            while not self.closing.is_set():
                try:
                    live = await asyncio.wait_for(sub.queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if live is None:
                    return
                if live.id > last:
                    last = live.id
                    yield live.sse()
                if sub.dropped and sub.queue.empty():
                    return  # fell behind: the client reconnects and replays the rest
        finally:
            self.events.unsubscribe(sub)

    def events_page(self, after: int) -> Response:
        """``/v1/events`` asked for as JSON (``Accept: application/json``): the stored
        events after ``after``, at most 1000, for a client that polls instead of
        streaming; ``last_event_id`` is where its next call goes on."""
        if after < 0:  # a new client: nothing yet, and where to go on from
            return JSONResponse({"events": [], "last_event_id": self.events.last_id(),
                                 "gap": False})
        batch = self.events.since(after)
        return JSONResponse({"events": [ev.record() for ev in batch],
                             "last_event_id": batch[-1].id if batch else after,
                             "gap": gap_after(after, self.events.oldest_id())})
