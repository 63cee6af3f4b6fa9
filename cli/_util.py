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


def _source_description(target: str) -> str | None:
    """The ``description`` class attribute of ``module:Class``, read from its source with ``ast`` (no import, so no
    torch): None when the module cannot be found or the attribute is not a plain string literal."""
    import ast
    import importlib.util

    mod, _, attr = target.partition(":")
    try:
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        with open(spec.origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "description" for t in stmt.targets)
                        and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                    return stmt.value.value
    return None


def metric_lines() -> list[tuple[str, str]]:
    """(name, description) of every available metric: built-ins, registered ones and 'sgdwalk.metrics' plug-ins.

    Called for ``sgdwalk analyze --help`` only. Descriptions are read from the metric classes' source without
    importing them (importing a metric imports torch: seconds); a plug-in whose source cannot be read that way is
    imported, and a broken one is listed with the reason instead of failing the help.
    """
    from trajectory.analysis.metric import available_metrics, get_metric

    rows = []
    for name, source in available_metrics().items():
        plugin = "entry point" in source
        target = source.replace(" (entry point)", "")
        desc = _source_description(target) if ":" in target else None
        if desc is None:
            try:
                desc = getattr(get_metric(name), "description", "") or ""
            except Exception as err:  # a broken plug-in is listed, not fatal for --help
                desc = f"(cannot load: {one_line(err)})"
        if plugin:
            desc = f"{desc} [plug-in {target}]".strip()
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
