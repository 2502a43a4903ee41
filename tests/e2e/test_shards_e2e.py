"""Many orchestrators, one service (issue 23), on one machine: real ``orchestrator run``
processes with their own data dirs and ports, static membership, one API token.

One run, in phases (the same conversations throughout; ``SHARDS_CONVERSATIONS``
conversations, 300 by default, each gets 5 messages POSTed to random shards with
Idempotency-Keys):

1. three shards a, b, c: messages 1–2 of every conversation; the sessions spread
   within ±20 % of even;
2. message 3 of every conversation, all shards up: first a and b's conversations,
   POSTed to a or b (the latency to compare with), then c's;
3. shard c SIGKILLed: message 4 of every conversation — a and b's, POSTed to a or b
   as before, are all written, with nothing asked of c's address (a listener there
   that never answers, as a vanished node); c's get ``503`` + ``Retry-After`` naming
   c; c restarted, the refused ones are retried with the same keys and written, and
   message 6 of a and b's chats POSTed as in phase 2: the p99 during the kill within
   20 % of the worse of the two rounds without it (plus a 30 ms floor);
4. a fourth shard d added: a restarted with the new member list, b and c reload it
   on SIGHUP (no restart);
5. shard b SIGKILLed: message 5 of every conversation — exactly b's conversations are
   refused, those among them that now rank d first included (b holds them: they
   are never placed on d); b restarted, the refused ones retried; then new
   conversations, some of which land on d.

Then, from the shards' own files: every conversation in exactly one session on one
shard, 5 messages each (6 for a and b's), none lost, none twice. An event stream read from shard a
(resumed with its composite cursor through every restart, from any live shard) has
seen every event of every shard's ``events.db``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from tests.support.helpers import wait_for
from tests.support.shards import TOKEN, ShardSet

N = int(os.environ.get("SHARDS_CONVERSATIONS", "300"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = 8


def body(i: int, j: int) -> dict[str, Any]:
    return {"agent_group": "g", "platform_id": f"chat-{i}", "content": {"text": f"m{j}"}}


class Sender:
    """POSTs with Idempotency-Keys ``c<i>-m<j>`` to random shards of ``up``."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64))
        self.rng = random.Random(23)

    def post(self, i: int, j: int, up: list[str]) -> tuple[int, dict, dict, float]:
        url = self.shards.url(self.rng.choice(up)) + "/v1/messages"
        began = time.monotonic()
        resp = self.client.post(url, json=body(i, j), headers={**AUTH,
                                                              "Idempotency-Key": f"c{i}-m{j}"})
        return resp.status_code, resp.json(), dict(resp.headers), time.monotonic() - began

    def round(self, pairs: list[tuple[int, int]], up: list[str]
              ) -> dict[tuple[int, int], tuple[int, dict, dict, float]]:
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda p: self.post(*p, up), pairs))
        return dict(zip(pairs, results, strict=True))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


class EventReader(threading.Thread):
    """Reads the merged ``/v1/events`` of one shard; on any break it reconnects to a
    live shard with the last composite id it saw (``Last-Event-ID``)."""

    def __init__(self, shards: ShardSet, up: list[str]) -> None:
        super().__init__(daemon=True)
        self.shards = shards
        self.up = up  # the test keeps it current
        self.seen: dict[str, set[int]] = {}
        self.cursor: str | None = None
        self.reconnects = 0
        self.stopping = threading.Event()
        self.first = threading.Event()

    def run(self) -> None:
        target = "a"
        while not self.stopping.is_set():
            headers = {**AUTH, "Accept": "text/event-stream"}
            if self.cursor:
                headers["Last-Event-ID"] = self.cursor
            try:
                with httpx.stream("GET", self.shards.url(target) + "/v1/events",
                                  headers=headers, timeout=httpx.Timeout(5, read=20)) as resp:
                    self.first.set()
                    self._read(resp)
            except httpx.HTTPError:
                pass
            self.reconnects += 1
            time.sleep(0.2)
            target = random.choice(self.up)

    def _read(self, resp: httpx.Response) -> None:
        ident = None
        for line in resp.iter_lines():
            if self.stopping.is_set():
                return
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if "id" in data and "shard" in data:
                    self.seen.setdefault(data["shard"], set()).add(data["id"])
                if ident:
                    self.cursor = ident
                ident = None


@pytest.mark.timeout(900)  # ~75 s at 300 conversations on the shared 2-core machine
def test_shards_place_forward_survive_a_kill_and_a_new_member(tmp_path: Path) -> None:
    shards = ShardSet(tmp_path, ["a", "b", "c"])
    up = ["a", "b", "c"]
    reader = EventReader(shards, up)
    sender = Sender(shards)
    try:
        for name in up:
            shards.start(name)
        shards.wait_up(*up)
        reader.start()
        assert reader.first.wait(30)

        # --- phase 1: three shards --------------------------------------------------
        began = time.monotonic()
        first = sender.round([(i, j) for j in (1, 2) for i in range(N)], up)
        took = time.monotonic() - began
        assert Counter(r[0] for r in first.values()) == {201: 2 * N}, \
            Counter(r[0] for r in first.values())
        owner = {}
        for name in up:
            for platform, _ in shards.sessions(name).values():
                owner[int(platform.split("-")[1])] = name
        spread = Counter(owner.values())
        assert len(owner) == N
        tolerance = 0.2 if N >= 300 else 0.6  # ±20 % is the claim at 300; a quick run is noisy
        for n in spread.values():
            assert abs(n - N / 3) <= tolerance * N / 3, spread

        # --- phase 2: message 3 with every shard up (the latency to compare with) -----
        # The latency rounds carry the same load on a and b with and without c: the
        # chats a and b hold, POSTed to a or b. (A round of every chat would not: with c
        # dead its third answer 503 at once, so the same eight senders press a and b
        # harder than with c up, taking a third of the requests — a load shift the
        # kill does not cause in a service whose clients keep their own pace.)
        kept = [i for i in range(N) if owner[i] != "c"]
        on_c = [i for i in range(N) if owner[i] == "c"]
        steady = sender.round([(i, 3) for i in kept], ["a", "b"])
        steady.update(sender.round([(i, 3) for i in on_c], up))
        assert Counter(r[0] for r in steady.values()) == {201: N}
        baseline = p99([steady[(i, 3)][3] for i in kept])

        # --- phase 3: c killed: message 4 ---------------------------------------------
        shards.kill("c")
        up.remove("c")
        # c's address now takes connections and never answers, as a node that is gone
        # (its packets dropped) does: anything that waited on c would wait peer_timeout
        hole = BlackHole(shards.ports["c"])
        wait_for(lambda: all(_down_seen(shards, n, "c") for n in up), timeout=10,
                 message="a and b see c down")
        hole.requests.clear()
        second = sender.round([(i, 4) for i in kept], up)
        others = list(second.values())
        # what a and b asked c meanwhile: their probes and the event stream, nothing
        # for a request
        assert {r for r in hole.requests if not r.startswith(("GET /readyz ",
                                                              "GET /v1/events"))} == set()
        second.update(sender.round([(i, 4) for i in on_c], up))
        hole.close()
        refused = sorted(i for (i, _), r in second.items() if r[0] == 503)
        for i in refused:
            status, data, headers, _ = second[(i, 4)]
            assert headers.get("retry-after") == "1", headers
            assert data["shard"] == "c" and "shard c" in data["error"], data
        assert refused == on_c
        assert all(r[0] == 201 for r in others)
        during = p99([r[3] for r in others])
        shards.start("c")
        shards.wait_up("c")
        up.append("c")
        wait_for(lambda: not any(_down_seen(shards, n, "c") for n in ("a", "b")), timeout=10,
                 message="a and b see c back")
        retried = sender.round([(i, 4) for i in refused], up)
        assert all(r[0] == 201 for r in retried.values()), Counter(
            r[0] for r in retried.values())
        # the same round once more with c back (message 6 of a and b's chats): the
        # rounds without the kill before and after it bracket the one during it in
        # time, so the shared machine's drift (other jobs starting and stopping) is
        # in the comparison's baseline rather than blamed on the kill
        after = sender.round([(i, 6) for i in kept], ["a", "b"])
        assert Counter(r[0] for r in after.values()) == {201: len(kept)}
        p99s = [baseline, during, p99([r[3] for r in after.values()])]
        baseline = max(p99s[0], p99s[2])
        medians = [statistics.median(steady[(i, 3)][3] for i in kept),
                   statistics.median(r[3] for r in others),
                   statistics.median(r[3] for r in after.values())]
        # others unaffected: their p99 within 20 % of the rounds without the kill.
        # Nothing of theirs waits on c (checked above: their holder is cached or asked
        # of live shards only, and a known-down shard is never dialled,
        # api.shard_router.forward); 30 ms of floor for the scheduling noise of a
        # shared 2-core machine.
        assert during <= 1.2 * baseline + 0.03, (during, baseline, medians)

        # --- phase 4: a fourth shard -------------------------------------------------
        shards.set_members(["a", "b", "c", "d"])
        shards.start("d")
        shards.wait_up("d")
        up.append("d")
        # a restarted with the new list; b and c reload it on SIGHUP, serving on
        up.remove("a")
        shards.stop("a")
        shards.start("a")
        shards.wait_up("a")
        up.append("a")
        for name in ("b", "c"):
            shards.procs[name].proc.send_signal(signal.SIGHUP)
            wait_for(lambda n=name: "SIGHUP: cluster members now a=" in shards.procs[n].text(),
                     timeout=10, message=f"{name} reloaded the members")
        wait_for(lambda: not any(_down_seen(shards, n, "d") for n in ("a", "b", "c")),
                 timeout=10, message="every shard reaches d")
        # --- phase 5: b killed with d a member: message 5 ----------------------------
        # conversations b holds that now rank d first must still wait for b, never
        # be placed on d
        moved_to_d = [i for i, o in owner.items() if o == "b" and _ranks_first(i, "d")]
        shards.kill("b")
        up.remove("b")
        wait_for(lambda: all(_down_seen(shards, n, "b") for n in up), timeout=10,
                 message="the others see b down")
        fifth = sender.round([(i, 5) for i in range(N)], up)
        refused_b = {i for (i, _), r in fifth.items() if r[0] == 503}
        assert refused_b == {i for i, o in owner.items() if o == "b"}
        assert set(moved_to_d) <= refused_b
        assert all(r[0] == 201 for (i, _), r in fifth.items() if i not in refused_b)
        shards.start("b")
        shards.wait_up("b")
        up.append("b")
        retried = sender.round([(i, 5) for i in sorted(refused_b)], up)
        assert all(r[0] == 201 for r in retried.values())

        fresh = list(range(N, N + N // 3))
        third = sender.round([(i, j) for j in range(1, 6) for i in fresh], up)
        assert Counter(r[0] for r in third.values()) == {201: len(third)}
        replayed = sender.round([(i, 1) for i in range(0, N, 7)], up)  # same keys again
        assert all(r[0] == 201 for r in replayed.values())

        # --- the files: one session per conversation, every message once ------------
        where: dict[int, list[tuple[str, str]]] = {}
        messages: dict[int, list[str]] = {}
        for name in shards.members:
            for sid, (platform, ids) in shards.sessions(name).items():
                i = int(platform.split("-")[1])
                where.setdefault(i, []).append((name, sid))
                messages.setdefault(i, []).extend(ids)
        split = {i: w for i, w in where.items() if len(w) != 1}
        assert split == {}, f"conversations split over sessions: {list(split.items())[:5]}"
        assert sorted(where) == list(range(N + len(fresh)))
        count = {i: 6 if i in kept else 5 for i in messages}  # message 6: a and b's
        wrong = {i: len(m) for i, m in messages.items()
                 if len(m) != count[i] or len(set(m)) != count[i]}
        assert wrong == {}, f"lost or duplicated messages: {list(wrong.items())[:5]}"
        new_on_d = sum(1 for i in fresh if where[i][0][0] == "d")
        assert 0 < new_on_d <= 0.5 * len(fresh), new_on_d  # about a quarter
        moved = [i for i in range(N) if where[i][0][0] != owner[i]]
        assert moved == []

        # --- the event stream across the kill and the restarts ----------------------
        def caught_up() -> bool:
            return all(set(shards.event_ids(n)) <= reader.seen.get(n, set())
                       for n in shards.members)

        wait_for(caught_up, timeout=60, interval=0.5, message="the stream saw every event: "
                 + ", ".join(f"{n}: {len(set(shards.event_ids(n)) - reader.seen.get(n, set()))}"
                             " missing" for n in shards.members))
        logger.info("shards e2e: N={} phase 1 {:.1f}s ({} POSTs), p99 {:.3f}s, p99 during the "
                    "kill {:.3f}s, refused {}, stream reconnects {}, new on d {}/{}", N, took,
                    2 * N, baseline, during, len(refused), reader.reconnects, new_on_d,
                    len(fresh))
        print(f"\nN={N} phase1={took:.1f}s p99 before/during/after the kill "
              f"{'/'.join(f'{x * 1000:.0f}' for x in p99s)}ms, p50 "
              f"{'/'.join(f'{x * 1000:.0f}' for x in medians)}ms refused={len(refused)} "
              f"spread={dict(spread)} new_on_d={new_on_d}/{len(fresh)} "
              f"stream_reconnects={reader.reconnects}")
    finally:
        reader.stopping.set()
        sender.client.close()
        shards.stop_all()


class BlackHole:
    """A listener on a dead shard's port that accepts and never answers; it records
    each connection's request line."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                first = conn.recv(4096).split(b"\r\n", 1)[0]
            except OSError:
                first = b""
            self.requests.append(first.decode(errors="replace"))
            self.conns.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in [*self.conns, self.sock]:
            conn.close()


def _ranks_first(i: int, shard: str) -> bool:
    from orchestrator.api.shard_router import conversation_of, key_of
    from orchestrator.rules.placement import ranking

    parts = conversation_of(json.dumps(body(i, 0)).encode(), "shared")
    assert parts is not None
    return ranking(key_of(parts), ["a", "b", "c", "d"])[0] == shard


def _down_seen(shards: ShardSet, name: str, peer: str) -> bool:
    """Whether shard ``name`` has logged ``peer`` as unreachable more recently than
    reachable (its log is the only outside view of its liveness table)."""
    text = shards.procs[name].text()
    return text.rfind(f"shard {peer} is unreachable") > text.rfind(f"shard {peer} is reachable")
