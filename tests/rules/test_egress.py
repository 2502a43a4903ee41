"""The egress gateway's pure decisions (orchestrator/rules/egress.py), as tables."""

from __future__ import annotations

import base64

import pytest

from orchestrator.config.sections import EgressCredential
from orchestrator.rules import egress as rules
from orchestrator.rules.egress import Limits, TokenState

ANTHROPIC = EgressCredential(host="api.anthropic.com", header="x-api-key",
                             secret_file="/run/secrets/a", base_url_env="ANTHROPIC_BASE_URL",
                             key_env="ANTHROPIC_API_KEY")
OPENAI = EgressCredential(host="api.openai.com", header="Authorization",
                          secret_file="/run/secrets/o", prefix="Bearer ")


@pytest.mark.parametrize("egress, host, port, expected", [
    (["api.anthropic.com:443"], "api.anthropic.com", 443, True),
    (["api.anthropic.com:443"], "API.Anthropic.COM", 443, True),
    (["api.anthropic.com:443"], "api.anthropic.com.", 443, True),
    (["api.anthropic.com:443"], "api.anthropic.com", 80, False),
    (["api.anthropic.com:443"], "evil.com", 443, False),
    (["api.anthropic.com:443"], "api.anthropic.com.evil.com", 443, False),
    (["api.anthropic.com:443"], "xapi.anthropic.com", 443, False),
    (["*.example.com:443"], "a.example.com", 443, True),
    (["*.example.com:443"], "a.b.example.com", 443, True),
    (["*.example.com:443"], "example.com", 443, False),
    (["*.example.com:443"], "badexample.com", 443, False),
    (["*.example.com:443"], "a.example.com", 8443, False),
    ([], "api.anthropic.com", 443, False),
    (["localhost:8443", "api.anthropic.com:443"], "localhost", 8443, True),
])
def test_allowed(egress, host, port, expected):
    assert rules.allowed(egress, host, port) is expected


def test_host_refusal_names_the_host_and_the_key():
    r = rules.host_refusal("support", "evil.com", 443)
    assert r.status == 403 and r.result == "host_refused"
    assert "evil.com:443" in r.reason and "[groups.support] egress" in r.reason
    assert "\n" not in r.reason


@pytest.mark.parametrize("host, expected", [
    ("api.anthropic.com", ANTHROPIC),
    ("API.ANTHROPIC.COM", ANTHROPIC),
    ("api.openai.com", OPENAI),
    ("example.com", None),
])
def test_credential_for(host, expected):
    assert rules.credential_for([ANTHROPIC, OPENAI], host) == expected


@pytest.mark.parametrize("state, token_group, group, status, result", [
    (TokenState.MISSING, None, "a", 407, "no_token"),
    (TokenState.UNKNOWN, None, "a", 407, "bad_token"),
    (TokenState.REVOKED, None, "a", 407, "revoked_token"),
    (TokenState.VALID, "b", "a", 403, "other_group"),
    (TokenState.VALID, "a", "a", None, None),
])
def test_token_verdict(state, token_group, group, status, result):
    r = rules.token_verdict(state, token_group, group)
    assert (r.status if r else None, r.result if r else None) == (status, result)


LIMITS = Limits(requests_per_minute=10, connections=2, body_bytes=100)


@pytest.mark.parametrize("kwargs, status", [
    ({}, None),
    ({"recent_requests": 10, "open_connections": 2, "body_bytes": 100}, None),
    ({"recent_requests": 11}, 429),
    ({"open_connections": 3}, 429),
    ({"body_bytes": 101}, 413),
])
def test_limit_verdict(kwargs, status):
    r = rules.limit_verdict(LIMITS, **kwargs)
    assert (r.status if r else None) == status
    if r:
        assert "[gateway]" in r.reason


@pytest.mark.parametrize("times, now, kept", [
    ([], 100.0, []),
    ([10.0, 50.0, 99.0], 100.0, [50.0, 99.0]),
    ([40.0], 100.0, []),
])
def test_within_minute(times, now, kept):
    assert rules.within_minute(times, now) == kept


@pytest.mark.parametrize("last, now, expected", [
    (None, 0.0, True),
    (100.0, 200.0, False),
    (100.0, 3699.0, False),
    (100.0, 3700.0, True),
])
def test_should_log_once_an_hour(last, now, expected):
    assert rules.should_log(last, now) is expected


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("", None),
    (_basic("orchestrator:tok"), "tok"),
    (_basic("x:tok:with:colons"), "tok:with:colons"),
    (_basic("orchestrator:"), None),
    (_basic("no-colon"), None),
    ("Bearer tok", None),
    ("Basic !!!notbase64", None),
    ("basic " + base64.b64encode(b"u:t").decode(), "t"),
])
def test_basic_token(value, expected):
    assert rules.basic_token(value) == expected


@pytest.mark.parametrize("value, cred, expected", [
    (None, ANTHROPIC, None),
    ("tok", ANTHROPIC, "tok"),
    (" tok ", ANTHROPIC, "tok"),
    ("Bearer tok", OPENAI, "tok"),
    ("bearer tok", OPENAI, "tok"),
    ("Bearer tok", None, "tok"),
    ("Bearer ", OPENAI, None),
])
def test_header_token(value, cred, expected):
    assert rules.header_token(value, cred) == expected


def test_upstream_headers_swap_the_placeholder_for_the_key():
    incoming = [("host", "gw:8760"), ("x-api-key", "TOKEN"), ("proxy-authorization", "Basic x"),
                ("connection", "keep-alive"), ("content-length", "5"), ("accept", "text/event-stream"),
                ("anthropic-version", "2023-06-01")]
    out = rules.upstream_headers(incoming, ANTHROPIC, "sk-real")
    assert out == [("accept", "text/event-stream"), ("anthropic-version", "2023-06-01"),
                   ("x-api-key", "sk-real")]
    assert not any("TOKEN" in v for _, v in out)


@pytest.mark.parametrize("cred, secret, header", [
    (OPENAI, "sk-o", ("Authorization", "Bearer sk-o")),
    (None, None, None),
])
def test_upstream_headers_prefix_and_none(cred, secret, header):
    out = rules.upstream_headers([("authorization", "Bearer TOKEN"), ("a", "b")], cred, secret)
    if header is None:
        assert out == [("authorization", "Bearer TOKEN"), ("a", "b")]  # passed on untouched
    else:
        assert out == [("a", "b"), header]


def test_response_headers_drop_hop_by_hop_but_keep_content_length():
    out = rules.response_headers([("content-type", "text/event-stream"), ("connection", "close"),
                                  ("transfer-encoding", "chunked"), ("content-length", "3")])
    assert out == [("content-type", "text/event-stream"), ("content-length", "3")]


@pytest.mark.parametrize("path, expected", [
    ("/api.anthropic.com/v1/messages", ("api.anthropic.com", "/v1/messages")),
    ("/API.anthropic.com:8443/v1/x?y=1", ("api.anthropic.com:8443", "/v1/x?y=1")),
    ("/api.anthropic.com", ("api.anthropic.com", "/")),
    ("/", None),
    ("//evil.com/x", None),
    ("relative", None),
])
def test_base_url_target(path, expected):
    assert rules.base_url_target(path) == expected


@pytest.mark.parametrize("text, default, expected", [
    ("api.anthropic.com:443", 443, ("api.anthropic.com", 443)),
    ("api.anthropic.com", 443, ("api.anthropic.com", 443)),
    ("Example.com", 80, ("example.com", 80)),
    ("host:0", 443, None),
    ("host:99999", 443, None),
    ("host:abc", 443, None),
    (":443", 443, None),
    ("", 443, None),
    ("127.0.0.1:8443", 443, ("127.0.0.1", 8443)),
    ("api.anthropic.com.:443", 443, ("api.anthropic.com", 443)),
    # hostile: each would make the upstream URL name another host than the one checked
    ("evil.com#.example.com", 443, None),
    ("evil.com#.example.com:443", 443, None),
    ("x@evil.com", 443, None),
    ("evil.com%2f.example.com", 443, None),
    ("evil.com\\.example.com", 443, None),
    ("[::1]:443", 443, None),
    ("a b.example.com", 443, None),
    ("-a.example.com", 443, None),
    ("a" * 254, 443, None),
])
def test_split_hostport(text, default, expected):
    assert rules.split_hostport(text, default) == expected


def test_agent_env_carries_the_token_never_a_key():
    env = rules.agent_env(host="172.18.0.1", port=8760, token="TOK", ca_file="/ca.pem",
                          creds=[ANTHROPIC, OPENAI])
    assert env["HTTPS_PROXY"] == "http://orchestrator:TOK@172.18.0.1:8760"
    assert env["HTTP_PROXY"] == env["https_proxy"] == env["HTTPS_PROXY"]
    assert env["ANTHROPIC_BASE_URL"] == "http://172.18.0.1:8760/api.anthropic.com"
    assert env["ANTHROPIC_API_KEY"] == "TOK"
    for name in rules.CA_ENV:
        assert env[name] == "/ca.pem"
    assert not any("secrets" in v for v in env.values())
    assert set(env) == {"HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY",
                        "no_proxy", *rules.CA_ENV, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"}


@pytest.mark.parametrize("egress, host, port", [
    (["api.anthropic.com:443"], "api.anthropic.com", 443),
    (["localhost:8443"], "localhost", 8443),
    (["localhost:8443", "localhost:9443"], "localhost", 443),
    ([], "localhost", 443),
])
def test_upstream_port_in_the_base_url(egress, host, port):
    assert rules.upstream_port(egress, host) == port
    cred = EgressCredential(host=host, header="x-api-key", secret_file="/s",
                            base_url_env="BASE")
    env = rules.agent_env(host="gw", port=1, token="T", ca_file="/c", creds=[cred],
                          egress=egress)
    assert env["BASE"] == (f"http://gw:1/{host}" if port == 443 else f"http://gw:1/{host}:{port}")
