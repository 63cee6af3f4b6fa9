"""Training dynamics along the recorded path: loss, height above the valley floor, distance travelled, step
length, direction changes (and the learning rate when it changes). Runs are overlaid on the same axes.

Heights come in two panels (issue 13): updates whose valley floor is interior (a* inside the segment, below both
ends), whose height is the paper's quantity, and descent steps (the floor is an end of the segment), whose
"height" is just the step's loss decrease (:mod:`trajectory.analysis.heights`). Pooling them hid the former.

Per-pair series are noisy (each update sees one minibatch), so long series are drawn thin with a thick centred
rolling median on top; the legend names the window. Panels whose metric no run has are left out, not drawn empty.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from .errors import ReportError
from .load import Run, as_runs
from .plotting import (
    STEP_LABEL, add_run_legend, label_bottom_axes, loss_label, panel_grid, plot_series, run_colors, smoothing_window, style,
)

__all__ = ["dynamics_figure", "DYNAMICS_PANELS"]


@dataclass(frozen=True)
class Panel:
    key: str
    metric: str
    column: str
    title: str
    ylabel: Callable[[Sequence[Run]], str]
    smooth: bool
    zero_line: bool = False
    #: rows to draw (a boolean mask of the metric's rows); None: all
    select: Callable[[Any], np.ndarray] | None = None


def _lr_varies(run: Run) -> bool:
    geo = run.get("geometry")
    if geo is None:
        return False
    lr = np.asarray(geo["lr"], dtype=float)
    lr = lr[np.isfinite(lr)]
    return len(lr) > 1 and bool(np.ptp(lr) > 1e-12 * np.max(np.abs(lr)))


def _nats(runs: Sequence[Run], text: str) -> str:
    return loss_label(runs, text).replace("(cross-entropy, nats)", "(nats)")


DYNAMICS_PANELS: tuple[Panel, ...] = (
    Panel("loss", "floor", "loss_a", r"Loss at each record $\theta_t$ (evaluation data)",
          lambda r: loss_label(r, r"$L(\theta_t)$"), False),
    Panel("height", "floor", "height", r"Height above an interior valley floor ($0 < a^* < 1$)",
          lambda r: _nats(r, r"$L(\theta_t) - L_\mathrm{floor}$"), True, True,
          select=lambda m: np.asarray(m["interior"], dtype=bool)),
    Panel("descent", "floor", "height", r"Descent steps: floor at an end ($a^* \in \{0, 1\}$), loss decrease",
          lambda r: _nats(r, r"$L(\theta_t) - L(\theta_{a^*})$"), True, True,
          select=lambda m: ~np.asarray(m["interior"], dtype=bool)),
    Panel("a_star", "floor", "a_star", r"Position of the valley floor on each update (0: $\theta_t$, 1: $\theta_{t+1}$)",
          lambda r: r"$a^*$", True),
    Panel("cos_prev", "geometry", "cos_prev", "Cosine between consecutive updates",
          lambda r: r"$\cos(\theta_{t+1} - \theta_t,\ \theta_t - \theta_{t-1})$", True, True),
    Panel("dist_init", "geometry", "dist_init", "Distance from the first record (parameters)",
          lambda r: r"$\Vert\theta_t - \theta_0\Vert_2$", False),
    Panel("step_length", "geometry", "step_length", "Step length (parameters)",
          lambda r: r"$\Vert\theta_{t+1} - \theta_t\Vert_2$", True),
    Panel("lr", "geometry", "lr", "Learning rate (recorded)", lambda r: r"learning rate $\eta$", False),
)


def dynamics_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """Loss, height above the floor, ‖θ_t − θ₀‖, step length and cos of consecutive updates over training.

    The learning-rate panel appears only when a run's recorded lr changes. Raises
    :class:`~trajectory.report.errors.ReportError` when no run has floor or geometry rows.
    """
    runs = as_runs(runs)
    panels = [p for p in DYNAMICS_PANELS
              if any(r.has(p.metric) for r in runs) and (p.key != "lr" or any(_lr_varies(r) for r in runs))]
    if not panels:
        raise ReportError("no floor or geometry rows to draw")
    colors = run_colors(len(runs))
    with style():
        fig, axes, ncols = panel_grid(len(panels))
        windows: set[int] = set()
        drawn: set[int] = set()
        chords: set[int] = set()
        for ax, panel in zip(axes, panels):
            for i, (run, color) in enumerate(zip(runs, colors)):
                m = run.get(panel.metric)
                if m is None:
                    continue
                y = np.asarray(m[panel.column], dtype=float)
                x0, x1 = np.asarray(m["step_a"]), np.asarray(m["step_b"])
                if panel.select is not None:  # NaN, not dropped: the other pairs still tie the windows together
                    keep = panel.select(m)
                    if not keep.any():
                        continue
                    y = np.where(keep, y, np.nan)
                if panel.smooth and len(x0):
                    # per-update panels: pairs spanning several optimizer steps (sparse records between dense
                    # windows) are chords, not SGD updates; keep the single updates, drawn piece by piece
                    single = (x1 - x0) == np.min(x1 - x0)
                    if not single.all():
                        chords.add(i)
                    x0, x1, y = x0[single], x1[single], y[single]
                if panel.smooth and smoothing_window(len(y)):
                    windows.add(smoothing_window(len(y)))
                plot_series(ax, x0, y, color=color, label=run.label, smooth=panel.smooth,
                            x_end=x1 if panel.smooth else None)
                drawn.add(i)
            if panel.select is not None and not any(
                    r.get(panel.metric) is not None and panel.select(r.get(panel.metric)).any() for r in runs):
                ax.text(0.5, 0.5, "no update of the selected pairs has one", transform=ax.transAxes, ha="center",
                        va="center", fontsize=9, color="0.35")
            if panel.zero_line:
                ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
            ax.set_title(panel.title, loc="left")
            ax.set_ylabel(panel.ylabel(runs))
        label_bottom_axes(axes, ncols, STEP_LABEL)
        note = None
        if windows:
            k = f"{next(iter(windows))} updates" if len(windows) == 1 else "n/25 updates (n: the run's pairs)"
            note = f"thin: per update; thick: rolling median over {k}"
        if chords:
            gap = "per-update panels: single updates only, no line across gaps between recorded windows"
            note = f"{note}; {gap}" if note else gap
        keep = sorted(drawn)
        add_run_legend(fig, [runs[i] for i in keep], [colors[i] for i in keep], note)
        fig.suptitle("Training dynamics along the recorded path", fontsize=11.5)
    return fig
