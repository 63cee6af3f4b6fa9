"""Gradient dynamics (``gradients``), the eigen-direction split of each update (``eigen_split``) and per-layer views
(``per_layer``), over training. Runs are overlaid; each panel appears only when some run has its metric.

Why three small figures and not one: each answers its own question (how the step relates to the gradient and its
noise; how much of each bounce lies in the sharp directions; which layers move and carry the loss change).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .errors import ReportError
from .load import MetricData, Run, as_runs
from .plotting import STEP_LABEL, add_run_legend, label_bottom_axes, panel_grid, run_colors, style

__all__ = ["gradients_figure", "eigen_split_figure", "per_layer_figure"]


def _x(m: MetricData) -> np.ndarray:
    return np.asarray(m["step_a"], dtype=float)


def _panels(runs: list[Run], metric: str, specs: Sequence[tuple[str, str, str]], suptitle: str, draw) -> Figure:
    have = [r for r in runs if r.has(metric)]
    if not have:
        raise ReportError(f"no {metric} rows to draw")
    colors = run_colors(len(runs))
    with style():
        fig, axes, ncols = panel_grid(len(specs))
        drawn: set[int] = set()
        for ax, (key, title, ylabel) in zip(axes, specs):
            for i, (run, color) in enumerate(zip(runs, colors)):
                m = run.get(metric)
                if m is not None and draw(ax, key, m, color):
                    drawn.add(i)
            ax.set_title(title, loc="left")
            ax.set_ylabel(ylabel)
        label_bottom_axes(axes, ncols, STEP_LABEL)
        keep = sorted(drawn)
        add_run_legend(fig, [runs[i] for i in keep], [colors[i] for i in keep])
        fig.suptitle(suptitle, fontsize=11.5)
    return fig


_GRAD_PANELS = (
    ("norms", r"Gradient norms: full batch $g$ (solid), recorded minibatch $g_B$ (dashed)", r"$\Vert g\Vert$, $\Vert g_B\Vert$"),
    ("cos", r"$\cos(\Delta\theta, -g)$ (solid) and $\cos(g_B, g)$ (dashed)", "cosine"),
    ("bsimple", r"Gradient noise scale $B_\mathrm{simple} = \mathrm{tr}\,\Sigma / \Vert g\Vert^2$", r"$B_\mathrm{simple}$ (samples)"),
    ("change", r"Loss change: actual (solid), $g\cdot\Delta\theta$ ± SE (dashed)", r"$\Delta L$"),
)


def _draw_grad(ax, key: str, m: MetricData, color: str) -> bool:
    x = _x(m)
    if key == "norms":
        ax.plot(x, m["grad_norm"], color=color, lw=1.2)
        ax.plot(x, m["grad_b_norm"], color=color, lw=1.0, ls="--")
    elif key == "cos":
        ax.plot(x, m["cos_update"], color=color, lw=1.2)
        ax.plot(x, m["cos_gb_g"], color=color, lw=1.0, ls="--")
        ax.axhline(0.0, color="0.6", lw=0.8)
    elif key == "bsimple":
        ax.plot(x, m["b_simple"], color=color, lw=1.2, marker="o", ms=2.5)
        if np.nanmin(np.asarray(m["b_simple"], dtype=float), initial=np.inf) > 0:
            ax.set_yscale("log")
    else:
        ax.plot(x, m["actual_change"], color=color, lw=1.2)
        ax.errorbar(x, m["pred_change"], yerr=np.nan_to_num(np.asarray(m["pred_change_se"], dtype=float)), color=color,
                    lw=1.0, ls="--", capsize=1.5, elinewidth=0.6)
        ax.axhline(0.0, color="0.6", lw=0.8)
    return True


def gradients_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """Gradient norms, cos(Δθ, −g) and cos(g_B, g), B_simple and the first-order vs actual loss change over training."""
    return _panels(as_runs(runs), "gradients", _GRAD_PANELS, r"Gradient dynamics at the records $\theta_t$", _draw_grad)


_SPLIT_PANELS = (
    ("share", "Share of the height above the floor: top-k (solid), rest (dashed)", "depth share"),
    ("fraction", "Squared length share in the top-k space", r"$\Vert d_\mathrm{top}\Vert^2/\Vert d\Vert^2$"),
    ("heights", "End-point change: full (solid), top (dashed), rest (dotted)", r"$\Delta L$"),
)


def _draw_split(ax, key: str, m: MetricData, color: str) -> bool:
    x = _x(m)
    if key == "share":  # results of eigen_split version 1 have no depth columns: their end-point shares instead
        top, rest = ("depth_share_top", "depth_share_rest") if "depth_share_top" in m.arrays else ("share_top", "share_rest")
        ax.plot(x, m[top], color=color, lw=1.2)
        ax.plot(x, m[rest], color=color, lw=1.0, ls="--")
        ax.axhline(0.0, color="0.6", lw=0.8)
    elif key == "fraction":
        ax.plot(x, m["top_fraction"], color=color, lw=1.2, marker="o", ms=2.5)
        ax.set_ylim(0.0, 1.02)
    else:
        ax.plot(x, m["height_full"], color=color, lw=1.2)
        ax.plot(x, m["height_top"], color=color, lw=1.0, ls="--")
        ax.plot(x, m["height_rest"], color=color, lw=1.0, ls=":")
        ax.axhline(0.0, color="0.6", lw=0.8)
    return True


def eigen_split_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """How each update splits between the top-k Hessian eigenspace and the rest, and the loss each part carries."""
    return _panels(as_runs(runs), "eigen_split", _SPLIT_PANELS, "Eigen-direction split of the updates", _draw_split)


_LAYER_PANELS = (
    ("step", "Step length per group (shade: index)", "step length"),
    ("dist", "Distance from the first record per group", "distance"),
    ("height", "Loss change, one group moved alone", r"$\Delta L_j$"),
)


def _draw_layer(ax, key: str, m: MetricData, color: str) -> bool:
    x = _x(m)
    col = {"step": "step_length", "dist": "dist_init", "height": "layer_height"}[key]
    y = np.asarray(m[col], dtype=float)
    if y.ndim != 2:
        return False
    g = y.shape[1]
    for j in range(g):
        ax.plot(x, y[:, j], color=color, lw=1.0, alpha=0.35 + 0.65 * (j + 1) / g)
    if key == "height":
        ax.axhline(0.0, color="0.6", lw=0.8)
    return True


def per_layer_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """Per parameter group (layout entries): step length, distance from the first record, one-group loss change."""
    return _panels(as_runs(runs), "per_layer", _LAYER_PANELS, "Per-layer views of the updates", _draw_layer)
