"""Small pieces the command modules share (kept free of torch so that loading a command stays cheap)."""
from __future__ import annotations

from typing import Any

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "one_line", "json_object"]

#: Exit status for every error sgdwalk reports itself (bad options, missing data, bad archives).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def one_line(err: BaseException | str) -> str:
    """An exception's message on one line (KeyError without its quotes), control characters escaped and cut to a
    bounded length (:func:`trajectory.textsafe.one_line`)."""
    from trajectory.textsafe import one_line as _one_line

    return _one_line(err)


def json_object(text: str | None, option: str) -> dict[str, Any]:
    """Parse an option's JSON object text ('' or None -> {}); ValueError with one line otherwise (length and
    nesting limited before parsing, the echoed text escaped and cut)."""
    from trajectory.textsafe import load_json, safe

    if text is None or not text.strip():
        return {}
    value = load_json(text, option)
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object such as '{{\"hidden\": [100, 100]}}', got {safe(text)}")
    return value


def metric_lines() -> list[tuple[str, str]]:
    """(name, description) of every available metric: built-ins, registered ones and 'sgdwalk.metrics' plug-ins.

    Imports the analysis package (and with it torch): called for ``sgdwalk analyze --help`` only.
    """
    from trajectory.analysis import available_metrics, get_metric

    rows = []
    for name, source in available_metrics().items():
        try:
            desc = getattr(get_metric(name), "description", "") or ""
        except Exception as err:  # a broken plug-in is listed, not fatal for --help
            desc = f"(cannot load: {one_line(err)})"
        if "entry point" in source:
            desc = f"{desc} [plug-in {source.replace(' (entry point)', '')}]".strip()
        rows.append((name, desc))
    return rows


try:  # click is always there when the CLI runs; keep this module importable without it for tests of json_object
    import click as _click

    class MetricListingCommand(_click.Command):
        """A command whose --help ends with the list of available metrics (plug-ins included)."""

        def format_help(self, ctx: "_click.Context", formatter: "_click.HelpFormatter") -> None:
            super().format_help(ctx, formatter)
            with formatter.section("Metrics (--metric; default: interpolation, floor, geometry, barriers)"):
                formatter.write_dl(metric_lines())

    __all__ += ["metric_lines", "MetricListingCommand"]
except ImportError:  # pragma: no cover
    pass
