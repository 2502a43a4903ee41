"""The pure request rules of the open network, table-tested: Host and Origin
(``auth.request_refusal``), JSON-only bodies (``checks.body_refusal``), strict JSON
(``checks.loads``), ``process_after`` (``checks.due_time``) and ``Last-Event-ID``."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.api.auth import (
    HostRule,
    Listen,
    host_of,
    host_rule,
    is_loopback_name,
    origin_host,
    request_refusal,
)
from orchestrator.api.checks import MAX_DEPTH, BadRequest, body_refusal, depth_of, due_time, loads

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
LOOP = Listen(host="127.0.0.1", port=8750)
WILD = Listen(host="0.0.0.0", port=8750)
LAN = Listen(host="10.0.0.5", port=8750)
UNIX = Listen(path="/run/orch.sock")


@pytest.mark.parametrize("value, expected", [
    ("localhost", "localhost"), ("LOCALHOST:8750", "localhost"), ("127.0.0.1:1", "127.0.0.1"),
    ("[::1]:8750", "::1"), ("[::1]", "::1"), ("example.com.", "example.com"),
    ("a.localhost", "a.localhost"), ("", None), (":80", None), ("h:x", None), ("[::1", None),
    ("[::1]x", None), ("[::1]x1", None), ("[::1]]", None), ("::1", None), ("evil.com/x", None), ("a@b", None), ("[]:1", None),
])
def test_host_of(value, expected) -> None:
    assert host_of(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("http://localhost:8750", "localhost"), ("https://orch.example.com", "orch.example.com"),
    ("null", None), ("file://", None), ("http://", None), ("ftp://x", None),
    ("http://x/path", None), ("HTTP://[::1]:1", "::1"),
    ("http://[a/b]", None),  # a path inside brackets: host_of alone would take "a/b"
])
def test_origin_host(value, expected) -> None:
    assert origin_host(value) == expected


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("app.localhost", True), ("127.0.0.1", True), ("127.8.8.8", True),
    ("::1", True), ("localhost.", True), ("evil.com", False), ("localhost.evil.com", False),
    ("0.0.0.0", False), ("10.0.0.5", False), ("rebind.127.0.0.1.nip.io", False),
])
def test_is_loopback_name(host, loopback) -> None:
    assert is_loopback_name(host) is loopback


@pytest.mark.parametrize("listen, allowed, token, rule", [
    (LOOP, (), False, HostRule(frozenset({"127.0.0.1"}), False, False)),
    (LAN, (), True, HostRule(frozenset({"10.0.0.5"}), False, True)),
    (WILD, (), True, HostRule(frozenset(), True, True)),
    (LAN, ("Orch.Example.com.",), True,
     HostRule(frozenset({"orch.example.com", "10.0.0.5"}), False, True)),
    (LAN, ("*",), True, HostRule(frozenset({"10.0.0.5"}), True, True)),
    (UNIX, (), False, HostRule(frozenset(), True, False)),
    (LAN, ("[fe80::1]",), True, HostRule(frozenset({"fe80::1", "10.0.0.5"}), False, True)),
    (Listen(host="Orch.LAN", port=1), (), True, HostRule(frozenset({"orch.lan"}), False, True)),
])
def test_host_rule(listen, allowed, token, rule) -> None:
    assert host_rule(listen, allowed, token) == rule


NO_TOKEN = host_rule(LOOP, (), False)
NO_TOKEN_STAR = host_rule(LOOP, ("*", "evil.com"), False)  # without a token: loopback anyway
TOKEN = host_rule(LAN, ("orch.example.com",), True)
TOKEN_ANY = host_rule(WILD, (), True)
UNIX_NO_TOKEN = host_rule(UNIX, (), False)


@pytest.mark.parametrize("rule, method, host, origin, unix, refused", [
    # no token: loopback names only, and no foreign Origin for any method
    (NO_TOKEN, "GET", "127.0.0.1:8750", None, False, None),
    (NO_TOKEN, "GET", "localhost:8750", None, False, None),
    (NO_TOKEN, "GET", None, None, False, None),  # HTTP/1.0 without Host: no browser
    (NO_TOKEN, "GET", "evil.com:8750", None, False, "Host"),  # DNS rebinding
    (NO_TOKEN, "POST", "evil.com", None, False, "Host"),
    (NO_TOKEN, "GET", "bad host", None, False, "Host"),
    (NO_TOKEN_STAR, "GET", "evil.com", None, False, "Host"),
    (NO_TOKEN, "POST", "127.0.0.1:8750", "http://evil.com", False, "Origin"),  # CSRF
    (NO_TOKEN, "GET", "127.0.0.1:8750", "http://evil.com", False, "Origin"),  # EventSource
    (NO_TOKEN, "POST", "127.0.0.1:8750", "null", False, "Origin"),  # sandboxed page
    (NO_TOKEN, "POST", "127.0.0.1:8750", "http://127.0.0.1:8750", False, None),  # status page
    (NO_TOKEN, "POST", "localhost:8750", "http://localhost:3000", False, None),  # same site
    # a token: allowed_hosts; a foreign Origin only refused when changing state
    (TOKEN, "GET", "orch.example.com", None, False, None),
    (TOKEN, "GET", "10.0.0.5:8750", None, False, None),  # the listen address
    (TOKEN, "GET", "localhost", None, False, None),
    (TOKEN, "GET", "other.example.com", None, False, "Host"),
    (TOKEN, "POST", "orch.example.com", "https://orch.example.com", False, None),
    (TOKEN, "POST", "orch.example.com", "https://evil.com", False, "Origin"),
    (TOKEN, "DELETE", "orch.example.com", "null", False, "Origin"),
    (TOKEN, "GET", "orch.example.com", "https://evil.com", False, None),  # cannot read the token
    (TOKEN_ANY, "GET", "anything.example", None, False, None),
    (TOKEN_ANY, "POST", "anything.example", "https://evil.com", False, None),
    # a Unix socket: any Host (no browser reaches it), Origin still loopback without token
    (UNIX_NO_TOKEN, "GET", "orchestrator", None, True, None),
    (UNIX_NO_TOKEN, "POST", "orchestrator", "http://evil.com", True, "Origin"),
])
def test_request_refusal(rule, method, host, origin, unix, refused) -> None:
    problem = request_refusal(rule, method, host, origin, unix)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(refused)
        assert "\n" not in problem


def test_request_refusal_shortens_a_huge_header() -> None:
    problem = request_refusal(NO_TOKEN, "GET", "x" * 10_000 + ".com", None)
    assert problem is not None and len(problem) < 300


NOT_SERVED = "is not served: add it to [api] allowed_hosts"
LOOPBACK_ONLY = " (with no token, only loopback names such as localhost or 127.0.0.1 are)"
CROSS_SITE = ("is not allowed: cross-site requests are refused (allowed: loopback names "
              "and [api] allowed_hosts)")


@pytest.mark.parametrize("rule, host, origin, expected", [
    # the whole line, as the client reads it; a header is shown up to 100 characters
    (NO_TOKEN, "evil.com", None, f"Host 'evil.com' {NOT_SERVED}{LOOPBACK_ONLY}"),
    (TOKEN, "evil.com", None, f"Host 'evil.com' {NOT_SERVED}"),
    (TOKEN, "h" * 100, None, f"Host '{'h' * 100}' {NOT_SERVED}"),
    (TOKEN, "h" * 101, None, f"Host '{'h' * 100}…' {NOT_SERVED}"),
    (TOKEN, "localhost", "http://evil.com", f"Origin 'http://evil.com' {CROSS_SITE}"),
    (TOKEN, "localhost", "http://" + "o" * 93, f"Origin 'http://{'o' * 93}' {CROSS_SITE}"),
    (TOKEN, "localhost", "http://" + "o" * 94, f"Origin 'http://{'o' * 93}…' {CROSS_SITE}"),
])
def test_request_refusal_says_what_and_how_to_fix(rule, host, origin, expected) -> None:
    assert request_refusal(rule, "POST", host, origin) == expected


@pytest.mark.parametrize("method, ctype, length, te, refused", [
    ("POST", "application/json", "10", None, False),
    ("POST", "application/json; charset=utf-8", "10", None, False),
    ("POST", "Application/JSON", "10", None, False),
    ("POST", "text/plain", "10", None, True),  # a browser's "simple" cross-site request
    ("POST", "text/plain;charset=UTF-8", "0", None, True),
    ("POST", "application/x-www-form-urlencoded", "10", None, True),
    ("POST", "multipart/form-data; boundary=x", "10", None, True),
    ("POST", None, "10", None, True),  # a body must say it is JSON
    ("POST", None, None, "chunked", True),
    ("POST", None, "0", None, False),  # POST .../stop with no body
    ("POST", None, None, None, False),
    ("GET", "text/plain", "10", None, False),
    ("PUT", "text/plain", "10", None, True),
])
def test_body_refusal(method, ctype, length, te, refused) -> None:
    assert (body_refusal(method, ctype, length, te) is not None) is refused


@pytest.mark.parametrize("body, accepted", [
    (b'{"a": 1.5, "b": [1, 2], "c": null}', True),
    (b'{"a": NaN}', False), (b'{"a": Infinity}', False), (b'{"a": -Infinity}', False),
    (b'{"a": 1e999}', False), (b'{"a": -1e999}', False),
    (b"[" * 100_000 + b"]" * 100_000, False),  # deeper than the interpreter's stack
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), False),
    (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, True),
    (b'{"a": ' + b"1" * 5000 + b"}", False),  # an integer of 5000 digits
    (b"\xff", False), (b"", False),
])
def test_loads(body, accepted) -> None:
    if accepted:
        assert loads(body) == json.loads(body)
    else:
        with pytest.raises(BadRequest) as info:
            loads(body)
        assert info.value.status == 400 and "\n" not in str(info.value)


@pytest.mark.parametrize("value, depth", [
    (1, 0), ([], 1), ({"a": [1, {"b": 2}]}, 3), ([[[[]]]], 4),
])
def test_depth_of(value, depth) -> None:
    assert depth_of(value) == depth


@pytest.mark.parametrize("value, expected", [
    ("2030-06-01T12:10:00Z", NOW + timedelta(minutes=10)),
    ("2030-06-01 12:10:00", NOW + timedelta(minutes=10)),  # no offset: UTC
    ("2030-06-01T14:10:00+02:00", NOW + timedelta(minutes=10)),
    ("2030-06-01T11:59:30Z", NOW - timedelta(seconds=30)),  # within the clock tolerance
    ("2030-06-01T11:58:00Z", "in the past"),  # send --at refuses it too
    ("2000-01-01T00:00:00Z", "in the past"),
    ("9999-12-31T23:59:59.5Z", "ISO 8601"),  # rounds up past the calendar's end
    ("0001-01-01T00:00:00+01:00", "ISO 8601"),  # before the calendar's start in UTC
    ("9999-12-31T23:59:59Z", "100 years"),
    ("tomorrow", "ISO 8601"), (12, "ISO 8601"), ("", "ISO 8601"), ("2" * 100, "ISO 8601"),
])
def test_due_time(value, expected) -> None:
    if isinstance(expected, datetime):
        assert due_time(value, NOW) == expected
    else:
        with pytest.raises(BadRequest, match=expected):
            due_time(value, NOW)
