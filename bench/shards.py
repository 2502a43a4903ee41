"""Three shards on one machine (issue 23): what forwarding costs.

    python -m bench.shards [--sessions 10000] [--conversations 40] [--rounds 200]
        [--out bench/results/shards.json]

Three real ``orchestrator run`` processes with static membership
(``tests.support.shards.ShardSet``: own data dirs and ports, one token; the local
runtime with the reference agent, ``max_agents = 1``). Before they start, each data
dir gets ``--sessions`` idle sessions (``bench.fixture``'s way: registry rows and
byte-copies of one empty folder; no message, so no agent is due).

- ``forward``: ``--conversations`` chats are created through the API; then, for
  ``--rounds`` rounds, one message of a random chat is POSTed to its owner and one to
  a shard that is not (alternating order): p50/p99 of each, and the difference.
- ``list``: ``GET /v1/sessions`` merged from 3 × ``--sessions`` sessions, through one
  shard, against one shard's own list (a peer call: no merge): median of 5.
- ``events``: the merged ``/v1/events`` stream of shard a and the unmerged stream of
  shard b (peer call) read side by side while messages go to b's chats: for every b
  event seen on both, its arrival on a minus its arrival on b (p50/p99).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.fixture import _write_folder
from orchestrator.contract.layout import registry_path, sessions_root
from orchestrator.host.registry import Registry
from orchestrator.host.sessions import create_folder
from tests.support.shards import TOKEN, ShardSet

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PEER = {"x-orchestrator-forwarded-by": "bench", "x-orchestrator-peer-auth": TOKEN}


def fill(data_dir: Path, shard: str, n: int) -> float:
    """``n`` idle sessions with ids unique across shards (``s<shard>-<i>``)."""
    t0 = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(registry_path(data_dir))
    try:
        registry.ensure_agent_group("bench")
        dbs: list[tuple[str, bytes]] = []
        for i in range(n):
            sid = f"s{shard}-{i:06d}"
            registry.get_or_create_session(
                resolution_key=f"bench:{shard}:{sid}", agent_group_id="bench",
                messaging_group_id=None, thread_id=None, new_id=sid)
            if not dbs:
                first = create_folder(data_dir, "bench", sid)
                dbs = [(p.name, p.read_bytes()) for p in (first.inbound_db, first.outbound_db)]
                continue
            _write_folder(str(sessions_root(data_dir) / "bench" / sid), dbs)
    finally:
        registry.close()
    return time.monotonic() - t0


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 50) * 1000, 1), "p99_ms": round(pct(values, 99) * 1000, 1),
            "n": len(values)}


def forward(shards: ShardSet, client: httpx.Client, chats: int, rounds: int) -> dict[str, Any]:
    owner = {}
    for i in range(chats):
        resp = client.post(shards.url("a") + "/v1/messages", headers=AUTH, json={
            "agent_group": "g", "platform_id": f"chat-{i}", "content": {"text": "hi"}})
        resp.raise_for_status()
        owner[i] = resp.headers.get("x-orchestrator-shard", "a")
    direct, forwarded = [], []
    rng = random.Random(23)
    for r in range(rounds):
        i = rng.randrange(chats)
        other = rng.choice([n for n in shards.members if n != owner[i]])
        order = [(owner[i], direct), (other, forwarded)]
        for shard, sink in order if r % 2 else reversed(order):
            began = time.monotonic()
            resp = client.post(shards.url(shard) + "/v1/messages", headers=AUTH, json={
                "agent_group": "g", "platform_id": f"chat-{i}", "content": {"text": "m"}})
            sink.append(time.monotonic() - began)
            resp.raise_for_status()
    return {"to_owner": ms(direct), "to_non_owner": ms(forwarded),
            "overhead_p50_ms": round((pct(forwarded, 50) - pct(direct, 50)) * 1000, 1),
            "overhead_p99_ms": round((pct(forwarded, 99) - pct(direct, 99)) * 1000, 1)}


def listing(shards: ShardSet, client: httpx.Client) -> dict[str, Any]:
    merged, local, count = [], [], 0
    for _ in range(5):
        began = time.monotonic()
        resp = client.get(shards.url("a") + "/v1/sessions", headers=AUTH, timeout=300)
        merged.append(time.monotonic() - began)
        count = len(resp.json())
        began = time.monotonic()
        client.get(shards.url("a") + "/v1/sessions", headers=PEER, timeout=300)
        local.append(time.monotonic() - began)
    return {"sessions": count, "merged_median_s": round(statistics.median(merged), 3),
            "one_shard_median_s": round(statistics.median(local), 3)}


class Stream(threading.Thread):
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.seen: dict[tuple[str, int], float] = {}
        self.open = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url + "/v1/events", headers={
                    **self.headers, "Accept": "text/event-stream"}, timeout=None) as resp:
                self.open.set()
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        if "id" in data:
                            self.seen[(data.get("shard", "b"), data["id"])] = time.monotonic()
        except httpx.HTTPError:
            pass  # the shards stopped at the end of the run


def events(shards: ShardSet, client: httpx.Client, messages: int) -> dict[str, Any]:
    through_a = Stream(shards.url("a"), AUTH)
    at_b = Stream(shards.url("b"), PEER)
    for s in (through_a, at_b):
        s.start()
        s.open.wait(30)
    time.sleep(1.0)  # both subscribed (the merged one's readers connect on their own)
    sent = 0
    for i in range(10_000):
        if sent >= messages:
            break
        resp = client.post(shards.url("b") + "/v1/messages", headers=AUTH, json={
            "agent_group": "g", "platform_id": f"ev-{i}", "content": {"text": "x"}})
        if resp.headers.get("x-orchestrator-shard") in (None, "b") and resp.status_code == 201:
            sent += 1
            time.sleep(0.2)
    time.sleep(3.0)
    delays = [through_a.seen[k] - t for (shard, ident), t in at_b.seen.items()
              if (k := ("b", ident)) in through_a.seen]
    return {"events": len(delays), **(ms(delays) if delays else {})}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shards")
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--messages", type=int, default=30)
    ap.add_argument("--out", default="bench/results/shards.json")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        shards = ShardSet(Path(tmp), ["a", "b", "c"])
        fills = {n: round(fill(shards.data_dir(n), n, args.sessions), 1) for n in shards.members}
        print(f"filled {args.sessions} sessions per shard: {fills} s", flush=True)
        for n in shards.members:
            shards.start(n)
        try:
            shards.wait_up(*shards.members, timeout=600)
            with httpx.Client(timeout=120) as client:
                result = {"sessions_per_shard": args.sessions,
                          "forward": forward(shards, client, args.conversations, args.rounds)}
                print(json.dumps(result["forward"]), flush=True)
                result["list"] = listing(shards, client)
                print(json.dumps(result["list"]), flush=True)
                result["events"] = events(shards, client, args.messages)
                print(json.dumps(result["events"]), flush=True)
        finally:
            shards.stop_all()
    result["load_average"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
