"""The paper's picture: the loss along consecutive updates, joined along an axis of optimizer steps.

Pair i (records θ_i → θ_i+1, steps s_a → s_b) is drawn over x ∈ [s_a, s_b] with the interpolation coefficient
mapped linearly, x = s_a + α·(s_b − s_a), so α = 1 of pair i lands on α = 0 of pair i+1 (the same record) and the
curves of consecutive pairs join into one line; the line breaks where pairs are not consecutive. Each pair's
valley floor (a*, floor loss of the ``floor`` metric) is marked: filled where the floor is strictly inside the
segment, hollow where it is an end. Only the part of the grid within [0, 1] is drawn (an extended grid such as
``-0.5:1.5`` would overlap the neighbours).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .errors import ReportError
from .load import MetricData, Run, as_runs
from .options import DEFAULT_WINDOW_PAIRS, Window, parse_window
from .plotting import STEP_LABEL, loss_label, new_figure, run_colors, style

__all__ = ["interpolation_figure", "window_rows", "joined_curve", "floor_matches"]


def floor_matches(run: Run) -> bool:
    """True when the run's floor rows were computed from its interpolation rows (so the marks sit on the curves)."""
    fl, interp = run.get("floor"), run.get("interpolation")
    return fl is not None and interp is not None and (fl.config.get("requires") or {}).get("interpolation") == interp.hash


def window_rows(step_a: np.ndarray, step_b: np.ndarray, window: Window | None,
                max_pairs: int = DEFAULT_WINDOW_PAIRS) -> np.ndarray:
    """Row indices drawn: those inside the window (optimizer steps), or the last ``max_pairs`` rows."""
    n = len(step_a)
    if window is None:
        return np.arange(max(0, n - max_pairs), n)
    start, end = window
    keep = np.ones(n, dtype=bool)
    if start is not None:
        keep &= step_a >= start
    if end is not None:
        keep &= step_b <= end
    return np.flatnonzero(keep)


def joined_curve(step_a: np.ndarray, step_b: np.ndarray, alphas: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (steps) and y (loss) of consecutive curves joined into one line, with NaN breaks between gaps."""
    xs, ys = [], []
    for j in range(len(step_a)):
        if j and step_a[j] != step_b[j - 1]:
            xs.append(np.array([np.nan]))
            ys.append(np.array([np.nan]))
        xs.append(step_a[j] + alphas * (step_b[j] - step_a[j]))
        ys.append(loss[j])
    if not xs:
        return np.empty(0), np.empty(0)
    return np.concatenate(xs).astype(float), np.concatenate(ys).astype(float)


def interpolation_figure(runs: Sequence[Run | str] | Run | str, window: Window | str | None = None, *,
                         max_pairs: int = DEFAULT_WINDOW_PAIRS) -> Figure:
    """Interpolated loss of consecutive updates with their valley floors; one panel per run.

    ``window``: optimizer steps ``(start, end)`` or ``"start:end"`` (open ends allowed); default the last
    ``max_pairs`` pairs of each run (early updates usually just descend; later ones show the valleys). Runs
    without interpolation rows in the window get no panel; raises :class:`~trajectory.report.errors.ReportError`
    when no run has any.
    """
    runs = as_runs(runs)
    win = parse_window(window) if not isinstance(window, tuple) else window
    colors = run_colors(len(runs))
    panels = []
    for run, color in zip(runs, colors):
        interp = run.get("interpolation")
        if interp is None:
            continue
        rows = window_rows(interp["step_a"], interp["step_b"], win, max_pairs)
        if len(rows):
            panels.append((run, color, interp, rows))
    if not panels:
        where = "" if win is None else f" in window {win[0] if win[0] is not None else ''}:{win[1] if win[1] is not None else ''}"
        raise ReportError(f"no interpolation rows{where} to draw")
    with style():
        fig = new_figure(11.0, 1.0 + 3.0 * len(panels))
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        floors = False
        for ax, (run, color, interp, rows) in zip(axes, panels):
            floors |= _draw_run(ax, run, color, interp, rows)
        axes[-1].set_xlabel(STEP_LABEL)
        line_color = panels[0][1] if len(panels) == 1 else "0.3"
        handles = [Line2D([], [], color=line_color, lw=1.2,
                          label=r"loss on the segment $\theta_t \to \theta_{t+1}$" + (" (colour: run)" if len(panels) > 1 else "")),
                   Line2D([], [], ls="none", marker="|", ms=7, color="0.35", label=r"record $\theta_t$")]
        if floors:
            handles += [
                Line2D([], [], ls="none", marker="o", ms=5, color="crimson", label=r"valley floor, $0 < a^* < 1$"),
                Line2D([], [], ls="none", marker="o", ms=5, mfc="none", mec="crimson", label=r"valley floor at an end ($a^* \in \{0, 1\}$)"),
            ]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
        fig.suptitle("Loss along consecutive SGD updates, joined along the optimizer-step axis", fontsize=11.5)
    return fig


def _draw_run(ax: Axes, run: Run, color: str, interp: MetricData, rows: np.ndarray) -> bool:
    """Draw one run's panel; True when floors were marked."""
    alphas = np.asarray(interp.config.get("options", {}).get("alphas", np.linspace(0, 1, interp["loss"].shape[1])), dtype=float)
    seg = (alphas >= 0.0) & (alphas <= 1.0)
    sa, sb = interp["step_a"][rows], interp["step_b"][rows]
    loss = np.asarray(interp["loss"], dtype=float)[rows][:, seg]
    x, y = joined_curve(sa, sb, alphas[seg], loss)
    if "loss_se" in interp.arrays:  # error band: ±1 standard error of each point's loss (interpolation v2)
        se = np.asarray(interp["loss_se"], dtype=float)[rows][:, seg]
        _, e = joined_curve(sa, sb, alphas[seg], se)
        if np.isfinite(e).any():
            ax.fill_between(x, y - e, y + e, color=color, alpha=0.25, lw=0, label="±1 standard error")
    ax.plot(x, y, color=color, lw=1.2)
    has0 = np.isclose(alphas[seg], 0.0)
    if has0.any():
        j0 = int(np.flatnonzero(has0)[0])
        ax.plot(sa, loss[:, j0], ls="none", marker="|", ms=6, color="0.35")
    marked = False
    fl = run.get("floor")
    if fl is not None and floor_matches(run):
        pos = {int(p): j for j, p in enumerate(fl["pair"])}
        sel = np.array([pos[int(p)] for p in interp["pair"][rows] if int(p) in pos], dtype=int)
        if len(sel):
            a = fl["a_star"][sel]
            fx = fl["step_a"][sel] + a * (fl["step_b"][sel] - fl["step_a"][sel])
            fy = fl["floor_loss"][sel]
            inner = np.asarray(fl["interior"][sel], dtype=bool)
            ax.plot(fx[inner], fy[inner], ls="none", marker="o", ms=4.5, color="crimson", zorder=3)
            ax.plot(fx[~inner], fy[~inner], ls="none", marker="o", ms=4.5, mfc="none", mec="crimson", mew=1.0, zorder=3)
            marked = True
    ax.set_ylabel(loss_label([run]))
    ev = interp.eval
    pairs = interp["pair"][rows]
    ax.set_title(f"{run.label}: pairs {int(pairs[0])}–{int(pairs[-1])} ({len(rows)} updates, steps {int(sa.min())}–{int(sb.max())})"
                 + (f", loss on {ev}" if ev else ""), loc="left")
    if np.isfinite(x).any():
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if hi > lo:
            ax.set_xlim(lo, hi)
    return marked
