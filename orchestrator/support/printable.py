"""Agent-controlled text made safe to put in one log line.

An agent chooses a reply's text, its routing fields and its file names. Written raw,
a newline starts a forged log line ("... reply x delivered"), and a terminal escape
(``ESC [ ...``) rewrites what an operator's terminal shows. ``printable`` escapes
every character that is not printable (``str.isprintable``: C0 and C1 controls,
DEL, line and paragraph separators, format characters such as bidi overrides,
unassigned and private-use code points) as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``,
and the backslash itself as ``\\\\``, so an escape in the output can never be
confused with one the agent typed; it also caps the length.
"""

from __future__ import annotations

MAX_CHARS = 2000


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object, max_chars: int = MAX_CHARS) -> str:
    """``value`` (``str()`` of it; None as ``-``) on one line, escaped, at most
    ``max_chars`` of the text shown (then ``…(+N chars)``)."""
    text = "-" if value is None else value if isinstance(value, str) else str(value)
    cut = len(text) - max_chars
    if cut > 0:
        text = text[:max_chars]
    if not (text.isprintable() and "\\" not in text):
        text = "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in text)
    return f"{text}…(+{cut} chars)" if cut > 0 else text
