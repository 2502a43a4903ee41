"""``agent.jsontext``: json's answers without importing json (the agent's cold start),
and the agent's own copies of the contract's names and id rule (``sessionlib``)."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.agent import decide, jsontext, sessionlib
from orchestrator.contract import layout

DOCUMENTS = [
    '{"text": "hi"}', '"plain"', "[1, 2.5, -3e2, true, false, null]", "  {\n} \t",
    '{"a": {"b": [{"c": "\\u00e9\\ud83d\\ude00"}]}}', '{"text": "x", "text": "y"}', "0",
    '{"big": 123456789012345678901234567890}', "[NaN, Infinity, -Infinity]", '"\\n\\t\\""',
]
BAD = ["", "   ", "not json{", "{} {}", '{"a": 1,}', "[1, 2", "'single'", '"ctl\x01"', "{]",
       "01", "tru", '{"a" 1}', "[1] x"]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_loads_agrees_with_json(text: str) -> None:
    got, want = jsontext.loads(text), json.loads(text)
    if isinstance(want, list) and any(isinstance(v, float) and math.isnan(v) for v in want):
        assert json.dumps(got) == json.dumps(want)
    else:
        assert got == want and type(got) is type(want)


@pytest.mark.parametrize("text", BAD)
def test_loads_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsontext.loads(text)


@pytest.mark.parametrize("value", [
    {"text": "echo: hé 😀", "files": ["a.txt"], "refused": ["b: no"]}, "plain\n\"q\"", [1, 2.5],
    {"n": None, "t": True, "f": 1e100, 3: "int key"}, {}, [], {"nested": {"l": [{"x": -0.0}]}},
])
def test_dumps_agrees_with_json(value: object) -> None:
    assert jsontext.dumps(value) == json.dumps(value, ensure_ascii=False)


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsontext.dumps({"x": object()})
    with pytest.raises(ValueError):
        loop: list = []
        loop.append(loop)
        jsontext.dumps(loop)


def test_bytes_go_through_json() -> None:
    assert jsontext.loads('{"a": "é"}'.encode()) == {"a": "é"}


def test_the_agents_names_are_the_contracts() -> None:
    assert (sessionlib.INBOUND_DB, sessionlib.OUTBOUND_DB, sessionlib.OUTBOX,
            sessionlib.HEARTBEAT) == (layout.INBOUND_DB, layout.OUTBOUND_DB, layout.OUTBOX,
                                      layout.HEARTBEAT)


@pytest.mark.parametrize("value", [
    decide.new_out_id(), "a", "A" * 128, "out-1.2_3@4+5-6", "9lives", "a" * 129, "", ".hidden",
    "-dash", "a..b", "a/b", "a b", "é", "a\x00", "a\n", "_x", "ok.", "x..", "\u0661abc",
])
def test_safe_id_agrees_with_validate_id(value: str) -> None:
    try:
        want = layout.validate_id(value, "message id")
    except layout.InvalidId:
        with pytest.raises(layout.InvalidId):
            sessionlib.safe_id(value)
    else:
        assert sessionlib.safe_id(value) == want
