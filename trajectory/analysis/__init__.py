"""Offline analysis of recorded SGD trajectories: replay consecutive records and measure the landscape.

Public API::

    from trajectory.analysis import analyze, Metric, register_metric
    report = analyze("run.h5", eval="subset:2000", bn="train", spans="1,2")
    print(report.summary)

See docs/analysis.md (usage, metric plug-ins) and docs/results.md (results file schema).
"""
from .engine import DEFAULT_EVAL, AnalysisReport, ReplayContext, analyze, archive_identity
from .errors import AnalysisError, MetricError, ResultsError, ResultsLockedError, ResultsMismatchError
from .evaluator import Evaluator
from .metric import DEFAULT_METRICS, ENTRY_POINT_GROUP, Metric, available_metrics, get_metric, register_metric
from .options import EvalSpec, parse_alphas, parse_eval, parse_spans, parse_steps
from .results import RESULTS_FORMAT, RESULTS_VERSION, ResultsFile, Table, default_results_path
from .summary import format_summary, summarize_file

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
