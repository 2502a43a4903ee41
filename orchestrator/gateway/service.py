"""The egress gateway service: listeners per group, tokens, limits, counts.

    Gateway(cfg, data_dir, *, upstream_verify=None)
    await gateway.start()    # the CA, the token book, the Docker network, the listeners
    gateway.admit(group, session_id) -> AgentEgress | None   # at an agent's start
    gateway.revoke(session_id)                               # at its exit
    gateway.keep_only(session_ids)                           # after the runtime's recover
    await gateway.close()

``admit``/``revoke``/``keep_only`` are the engine's ``EgressPort`` (engine/ports.py):
the engine names no gateway, the composition root hands this one in. ``counts``
(group, result) -> n is read by ``/metrics`` at scrape time.

How an agent reaches it: local runtime, ``127.0.0.1:<port>``; Docker, the host side of
an internal network (``network``): a container on it has no route out, only to this
host's addresses — the gateway listens there, on the bridge's gateway address. See
README, Egress gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import httpx
from loguru import logger

from orchestrator.config.groups import MAX_SECRET_BYTES, resolve
from orchestrator.config.model import Config
from orchestrator.config.sections import ConfigError, EgressCredential
from orchestrator.gateway import proxy
from orchestrator.gateway.proxy import Closed, Conn, GroupDoor, header, refuse, text_headers
from orchestrator.gateway.tokens import TokenBook
from orchestrator.rules import egress as rules
from orchestrator.rules.egress import AgentEgress, Refusal

if TYPE_CHECKING:
    from orchestrator.gateway.ca import Authority

MAX_OPEN = 2048  # agent connections open at once, all groups (each is a file descriptor)
MAX_LOGGED = 4096  # refused hosts remembered for the once-an-hour log line


@dataclass
class SessionUse:
    open: int = 0
    times: list[float] = field(default_factory=list)


class EgressRefused(RuntimeError):
    """A group with egress cannot start its agents: the gateway is off or not running."""


def egress_groups(cfg: Config) -> list[str]:
    return sorted(g.name for g in cfg.groups if g.egress)


def network_name(cfg: Config) -> str:
    return cfg.gateway.network or f"orch-{cfg.docker.instance}-egress"


def read_secret(path: str) -> str:
    with open(path, "rb") as fh:
        data = fh.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise OSError(f"larger than {MAX_SECRET_BYTES} bytes")
    text = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    if any(c in text for c in "\r\n\x00"):
        raise OSError("more than one line")
    return text


def upstream_url(scheme: str, host: str, port: int, path: str) -> httpx.URL:
    """The upstream URL from checked parts: the host is the one the allowlist saw
    (``split_hostport``), the path (starting with ``/``) only ever its path and query."""
    raw = path.encode("latin-1")
    return httpx.URL(scheme=scheme, host=host, port=port, raw_path=raw)


class Gateway:
    def __init__(self, cfg: Config, *, upstream_verify: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.kind = cfg.runtime.kind
        self.folder = cfg.data_dir / "gateway"
        self.limits = rules.Limits(cfg.gateway.max_requests_per_minute,
                                   cfg.gateway.max_connections, cfg.gateway.max_body_bytes)
        self.doors = {name: GroupDoor(name, cfg.gateway.port + i, resolve(cfg, name).egress,
                                      resolve(cfg, name).egress_credentials)
                      for i, name in enumerate(egress_groups(cfg))}
        self.counts: dict[tuple[str, str], int] = {}
        self._uses: dict[str, SessionUse] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self._verify = upstream_verify
        self.book: TokenBook | None = None
        self.ca: Authority | None = None
        self.client: httpx.AsyncClient | None = None
        self.network = ""
        self._tasks: set[asyncio.Task] = set()

    @property
    def active(self) -> bool:
        return bool(self.doors) and self.cfg.gateway.enabled

    def verify_context(self) -> ssl.SSLContext:
        if self._verify is not None:
            return self._verify
        ctx = ssl.create_default_context()
        if self.cfg.gateway.upstream_ca_file:
            ctx.load_verify_locations(self.cfg.gateway.upstream_ca_file)
        return ctx

    async def start(self) -> None:
        if self.doors and self.kind == "kubernetes":  # refused before anything listens
            raise ConfigError(f"[groups.{next(iter(self.doors))}] egress: the egress gateway "
                              "serves the local and docker runtimes, not kubernetes yet; "
                              "remove egress or use [runtime] kind = \"docker\"")
        if not self.active:
            if self.doors:
                logger.warning("[gateway] enabled = false: agents of groups with egress ({}) "
                               "will not start", ", ".join(self.doors))
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # (imported here: ``cryptography`` is ~60 ms of every start, a restart's critical
        # path at 100 000 sessions, and only a group with egress needs it)
        from orchestrator.gateway.ca import Authority

        self.ca = await asyncio.to_thread(Authority, self.folder)
        self.book = TokenBook(self.folder / "tokens.json")
        host = self.cfg.gateway.host or "127.0.0.1"
        bridge = None
        if self.kind == "docker":
            from orchestrator.gateway.network import ensure_network

            self.network = network_name(self.cfg)
            bridge = await asyncio.to_thread(ensure_network, self.cfg.docker.base_url,
                                             self.network, self.cfg.docker.instance)
            host = self.cfg.gateway.host or bridge.address
        self.client = httpx.AsyncClient(
            verify=self.verify_context(), trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(connect=15.0, read=600.0, write=60.0, pool=15.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        for door in self.doors.values():
            door.host = host
            door.server = await asyncio.start_server(
                functools.partial(self._connection, door), host, door.port,
                reuse_address=True)
            logger.info("egress gateway for group {} listening on {}:{}", door.group, host,
                        door.port)
        if bridge is not None:  # the host answers the internal network at these ports only
            from orchestrator.gateway.network import confine

            why = await asyncio.to_thread(confine, bridge, [d.port for d in self.doors.values()],
                                          self.cfg.docker.instance)
            if why is not None:
                logger.warning(why)

    async def close(self) -> None:
        for door in self.doors.values():
            if door.server is not None:
                door.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    # --- the engine's port -------------------------------------------------------------

    def admit(self, agent_group: str, session_id: str) -> AgentEgress | None:
        """The token, variables, network and CA of a new agent of ``agent_group``; None
        for a group without egress. Raises ``EgressRefused`` when it has egress but no
        gateway runs (the start fails and is retried like any other)."""
        door = self.doors.get(agent_group)
        if door is None:
            return None
        if not self.active or self.book is None or self.ca is None or door.server is None:
            raise EgressRefused(f"agent group {agent_group!r} has egress but the egress "
                                "gateway is not running ([gateway] enabled)")
        token = self.book.mint(agent_group, session_id)
        ca_file = rules.CA_MOUNT if self.kind == "docker" else str(self.ca.bundle)
        env = rules.agent_env(host=door.host, port=door.port, token=token, ca_file=ca_file,
                              creds=door.creds, egress=door.egress)
        return AgentEgress(env=tuple(sorted(env.items())), network=self.network,
                           ca_file=str(self.ca.bundle))

    def revoke(self, session_id: str) -> None:
        if self.book is not None:
            self.book.revoke(session_id)
        self._uses.pop(session_id, None)

    def keep_only(self, session_ids: set[str]) -> None:
        if self.book is not None:
            self.book.keep_only(session_ids)

    # --- bookkeeping -------------------------------------------------------------------

    def count(self, group: str, result: str) -> None:
        self.counts[(group, result)] = self.counts.get((group, result), 0) + 1

    def _refused_host(self, door: GroupDoor, host: str, port: int) -> Refusal:
        refusal = rules.host_refusal(door.group, host, port)
        key, now = (door.group, f"{host}:{port}"), proxy.now()
        if len(self._logged) >= MAX_LOGGED:  # an agent trying endless names: forget old ones
            self._logged = {k: t for k, t in self._logged.items()
                            if not rules.should_log(t, now)}
            if len(self._logged) >= MAX_LOGGED:
                self._logged.clear()
        if rules.should_log(self._logged.get(key), now):
            self._logged[key] = now
            logger.warning("egress gateway: {} (logged once an hour)", refusal.reason)
        return refusal

    def _auth(self, conn: Conn, token: str | None) -> Refusal | None:
        """Check the token (each request: it may have been revoked meanwhile); bind the
        connection to its session and count it (max_connections) the first time."""
        assert self.book is not None
        state, holder = self.book.check(token)
        refusal = rules.token_verdict(state, holder.group if holder else None,
                                      conn.door.group)
        if refusal is not None or holder is None:
            return refusal
        if conn.session_id is None:
            conn.session_id, conn.token = holder.session_id, token
            use = self._uses.setdefault(holder.session_id, SessionUse())
            use.open += 1
            conn.counted = True
            refusal = rules.limit_verdict(self.limits, open_connections=use.open)
        elif conn.session_id != holder.session_id:
            refusal = Refusal(403, "one connection, one session's token", "other_group")
        return refusal

    def _rate(self, conn: Conn) -> Refusal | None:
        assert conn.session_id is not None
        use = self._uses.setdefault(conn.session_id, SessionUse())
        now = proxy.now()
        use.times = rules.within_minute(use.times, now)
        refusal = rules.limit_verdict(self.limits, recent_requests=len(use.times) + 1)
        if refusal is None:  # refused ones are not counted: the list stays bounded
            use.times.append(now)
        return refusal

    # --- connections -------------------------------------------------------------------

    async def _connection(self, door: GroupDoor, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= MAX_OPEN:  # before any token is seen: a bound on fds
            self.count(door.group, "overloaded")
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = Conn(door)
        try:
            await self._serve(conn, reader, writer)
        except (Closed, OSError, ssl.SSLError, h11.ProtocolError, asyncio.TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - one agent's connection must not end the gateway
            logger.exception("egress gateway: connection of group {} failed", door.group)
        finally:
            if conn.counted and conn.session_id is not None:
                use = self._uses.get(conn.session_id)
                if use is not None:
                    use.open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, conn: Conn, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        h = h11.Connection(h11.SERVER)
        while True:
            ev = await proxy.next_event(h, reader)
            if not isinstance(ev, h11.Request):
                return
            headers = text_headers(ev.headers)
            target = ev.target.decode("latin-1")
            if ev.method == b"CONNECT":
                await self._connect(conn, h, reader, writer, target, headers)
                return
            if not await self._request(conn, h, reader, writer, ev.method.decode("latin-1"),
                                       target, headers):
                return
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _refuse(self, conn: Conn, h: h11.Connection, writer: asyncio.StreamWriter,
                      refusal: Refusal) -> bool:
        self.count(conn.door.group, refusal.result)
        await refuse(h, writer, refusal)
        return False

    async def _connect(self, conn: Conn, h: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, target: str,
                       headers: list[tuple[str, str]]) -> None:
        door = conn.door
        while not isinstance(await proxy.next_event(h, reader), h11.EndOfMessage):
            pass
        refusal = self._auth(conn, rules.basic_token(header(headers, "proxy-authorization")))
        hostport = rules.split_hostport(target, 443)
        if refusal is None and hostport is None:
            refusal = Refusal(400, f"CONNECT target {target[:200]!r} is not HOST:PORT",
                              "bad_request")
        if refusal is None and hostport is not None and not rules.allowed(door.egress,
                                                                          *hostport):
            refusal = self._refused_host(door, *hostport)
        refusal = refusal or self._rate(conn)
        if refusal is not None or hostport is None:
            await self._refuse(conn, h, writer, refusal or Refusal(400, "bad", "bad_request"))
            return
        host, port = hostport
        cred = rules.credential_for(door.creds, host)
        await proxy.send(writer, h.send(h11.Response(status_code=200, headers=[],
                                                     reason=b"Connection established")))
        first, _ = h.trailing_data
        if cred is None:
            self.count(door.group, "tunnel")
            if not await proxy.tunnel(reader, writer, host, port, bytes(first)):
                self.count(door.group, "upstream_error")
            return
        if first:
            return  # the agent spoke before our 200: not TLS we can take over
        await self._intercept(conn, reader, writer, host, port, cred)

    async def _intercept(self, conn: Conn, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, host: str, port: int,
                         cred: EgressCredential) -> None:
        """TLS terminated with our CA's leaf for ``host``; each request inside sent on
        to ``https://host:port`` with the key."""
        assert self.ca is not None
        await writer.start_tls(self.ca.context_for(host))
        inner = h11.Connection(h11.SERVER)
        while True:
            ev = await proxy.next_event(inner, reader)
            if not isinstance(ev, h11.Request):
                return
            path = ev.target.decode("latin-1")
            if not path.startswith("/"):  # "@evil.com/x" would make evil.com the URL's host
                await self._refuse(conn, inner, writer, Refusal(
                    400, "inside a tunnel, a request's target must be a path (/...)",
                    "bad_request"))
                return
            url = upstream_url("https", host, port, path)
            ok = await self._send_on(conn, inner, reader, writer, ev.method.decode("latin-1"),
                                     url, text_headers(ev.headers), cred, checked=True)
            if not ok:
                return
            try:
                inner.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _request(self, conn: Conn, h: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, method: str, target: str,
                       headers: list[tuple[str, str]]) -> bool:
        """A request that is not CONNECT: absolute-form (``HTTP_PROXY``, plain http) or
        origin-form (base-URL mode: ``/<host>/path``)."""
        door = conn.door
        if target.startswith("http://"):
            rest = target[7:]
            hostpart, slash, path = rest.partition("/")
            hostport = rules.split_hostport(hostpart, 80)
            token = rules.basic_token(header(headers, "proxy-authorization"))
            cred, scheme, path = None, "http", "/" + path if slash else "/"
        else:
            split = rules.base_url_target(target)
            hostport = rules.split_hostport(split[0], 443) if split else None
            cred = rules.credential_for(door.creds, hostport[0]) if hostport else None
            token = (rules.header_token(header(headers, cred.header), cred) if cred else None) \
                or rules.basic_token(header(headers, "proxy-authorization"))
            scheme, path = "https", split[1] if split else "/"
        refusal = self._auth(conn, token)
        if refusal is None and hostport is None:
            refusal = Refusal(400, "the path must start with the upstream's host, e.g. "
                                   "/api.anthropic.com/v1/messages", "bad_request")
        if refusal is None and hostport is not None and not rules.allowed(door.egress,
                                                                          *hostport):
            refusal = self._refused_host(door, *hostport)
        if refusal is not None or hostport is None:
            return await self._refuse(conn, h, writer, refusal or Refusal(400, "", "bad_request"))
        url = upstream_url(scheme, hostport[0], hostport[1], path)
        return await self._send_on(conn, h, reader, writer, method, url, headers, cred,
                                   checked=False)

    async def _send_on(self, conn: Conn, h: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, method: str, url: httpx.URL,
                       headers: list[tuple[str, str]], cred: EgressCredential | None, *,
                       checked: bool) -> bool:
        """Limits, the key read now, the request sent on and its answer streamed back.
        ``checked``: inside an intercepted CONNECT, whose token is re-checked here."""
        refusal = self._auth(conn, conn.token) if checked else None
        refusal = refusal or self._rate(conn)
        body = await proxy.read_body(h, reader, writer, self.limits.body_bytes)
        if body is None:
            refusal = refusal or rules.limit_verdict(self.limits,
                                                     body_bytes=self.limits.body_bytes + 1)
        if refusal is not None or body is None:
            return await self._refuse(conn, h, writer, refusal or Refusal(413, "", "too_large"))
        secret = None
        if cred is not None:
            try:
                secret = read_secret(cred.secret_file)
            except (OSError, UnicodeDecodeError) as exc:
                logger.error("egress gateway: [groups.{}] egress_credentials {}: secret_file "
                             "{} unreadable ({})", conn.door.group, cred.host, cred.secret_file,
                             getattr(exc, "strerror", None) or type(exc).__name__)
                return await self._refuse(conn, h, writer, Refusal(
                    502, f"the gateway cannot read the key for {cred.host}", "no_key"))
        out = rules.upstream_headers(headers, cred, secret)
        try:
            status = await proxy.forward(self.client_or_fail(), h, writer, method, url, out,
                                         body)
        except httpx.HTTPError as exc:
            if h.our_state is not h11.SEND_RESPONSE:
                raise Closed("upstream failed mid-answer") from None
            return await self._refuse(conn, h, writer, Refusal(
                502, f"upstream {url.host} failed: {type(exc).__name__}",
                "upstream_error"))
        self.count(conn.door.group, "ok" if status < 400 else f"upstream_{status // 100}xx")
        return h.our_state is h11.DONE and h.their_state is h11.DONE

    def client_or_fail(self) -> httpx.AsyncClient:
        assert self.client is not None
        return self.client
