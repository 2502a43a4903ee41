"""``json.loads`` / ``json.dumps(ensure_ascii=False)`` on the C accelerator alone.

Why: ``import json`` loads ``json.decoder``, which imports ``re`` (and ``re``
imports ``enum``) and compiles its patterns: ~6 ms of every agent start on the
bench's VM, a sixth of a cold round trip's budget. The parsing and the encoding
are ``_json``'s C code either way; only the thin Python wrappers are skipped.

Same results as ``json`` for what the agent reads and writes: the scanner is the
one ``json.loads`` uses, with its defaults (strict strings, NaN/Infinity
accepted); a document must be one value with only JSON whitespace around it.
Errors are ``ValueError`` (``json.JSONDecodeError`` where the C scanner raises
it). Where ``_json`` is missing or its functions have another signature (another
Python), the ``json`` module does the work: slower to import, same answers.
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}

TYPE_CHECKING = False  # typing stays off the agent's cold start
if TYPE_CHECKING:
    from typing import Any

_make_scanner: Any = None
_make_encoder: Any = None
_encode_str: Any = None
try:
    import _json

    _make_scanner, _make_encoder = _json.make_scanner, _json.make_encoder
    _encode_str = _json.encode_basestring
except ImportError:  # pragma: no cover - CPython always has _json
    pass


class _Context:
    """What the C scanner reads from a ``JSONDecoder``: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


def _no_default(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _slow_loads(text: str | bytes) -> object:
    import json

    return json.loads(text)


def _slow_dumps(value: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def loads(text: str | bytes) -> object:
    """``json.loads(text)``; ``ValueError`` for anything that is not one JSON value."""
    if _make_scanner is None or not isinstance(text, str):
        return _slow_loads(text)  # bytes: json detects UTF-8/16/32 itself
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        scan = _make_scanner(_Context)
    except TypeError:  # pragma: no cover - another Python's scanner
        return _slow_loads(text)
    try:
        value, end = scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"Expecting value: char {stop.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def dumps(value: object) -> str:
    """``json.dumps(value, ensure_ascii=False)``."""
    if _make_encoder is None:
        return _slow_dumps(value)  # pragma: no cover
    if isinstance(value, str):
        return _encode_str(value)
    try:
        encode = _make_encoder({}, _no_default, _encode_str, None, ": ", ", ", False, False,
                               True)
    except TypeError:  # pragma: no cover - another Python's encoder
        return _slow_dumps(value)
    return "".join(encode(value, 0))
