"""Parsing of the report's options (window, formats), shared by the library call and the command line."""
from __future__ import annotations

from typing import Sequence

from .errors import ReportError

__all__ = ["Window", "parse_window", "parse_formats", "FORMATS", "DEFAULT_WINDOW_PAIRS"]

#: (first step, last step); None = open end. Pairs with start <= step_a and step_b <= end are drawn.
Window = tuple[int | None, int | None]

#: File formats a figure can be written in.
FORMATS = ("png", "pdf", "svg")

#: Pairs the interpolation figure draws when no window is given (the last ones of each run): enough to see the
#: pattern, few enough to read each update's curve.
DEFAULT_WINDOW_PAIRS = 50


def parse_window(value: str | Sequence[int | None] | None) -> Window | None:
    """``"100:200"``, ``"100:"``, ``":200"`` (optimizer steps) or a (start, end) pair; None = the default window."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        parts = text.split(":")
        if len(parts) != 2:
            raise ReportError(f"--window {value!r}: expected START:END in optimizer steps, e.g. 0:50 or 1000:")
        try:
            start, end = (int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise ReportError(f"--window {value!r}: START and END must be integers (optimizer steps)") from None
    else:
        vals = list(value)
        if len(vals) != 2:
            raise ReportError(f"--window {value!r}: expected (start, end)")
        start, end = (None if v is None else int(v) for v in vals)
    if start is not None and end is not None and end <= start:
        raise ReportError(f"--window {value!r}: END must be larger than START")
    return start, end


def parse_formats(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"png,pdf"`` or a sequence; every entry must be one of :data:`FORMATS`."""
    if value is None:
        return ("png", "pdf")
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        f = str(item).strip().lower().lstrip(".")
        if not f:
            continue
        if f not in FORMATS:
            raise ReportError(f"figure format {item!r}: expected one or more of {', '.join(FORMATS)} (comma-separated)")
        if f not in out:
            out.append(f)
    if not out:
        raise ReportError("no figure format given: use e.g. --format png,pdf")
    return tuple(out)
