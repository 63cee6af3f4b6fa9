"""Figures and a self-contained HTML report from results files (``sgdwalk report``).

Reads results files only (never archives): the data flow is trainer → archive → analyzer → results → report.

Public API::

    from trajectory.report import build_report
    result = build_report(["a.results.h5", "b.results.h5"], "report/", window="0:50")
    print(result.html, result.files)

    # one figure at a time, e.g. in a notebook (each returns a matplotlib Figure)
    from trajectory.report import load_runs, interpolation_figure, dynamics_figure
    runs = load_runs(["a.results.h5", "b.results.h5"])
    interpolation_figure(runs, window="100:150")

See docs/report.md for every figure, the page and the configuration-selection rule.
"""
from .build import FIGURES, HTML_NAME, FigureSpec, ReportResult, build_report, default_report_dir
from .errors import ReportError
from .fig_barriers import barriers_figure
from .fig_curvature import curvature_figure, esd_figure
from .fig_dynamics import dynamics_figure
from .fig_interpolation import interpolation_figure
from .load import MetricData, Run, load_run, load_runs
from .options import parse_formats, parse_window
from .select import select_tables
from .stats import run_summary

__all__ = [
    "build_report",
    "ReportResult",
    "ReportError",
    "default_report_dir",
    "load_runs",
    "load_run",
    "Run",
    "MetricData",
    "run_summary",
    "select_tables",
    "interpolation_figure",
    "dynamics_figure",
    "barriers_figure",
    "curvature_figure",
    "esd_figure",
    "parse_window",
    "parse_formats",
    "FIGURES",
    "FigureSpec",
    "HTML_NAME",
]
