"""``build_report``: results files in, figures (PNG/PDF/SVG) and one self-contained ``report.html`` out.

The figures are listed once, in :data:`FIGURES`, with the metrics each needs; a figure whose metrics no results
file has is omitted with a note on the page (never an error), and runs lacking a figure's metric are named in
the notes. Everything here is a thin loop over :mod:`.load`, the figure modules and :mod:`.page`, so each piece
can also be used on its own.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib.figure import Figure

from .errors import ReportError
from .fig_barriers import barriers_figure
from .fig_curvature import CURVATURE_METRICS, curvature_figure, esd_figure
from .fig_dynamics import dynamics_figure
from .fig_gradients import eigen_split_figure, gradients_figure, per_layer_figure
from .fig_optimizer import optimizer_figure
from .fig_interpolation import floor_matches, interpolation_figure
from .load import Run, load_runs
from .options import DEFAULT_WINDOW_PAIRS, Window, parse_formats, parse_window
from .page import FigureEntry, render_html
from .plotting import save_figure, png_bytes
from .stats import run_summary

__all__ = ["build_report", "ReportResult", "FigureSpec", "FIGURES", "default_report_dir", "HTML_NAME"]

HTML_NAME = "report.html"


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: file base name, title, caption, the metrics it draws (any of), how to draw it."""

    name: str
    title: str
    caption: str
    metrics: tuple[str, ...]
    draw: Callable[[list[Run], Window | None, int], Figure]


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "interpolation", "Loss along consecutive updates",
        "Loss on the evaluation data along the straight segment between consecutive records, pair i drawn over "
        "[step of θ_i, step of θ_i+1] so that consecutive curves join; red circles mark each update's valley floor "
        "(filled: strictly inside the segment; hollow: at an end); grey ticks mark the records.",
        ("interpolation",), lambda runs, window, max_pairs: interpolation_figure(runs, window, max_pairs=max_pairs)),
    FigureSpec(
        "dynamics", "Training dynamics",
        "Loss at the records; height of θ_t above its update's valley floor, for updates whose floor is interior "
        "(0 < a* < 1), apart from descent steps whose floor is an end of the update (there the 'height' is just the "
        "step's loss decrease); distance from the first record, step length and cosine between consecutive updates "
        "(parameters only), against the optimizer step.",
        ("floor", "geometry"), lambda runs, window, max_pairs: dynamics_figure(runs)),
    FigureSpec(
        "barriers", "Barriers along the valley floor",
        "Top left: barrier height max(path) − max(ends) on the straight path between valley-floor points k records "
        "apart, with the threshold above which a span counts as having a barrier, and below zero (faint) −dip, "
        "dip = min(ends) − min(path). Top right: fraction of spans with a barrier (solid) and with a dip (hatched), "
        "per span k. Bottom: floor loss of each update over training, with the peaks of that sequence (▲) and their "
        "prominence (bar down to the higher base).",
        ("barriers",), lambda runs, window, max_pairs: barriers_figure(runs)),
    FigureSpec(
        "curvature", "Curvature over training",
        "Top Hessian eigenvalue, Hessian trace, λ_max·lr/(2 + 2β) against the edge of stability (1; β: the recorded SGD momentum), ε-sharpness, and the "
        "share of each update in the top-k Hessian eigenspace (dotted: a random direction's expected share), at the "
        "points the curvature metrics measured.",
        ("hessian_top", "hessian_trace", "sharpness", "update_alignment"), lambda runs, window, max_pairs: curvature_figure(runs)),
    FigureSpec(
        "esd", "Hessian spectrum",
        "Hessian eigenvalue density (stochastic Lanczos quadrature with Gaussian broadening) at up to six points per "
        "run, coloured by step.",
        ("hessian_esd",), lambda runs, window, max_pairs: esd_figure(runs)),
    FigureSpec(
        "gradients", "Gradient dynamics",
        "At each record: norms of the full-batch gradient g and of the recorded minibatch's g_B, cos(Δθ, −g) and "
        "cos(g_B, g), the gradient noise scale B_simple = tr(Σ)/‖g‖² (McCandlish et al. 2018), and the loss change "
        "along the update against its first-order prediction g·Δθ (± 1 standard error over the evaluation samples).",
        ("gradients",), lambda runs, window, max_pairs: gradients_figure(runs)),
    FigureSpec(
        "eigen_split", "Eigen-direction split",
        "Each update split into its component in the top-k Hessian eigenspace at the record and the rest: the share "
        "of its squared length in the top-k space, the loss change along each component alone, and the share of the "
        "update's height each explains.",
        ("eigen_split",), lambda runs, window, max_pairs: eigen_split_figure(runs)),
    FigureSpec(
        "per_layer", "Per-layer views",
        "Per parameter group (archive layout order, shade by index): step length, distance from the first record, "
        "and the loss change when that group alone moves along the update.",
        ("per_layer",), lambda runs, window, max_pairs: per_layer_figure(runs)),
    FigureSpec(
        "optimizer", "Optimizer-aware analysis",
        "From the recorded optimizer state: the sharpness against the recorded optimizer's stability threshold "
        "(SGD: λ_max(H) and (2 + 2β)/lr; Adam: λ_max(P⁻¹H) and (2 + 2β1)/((1 − β1)·lr), Cohen et al. 2022), the "
        "update split (SGD: momentum and gradient parts; Adam: the step against lr·‖P⁻¹g‖), and the relative "
        "error of the gradient recovered from the state against the replayed minibatch gradient.",
        ("optimizer",), lambda runs, window, max_pairs: optimizer_figure(runs)),
)


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    out_dir: str
    html: str
    figures: dict[str, list[str]]
    runs: list[Run]
    notes: list[str] = field(default_factory=list)
    omitted: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def files(self) -> list[str]:
        """Every file written: the figures, then the page."""
        return [p for paths in self.figures.values() for p in paths] + [self.html]


def default_report_dir(results: str | os.PathLike) -> str:
    """``run.results.h5`` → ``run.report/`` next to it (``x.h5`` → ``x.report/``)."""
    path = os.fspath(results)
    base = os.path.basename(path)
    for suffix in (".h5", ".hdf5"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base.endswith(".results"):
        base = base[: -len(".results")]
    return os.path.join(os.path.dirname(os.path.abspath(path)), f"{base}.report")


def _notes(runs: Sequence[Run], specs: Sequence[FigureSpec]) -> list[str]:
    """Notes for the page: what each run lacks, per figure drawn."""
    notes = [f"{run.label}: {n}" for run in runs for n in run.notes]
    for spec in specs:
        if spec.name == "dynamics":
            for m, what in (("floor", "loss and height panels"), ("geometry", "distance, step-length and cosine panels")):
                lacking = [r.label for r in runs if not r.has(m)]
                if len(lacking) == len(runs):
                    notes.append(f"{spec.title}: {what} omitted, no {m} rows")
                elif lacking:
                    notes.append(f"{spec.title}: no {m} rows in {', '.join(lacking)}")
            continue
        lacking = [r.label for r in runs if not any(r.has(m) for m in spec.metrics)]
        if lacking:
            notes.append(f"{spec.title}: no {' / '.join(spec.metrics)} rows in {', '.join(lacking)}")
    for run in runs:
        if run.has("floor") and run.has("interpolation") and not floor_matches(run):
            notes.append(f"{run.label}: the floor table was computed from another interpolation configuration "
                         "than the one drawn; floors are not marked on its curves")
    return notes


def build_report(
    results: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    window: Window | str | None = None,
    formats: Sequence[str] | str = ("png", "pdf"),
    title: str | None = None,
    eval: str | None = None,
    configs: Sequence[str] = (),
    max_pairs: int = DEFAULT_WINDOW_PAIRS,
    progress: bool | Callable[[int, int], Any] = False,
) -> ReportResult:
    """Write the figures and ``report.html`` of one or more results files into ``out_dir``.

    Parameters
    ----------
    results : path or paths of results files (written by ``sgdwalk analyze``); one run each.
    out_dir : directory for the report (created); default ``<first results>.report`` next to the first file
        (``run.results.h5`` → ``run.report/``). Existing files of the same names are replaced, others kept.
    window : optimizer steps ``"start:end"`` / ``(start, end)`` of the interpolation figure (open ends allowed);
        default the last ``max_pairs`` pairs of each run.
    formats : figure files to write, any of ``png``, ``pdf``, ``svg`` (the page always embeds PNG).
    title : page title; default "sgdwalk report: <run labels>".
    eval, configs : which configuration of each metric to use when a file holds several (see
        :mod:`trajectory.report.select`): keep tables evaluated on ``eval`` (``subset:2000``, ``train``...),
        pin tables by config-hash prefix.
    progress : True for a tqdm bar over the figures (rate and ETA), or a callable ``(done, total)``.

    Returns a :class:`ReportResult` listing the files written. Missing metrics and empty tables omit their
    figure with a note; a missing or non-results file raises an :class:`~trajectory.errors.SgdwalkError`.
    """
    t0 = time.perf_counter()
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    if not paths:
        raise ReportError("no results files given")
    fmts = parse_formats(formats)
    win = parse_window(window) if not isinstance(window, tuple) else parse_window(list(window))
    if int(max_pairs) < 1:
        raise ReportError(f"max_pairs must be >= 1, got {max_pairs}")
    runs = load_runs(paths, eval=eval, configs=configs)
    out = os.path.abspath(os.fspath(out_dir) if out_dir is not None else default_report_dir(paths[0]))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ReportError(f"--out {out} exists and is not a directory")
    os.makedirs(out, exist_ok=True)

    todo = [s for s in FIGURES if any(r.has(m) for r in runs for m in s.metrics)]
    curvature = any(r.has(m) for r in runs for m in CURVATURE_METRICS)
    chosen = " matching --eval/--config" if eval is not None or configs else ""
    omitted = {s.name: f"{s.title}: omitted, no results file has {' / '.join(s.metrics)} rows{chosen}"
               for s in FIGURES if s not in todo and (s.name != "esd" or curvature)}
    notes = _notes(runs, todo)
    bar = None
    if progress is True and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="figure", desc="report", dynamic_ncols=True)
    entries: list[FigureEntry] = []
    written: dict[str, list[str]] = {}
    try:
        for done, spec in enumerate(todo, 1):
            if bar is not None:
                bar.set_postfix_str(spec.name)
            try:
                fig = spec.draw(runs, win, int(max_pairs))
            except ReportError as err:  # e.g. no interpolation rows inside the window
                omitted[spec.name] = f"{spec.title}: omitted, {err}"
            else:
                files = save_figure(fig, os.path.join(out, spec.name), fmts)
                png = Path(files[fmts.index("png")]).read_bytes() if "png" in fmts else png_bytes(fig)
                fig.clear()
                written[spec.name] = files
                entries.append(FigureEntry(spec.name, spec.title, spec.caption, png, files))
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, len(todo))
    finally:
        if bar is not None:
            bar.close()
    from .. import __version__

    summaries = [run_summary(r) for r in runs]
    page = render_html(
        title=title or "sgdwalk report: " + ", ".join(r.label for r in runs),
        runs=runs, summaries=summaries, figures=entries, notes=list(omitted.values()) + notes,
        files=[os.path.relpath(p, out) for ps in written.values() for p in ps], version=__version__,
    )
    html_path = os.path.join(out, HTML_NAME)
    tmp = f"{html_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, html_path)
    return ReportResult(out, html_path, written, runs, notes, omitted, time.perf_counter() - t0)
