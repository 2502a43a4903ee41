"""The other shards as this one sees them: who they are, whether they are up, and
the one HTTP client every shard-to-shard call goes through (issue 23).

- **Membership** is behind a small protocol (``Membership``: ``members()`` and a
  change callback): ``StaticMembers`` from ``[cluster] members`` (reloaded on
  SIGHUP: members appended, URLs changed), or the Kubernetes
  one (``runtime.kubernetes.members``: the orchestrator Pods, list-then-watch).
- **Liveness** of a member is the outcome of the last contact with it — a peer call
  or the periodic ``GET /readyz`` probe (``[cluster] probe_interval``), each bounded
  by ``[cluster] peer_timeout`` — through the pure rule ``rules.placement.is_down``.
  This shard is never down to itself.
- **Authentication**: every call carries ``X-Orchestrator-Forwarded-By`` (this
  shard's id: the receiver never forwards it again) and
  ``X-Orchestrator-Peer-Auth`` (the cluster secret, compared in constant time by
  the receiver). The client's own ``Authorization`` never leaves this shard.
- Questions ("do you hold this conversation / session?") go to every live member at
  once; a member that does not answer in time is marked down, never waited for
  longer, so one slow shard costs a question at most ``peer_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import time
from typing import Any, Callable, Protocol

import httpx
from loguru import logger

from orchestrator.config.cluster import Member, reload_problem
from orchestrator.rules.placement import is_down

FORWARDED_BY = "x-orchestrator-forwarded-by"
PEER_AUTH = "x-orchestrator-peer-auth"
HOLDS_PATH = "/cluster/v1/holds"
HAS_SESSION_PATH = "/cluster/v1/has-session"
CACHE_MAX = 100_000


class Membership(Protocol):
    """Who the shards are. ``on_change(callback)``: called after the set changed."""

    def members(self) -> list[Member]: ...

    def on_change(self, callback: Callable[[], None]) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticMembers:
    """``[cluster] members``. With ``reread`` (the composition root's: the config file
    read again, environment overrides included), SIGHUP reloads the list: appended
    members and changed URLs are taken (``config.cluster.reload_problem``), anything
    else is refused with one log line and the old list kept."""

    def __init__(self, members: list[Member],
                 reread: Callable[[], list[Member]] | None = None, self_id: str = "") -> None:
        self._members = list(members)
        self._reread = reread
        self._self_id = self_id
        self._callbacks: list[Callable[[], None]] = []
        self._hooked = False

    def members(self) -> list[Member]:
        return list(self._members)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        if self._reread is not None and hasattr(signal, "SIGHUP"):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
            self._hooked = True

    async def close(self) -> None:
        if self._hooked:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hooked = False

    def reload(self) -> bool:
        """Read the list again; True if it changed."""
        if self._reread is None:
            return False
        try:
            new = self._reread()
        except Exception as exc:  # noqa: BLE001 - a bad file must not end the shard
            logger.error("SIGHUP: [cluster] members not reloaded: {}; the old list stays", exc)
            return False
        problem = reload_problem(self._members, new, self._self_id)
        if problem is not None:
            logger.error("SIGHUP: [cluster] members not reloaded: {}; the old list stays "
                         "(fix the config file and send SIGHUP again)", problem)
            return False
        if new == self._members:
            logger.info("SIGHUP: [cluster] members unchanged")
            return False
        self._members = list(new)
        logger.info("SIGHUP: cluster members now {}",
                    ", ".join(f"{m.id}={m.url}" for m in new))
        for callback in self._callbacks:
            callback()
        return True


class Peers:
    """Membership, liveness and the client of shard ``self_id``."""

    def __init__(self, self_id: str, membership: Membership, secret: str, *,
                 timeout: float, probe_interval: float, retry_after: int,
                 forward_timeout: float = 70.0, drain: tuple[str, ...] = ()) -> None:
        self.self_id = self_id
        self.drain = frozenset(drain)  # members that take no new conversation
        self.membership = membership
        self.secret = secret
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.retry_after = retry_after
        self.client = httpx.AsyncClient()  # replaced in start(): made on the running loop
        self.forward_timeout = httpx.Timeout(timeout, read=forward_timeout)
        self._seen: dict[str, list[float | None]] = {}  # id -> [last_ok, last_fail]
        self._was_down: set[str] = set()
        self.session_cache: dict[str, str] = {}  # session id -> shard id
        # conversation key -> the shard holding it (conversations never move, so an
        # entry stays true; a forward to a shard that is down is a 503 either way)
        self.conversation_cache: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()

    # --- who and whether ---------------------------------------------------------------

    def members(self) -> list[Member]:
        return self.membership.members()

    def member(self, ident: str) -> Member | None:
        return next((m for m in self.members() if m.id == ident), None)

    def others(self) -> list[Member]:
        return [m for m in self.members() if m.id != self.self_id]

    def is_down(self, ident: str) -> bool:
        if ident == self.self_id:
            return False
        last_ok, last_fail = self._seen.get(ident, [None, None])
        return is_down(last_ok, last_fail)

    def failed_last(self, ident: str) -> bool:
        """Whether the last contact with ``ident`` failed (a member never contacted yet
        has not failed: it is tried)."""
        last_ok, last_fail = self._seen.get(ident, [None, None])
        return last_fail is not None and is_down(last_ok, last_fail)

    def down(self) -> set[str]:
        return {m.id for m in self.others() if self.is_down(m.id)}

    def note(self, ident: str, ok: bool, why: str = "") -> None:
        entry = self._seen.setdefault(ident, [None, None])
        entry[0 if ok else 1] = time.monotonic()
        if ok and ident in self._was_down:
            self._was_down.discard(ident)
            logger.info("shard {} is reachable again", ident)
        elif not ok and ident not in self._was_down:
            self._was_down.add(ident)
            logger.warning("shard {} is unreachable ({}); its conversations answer 503 until "
                           "it is back", ident, why or "no answer")

    def headers(self) -> dict[str, str]:
        return {FORWARDED_BY: self.self_id, PEER_AUTH: self.secret}

    def peer_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.secret.encode())

    # --- probing -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.aclose()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout), trust_env=False,
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=100))
        self.membership.on_change(self._changed)
        await self.membership.start()
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_loop(), name="shard-probe")

    def _changed(self) -> None:
        """A new member is probed now, not at the next round (until then it counts as
        down: never reached)."""
        task = asyncio.get_running_loop().create_task(self.probe_all(), name="shard-probe-new")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def close(self) -> None:
        for task in [*self._probes, *([self._task] if self._task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.membership.close()
        await self.client.aclose()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe_all()
            except Exception as exc:  # noqa: BLE001 - a probe round never ends the loop
                logger.opt(exception=exc).warning("shard probe round failed: {}", exc)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(m) for m in self.others()))

    async def probe(self, member: Member) -> bool:
        try:
            resp = await self.client.get(f"{member.url}/readyz", headers=self.headers())
        except httpx.HTTPError as exc:
            self.note(member.id, False, f"GET /readyz: {type(exc).__name__}")
            return False
        ok = resp.status_code == 200
        self.note(member.id, ok, f"GET /readyz answered {resp.status_code}")
        return ok

    # --- questions ---------------------------------------------------------------------

    async def _ask(self, member: Member, path: str, params: dict[str, str]) -> bool | None:
        """True/False: the member's answer; None: no answer in time (marked down)."""
        try:
            resp = await self.client.get(f"{member.url}{path}", params=params,
                                         headers=self.headers())
        except httpx.HTTPError as exc:
            self.note(member.id, False, f"GET {path}: {type(exc).__name__}")
            return None
        if resp.status_code != 200:
            self.note(member.id, False, f"GET {path} answered {resp.status_code}")
            return None
        self.note(member.id, True)
        return bool(resp.json().get("holds"))

    async def find(self, path: str, params: dict[str, str]) -> tuple[str | None, set[str]]:
        """Ask every other member not known down at once: (the one that holds it,
        the members that could not be asked or did not answer)."""
        others = self.others()
        live = [m for m in others if not self.is_down(m.id)]
        answers = await asyncio.gather(*(self._ask(m, path, params) for m in live))
        holder = next((m.id for m, a in zip(live, answers, strict=True) if a), None)
        unknown = {m.id for m in others if m not in live}
        unknown |= {m.id for m, a in zip(live, answers, strict=True) if a is None}
        return holder, unknown

    async def find_conversation(self, parts: dict[str, Any]) -> tuple[str | None, set[str]]:
        return await self.find(HOLDS_PATH, self._params(parts))

    async def ask_conversation(self, ident: str, parts: dict[str, Any]) -> bool | None:
        """Ask one member (even one thought down: its answer revives it)."""
        member = self.member(ident)
        if member is None:
            return None
        return await self._ask(member, HOLDS_PATH, self._params(parts))

    @staticmethod
    def _params(parts: dict[str, Any]) -> dict[str, str]:
        return {k: v for k, v in parts.items() if v is not None}

    def remember(self, cache: dict[str, str], key: str, shard: str) -> None:
        if len(cache) >= CACHE_MAX:
            cache.pop(next(iter(cache)))  # the oldest entry
        cache[key] = shard

    async def find_session(self, session_id: str) -> tuple[str | None, set[str]]:
        cached = self.session_cache.get(session_id)
        if cached is not None and self.member(cached) is not None:
            return cached, set()
        holder, unknown = await self.find(HAS_SESSION_PATH, {"id": session_id})
        if holder is not None:
            self.remember(self.session_cache, session_id, holder)
        return holder, unknown
