"""Offline analysis of recorded SGD trajectories: replay consecutive records and measure the landscape.

Public API::

    from trajectory.analysis import analyze, Metric, register_metric
    report = analyze("run.h5", eval="subset:2000", bn="train", spans="1,2")
    print(report.summary)

See docs/analysis.md (usage, metric plug-ins) and docs/results.md (results file schema).
"""
import importlib
from typing import Any

from .errors import AnalysisError, MetricError, ResultsError, ResultsLockedError, ResultsMismatchError

#: where each public name lives; imported on first access, so ``import trajectory.analysis`` (and the metric
#: registry in :mod:`.metric`, which ``sgdwalk analyze --help`` lists) costs no torch import
_LAZY = {
    **dict.fromkeys(("DEFAULT_EVAL", "AnalysisReport", "ReplayContext", "analyze", "archive_identity"), ".engine"),
    "Evaluator": ".evaluator",
    **dict.fromkeys(("DEFAULT_METRICS", "ENTRY_POINT_GROUP", "Metric", "available_metrics", "get_metric",
                     "register_metric"), ".metric"),
    **dict.fromkeys(("EvalSpec", "parse_alphas", "parse_eval", "parse_spans", "parse_steps"), ".options"),
    **dict.fromkeys(("RESULTS_FORMAT", "RESULTS_VERSION", "ResultsFile", "Table", "default_results_path"), ".results"),
    **dict.fromkeys(("format_summary", "summarize_file"), ".summary"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "analyze",
    "AnalysisReport",
    "ReplayContext",
    "Metric",
    "register_metric",
    "get_metric",
    "available_metrics",
    "DEFAULT_METRICS",
    "DEFAULT_EVAL",
    "ENTRY_POINT_GROUP",
    "Evaluator",
    "EvalSpec",
    "ResultsFile",
    "Table",
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "default_results_path",
    "summarize_file",
    "format_summary",
    "archive_identity",
    "parse_alphas",
    "parse_eval",
    "parse_spans",
    "parse_steps",
    "AnalysisError",
    "MetricError",
    "ResultsError",
    "ResultsMismatchError",
    "ResultsLockedError",
]
