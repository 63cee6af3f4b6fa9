"""Text that is safe to print: control characters escaped, long values cut, one line per error.

Everything sgdwalk prints that came from outside (a file's attributes, a spec string, an option value, an exception
message that quotes one) goes through here, because such text is untrusted: an archive attribute can hold terminal
escape sequences (``\\x1b]0;...``) that rewrite the user's terminal, and a 1 MB spec target must not become a 1 MB
"one-line" error. Why one module: the rule "escape, then cut" has to be the same at every print site, and a
fix (say, a new dangerous code point) must land everywhere at once.
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any

__all__ = ["escape", "escape_lines", "cut", "safe", "one_line", "load_json", "json_depth", "MAX_ECHO", "MAX_JSON_CHARS",
           "MAX_JSON_DEPTH"]

#: Longest value (in characters) echoed back inside a message; the rest is replaced by a count.
MAX_ECHO = 300

#: Longest JSON text accepted from a user or a file (a spec's kwargs, a results group's config).
MAX_JSON_CHARS = 1 << 20
#: Deepest nesting of JSON arrays/objects accepted (deeper input would exhaust Python's recursion limit).
MAX_JSON_DEPTH = 64

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    # Cc: C0/C1 controls and DEL (ESC, CSI, BEL, backspace, ...); Cf: format characters such as the bidi overrides
    # U+202E that make text display reversed; Zl/Zp: line and paragraph separators that break "one line".
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def escape(text: object) -> str:
    """``str(text)`` with every control or format character written as a visible escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so printing it can neither move the cursor, recolour the terminal nor break the line."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # fast path: no control characters at all
        return s
    return "".join(_escape_char(ch) if _unsafe(ch) else ch for ch in s)


def escape_lines(text: object) -> str:
    """:func:`escape` each line of a multi-line text, keeping its line breaks (for tables such as ``info``)."""
    return "\n".join(escape(line) for line in str(text).split("\n"))


def cut(text: object, limit: int = MAX_ECHO) -> str:
    """``text`` cut to about ``limit`` characters, saying how many were left out (so a cut is never mistaken for
    the whole value)."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}... ({len(s) - limit} more characters)"


def safe(value: object, limit: int = MAX_ECHO) -> str:
    """An untrusted value for a message: ``repr``-like quotes, escaped, then cut (escaping first, so a cut
    never splits an escape in a way that hides what follows)."""
    s = value if isinstance(value, str) else str(value)
    return "'" + cut(escape(s), limit) + "'"


def one_line(err: BaseException | str, limit: int = 2 * MAX_ECHO + 200) -> str:
    """One printable line for an error: whitespace runs collapsed, control characters escaped, cut to a bounded
    length. A ``KeyError``'s message is its key (``str(KeyError('x'))`` would add quotes); an empty message
    becomes the exception's type name."""
    if isinstance(err, BaseException):
        if isinstance(err, KeyError) and len(err.args) == 1:
            text = str(err.args[0])
        else:
            text = str(err)
        text = text or type(err).__name__
    else:
        text = str(err)
    return cut(escape(" ".join(text.split())), limit)


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, counted without recursion (brackets inside strings ignored)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def load_json(text: str | bytes, what: str, *, error: type[Exception] = ValueError, max_chars: int = MAX_JSON_CHARS,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted text, refusing (as ``error``, one line) text longer than ``max_chars`` or nested
    deeper than ``max_depth`` before parsing: the standard parser recurses per level and raises RecursionError (a
    traceback) on deep input, and a huge text costs memory for nothing. ``what`` names the value in the message."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"{what} is not UTF-8 text ({one_line(err)})") from None
    if not isinstance(text, str):
        raise error(f"{what} must be JSON text, not {type(text).__name__}")
    if len(text) > max_chars:
        raise error(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise error(f"{what} is not valid JSON ({one_line(err)}): {safe(text)}") from None
