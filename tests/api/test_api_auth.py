"""api.auth: where to listen and who may use it — pure, table-tested."""

from __future__ import annotations

import pytest

from orchestrator.api.auth import (
    ApiConfigError,
    Listen,
    bearer_ok,
    is_loopback,
    parse_listen,
    start_error,
)


@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("127.0.0.1:8750", Listen(host="127.0.0.1", port=8750)),
    ("0.0.0.0:80", Listen(host="0.0.0.0", port=80)),
    ("localhost:0", Listen(host="localhost", port=0)),
    ("[::1]:8750", Listen(host="::1", port=8750)),
    ("unix:/run/orch.sock", Listen(path="/run/orch.sock")),
    ("h:65535", Listen(host="h", port=65535)),  # boundary: the highest port
    ("ab]:80", Listen(host="ab]", port=80)),  # brackets only come off as a pair
    ("[ab:80", Listen(host="[ab", port=80)),
])
def test_parse_listen(text, expected) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8750", "host:", ":8750", "h:99999", "h:65536", "h:port",
                                  "unix:relative.sock"])
def test_parse_listen_refuses(text) -> None:
    with pytest.raises(ApiConfigError, match=r"\[api\] listen"):
        parse_listen(text)


@pytest.mark.parametrize("text, loopback", [
    ("127.0.0.1:1", True), ("127.9.9.9:1", True), ("[::1]:1", True), ("localhost:1", True),
    ("unix:/x.sock", True), ("0.0.0.0:1", False), ("[::]:1", False), ("10.0.0.5:1", False),
    ("example.com:1", False),
])
def test_is_loopback(text, loopback) -> None:
    assert is_loopback(parse_listen(text)) is loopback


@pytest.mark.parametrize("text, has_token, refused", [
    ("0.0.0.0:8750", False, True), ("10.0.0.5:8750", False, True),
    ("0.0.0.0:8750", True, False), ("127.0.0.1:8750", False, False),
    ("unix:/x.sock", False, False),
])
def test_start_error(text, has_token, refused) -> None:
    problem = start_error(parse_listen(text), has_token)
    assert (problem is not None) is refused
    if refused:
        assert problem == (f"[api] listen = {text} is not a loopback address and [api] "
                           "token_file is '': set a token file (or listen on 127.0.0.1)")


@pytest.mark.parametrize("header, token, ok", [
    ("Bearer s3cret", "s3cret", True), ("Bearer  s3cret ", "s3cret", True),
    ("Bearer wrong", "s3cret", False), ("bearer s3cret", "s3cret", False),
    ("s3cret", "s3cret", False), (None, "s3cret", False), ("", "s3cret", False),
    ("Bearer s3cre", "s3cret", False), (None, None, True), ("Bearer x", None, True),
])
def test_bearer_ok(header, token, ok) -> None:
    assert bearer_ok(header, token) is ok


def test_listen_url() -> None:
    assert Listen(host="127.0.0.1", port=1).url() == "http://127.0.0.1:1"
    assert Listen(host="::1", port=1).url() == "http://[::1]:1"
    assert Listen(path="/x.sock").url() == "unix:/x.sock"
