"""Optimizer-aware analysis (``optimizer`` metric): stability against the recorded optimizer's own threshold, and the
update taken apart with the recorded optimizer state. Runs are overlaid; SGD and Adam runs share the panels, each
drawing the columns its optimizer has (the other optimizer's columns are NaN and draw nothing).

Why one figure: the four questions belong together for a momentum or Adam run - how close each update is to the
edge of stability of *that* optimizer, what curvature that is measured on, how much of the update is the
optimizer's memory rather than the current gradient, and whether the replay reproduces the training gradient.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .fig_gradients import _panels, _x
from .load import MetricData, Run, as_runs

__all__ = ["optimizer_figure"]

_PANELS = (
    ("ratio", "Sharpness / stability threshold (1: the edge)", "eos ratio"),
    ("sharp", r"$\lambda_\max(H)$ (SGD) or $\lambda_\max(P^{-1}H)$ (Adam); threshold dashed", "curvature"),
    ("split", r"Split (solid/dashed): SGD momentum/gradient part; Adam $\Delta\theta$/lr$P^{-1}g$", "norm"),
    ("replay", r"Replay check $\Vert g_\mathrm{opt} - g_B\Vert / \Vert g_B\Vert$", "relative error"),
)


def _col(m: MetricData, name: str) -> np.ndarray:
    return np.asarray(m[name], dtype=float)


def _draw(ax, key: str, m: MetricData, color: str) -> bool:
    x = _x(m)
    sgd = np.isfinite(_col(m, "lambda_max")).any()
    if key == "ratio":
        ax.plot(x, _col(m, "eos_ratio"), color=color, lw=1.2, marker="o", ms=2.5)
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    elif key == "sharp":
        ax.plot(x, _col(m, "lambda_max" if sgd else "precond_lambda_max"), color=color, lw=1.2, marker="o", ms=2.5)
        ax.plot(x, _col(m, "eos_threshold"), color=color, lw=1.0, ls="--")
        ys = np.concatenate([_col(m, "lambda_max" if sgd else "precond_lambda_max"), _col(m, "eos_threshold")])
        if np.nanmin(ys, initial=np.inf) > 0:
            ax.set_yscale("log")
    elif key == "split":
        a, b = ("mom_norm", "grad_part_norm") if sgd else ("update_norm", "precond_step_norm")
        ya, yb = _col(m, a), _col(m, b)
        if (np.concatenate([ya, yb]) > 0).any():
            ax.set_yscale("log")  # the momentum part of SGD's first update is 0: not drawn
            ya, yb = np.where(ya > 0, ya, np.nan), np.where(yb > 0, yb, np.nan)
        ax.plot(x, ya, color=color, lw=1.2)
        ax.plot(x, yb, color=color, lw=1.0, ls="--")
    else:
        err = _col(m, "rel_err_gopt")
        if not np.isfinite(err).any():
            return False
        ax.plot(x, np.maximum(err, 1e-17), color=color, lw=1.2, marker="o", ms=2.5)
        ax.set_yscale("log")
    return True


def optimizer_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """eos ratio against the recorded optimizer's threshold, the curvature and threshold, the update split (SGD: momentum
    vs gradient part; Adam: step vs lr·‖P⁻¹g‖) and the replay check of the recovered gradient, over training."""
    return _panels(as_runs(runs), "optimizer", _PANELS, "Optimizer-aware analysis: stability and the update split", _draw)
