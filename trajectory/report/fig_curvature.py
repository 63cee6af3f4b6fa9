"""Curvature over training (``hessian_top``, ``hessian_trace``, ``sharpness``) and the Hessian spectrum
(``hessian_esd``).

The curvature metrics measure at one point per selected pair: the record θ_t (``at=record``) or the valley floor
θ(a*) (``at=floor``); the points are placed on the step axis at s_a + a·(s_b − s_a) with the stored ``a``.
λ_max·lr/(2 + 2β) is drawn against 1: SGD with heavy-ball momentum β on a quadratic is stable only while
λ_max < (2 + 2β)/lr ("edge of stability", Cohen et al. 2021, with its appendix on momentum; 2/lr without momentum).
The metrics store it as ``eos_ratio`` with β from the recorded optimizer.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .errors import ReportError
from .load import MetricData, Run, as_runs
from .plotting import STEP_LABEL, add_run_legend, label_bottom_axes, new_figure, panel_grid, run_colors, style

__all__ = ["curvature_figure", "esd_figure", "CURVATURE_METRICS"]

CURVATURE_METRICS = ("hessian_top", "hessian_trace", "hessian_esd", "sharpness", "update_alignment")


def _x(m: MetricData) -> np.ndarray:
    a = np.nan_to_num(np.asarray(m.arrays.get("a", np.zeros(m.rows)), dtype=float))
    return m["step_a"] + a * (m["step_b"] - m["step_a"])


def _top(run: Run) -> MetricData | None:
    """λ_max source: hessian_top, else the λ_max sharpness computes."""
    return run.get("hessian_top") or run.get("sharpness")


def _where(runs: Sequence[Run]) -> str:
    ats = {str(m.config.get("options", {}).get("at", "record")) for r in runs for k, m in r.metrics.items()
           if k in CURVATURE_METRICS}
    return {"record": r"at the records $\theta_t$", "floor": r"at the valley floors $\theta(a^*)$"}.get(next(iter(ats)), "") if len(ats) == 1 else "at records or floors (per run)"


def curvature_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """Top Hessian eigenvalue, Hessian trace, λ_max·lr/(2 + 2β) against 1, and ε-sharpness, over training.

    Panels appear for the metrics present. Raises :class:`~trajectory.report.errors.ReportError` when no run has
    ``hessian_top``, ``hessian_trace`` or ``sharpness`` rows.
    """
    runs = as_runs(runs)
    panels = []
    if any(_top(r) is not None for r in runs):
        panels += ["lambda_max", "eos"]
    if any(r.has("hessian_trace") for r in runs):
        panels.insert(1 if panels else 0, "trace")
    if any(r.has("sharpness") for r in runs):
        panels.append("eps")
    if any(r.has("update_alignment") for r in runs):
        panels.append("align")
    if not panels:
        raise ReportError("no hessian_top, hessian_trace, sharpness or update_alignment rows to draw")
    colors = run_colors(len(runs))
    with style():
        fig, axes, ncols = panel_grid(len(panels))
        drawn: set[int] = set()
        for ax, panel in zip(axes, panels):
            for i, (run, color) in enumerate(zip(runs, colors)):
                if _draw(ax, panel, run, color):
                    drawn.add(i)
            if panel == "lambda_max":
                ax.set_title(r"Top eigenvalue of the Hessian $\nabla^2 L(\theta)$", loc="left")
                ax.set_ylabel(r"$\lambda_\max$ (loss per unit $\theta^2$)")
            elif panel == "trace":
                ax.set_title("Hessian trace (± 1 standard error)", loc="left")
                ax.set_ylabel(r"$\mathrm{tr}\,\nabla^2 L$ (loss per unit $\theta^2$)")
            elif panel == "eos":
                ax.axhline(1.0, color="crimson", lw=1.0, ls="--")
                ax.text(0.01, 1.0, r" $\lambda_\max = (2 + 2\beta)/\eta$ (edge of stability)", color="crimson", fontsize=8.5,
                        transform=ax.get_yaxis_transform(), va="bottom", ha="left")
                ax.set_title(r"Sharpness relative to the learning rate $\eta$", loc="left")
                ax.set_ylabel(r"$\lambda_\max \cdot \eta / (2 + 2\beta)$")
                lo, hi = ax.get_ylim()
                ax.set_ylim(min(0.0, lo), max(1.2, hi))
            elif panel == "align":
                ks = sorted({int(m.config.get("options", {}).get("k", 0)) for r in runs
                             if (m := r.get("update_alignment")) is not None})
                k = str(ks[0]) if len(ks) == 1 else "k"
                ax.set_title(f"Share of each update in the top-{k} Hessian eigenspace", loc="left")
                ax.set_ylabel(r"$\Vert V_k^\top \Delta\theta\Vert / \Vert\Delta\theta\Vert$")
                lo, hi = ax.get_ylim()
                ax.set_ylim(0.0, max(hi, 0.05))
            elif panel == "eps":
                ax.set_title("ε-sharpness (Keskar et al.)", loc="left")
                ax.set_ylabel(r"$100\,(L_\max - L) / (1 + L)$ (%)")
        label_bottom_axes(axes, ncols, STEP_LABEL)
        keep = sorted(drawn)
        add_run_legend(fig, [runs[i] for i in keep], [colors[i] for i in keep])
        fig.suptitle(f"Curvature over training, measured {_where(runs)}", fontsize=11.5)
    return fig


def _draw(ax: Axes, panel: str, run: Run, color: str) -> bool:
    """Draw one run on one panel; False when the run has no rows for it."""
    marker = dict(marker="o", ms=3.5, lw=1.2, color=color)
    if panel in ("lambda_max", "eos"):
        m = _top(run)
        if m is None:
            return False
        y = m["lambda_max"] if panel == "lambda_max" else _eos(run, m)
        ax.plot(_x(m), y, **marker)
    elif panel == "trace":
        m = run.get("hessian_trace")
        if m is None:
            return False
        ax.errorbar(_x(m), m["trace"], yerr=np.nan_to_num(m["trace_se"]), capsize=2, elinewidth=0.8, **marker)
    elif panel == "eps":
        m = run.get("sharpness")
        if m is None:
            return False
        ax.plot(_x(m), m["eps_sharpness"], **marker)
    elif panel == "align":
        m = run.get("update_alignment")
        if m is None:
            return False
        ax.plot(_x(m), m["top_fraction"], **marker)
        # a random direction's expected share (dotted, same colour): the no-alignment baseline
        ax.plot(_x(m), m["random_fraction"], color=marker.get("color"), lw=0.9, ls=":")
    return True


def _eos(run: Run, m: MetricData) -> np.ndarray:
    """λ_max·lr/(2 + 2β) as stored; where the lr was not recorded, the run's geometry lr or its known lr, with β the
    stored ``momentum`` (metric version 2) or the run's known momentum (0 if none)."""
    eos = np.asarray(m["eos_ratio"], dtype=float).copy()
    missing = ~np.isfinite(eos)
    if missing.any():
        geo = run.get("geometry")
        lr = np.full(m.rows, float(run.hyper.get("lr", np.nan)))
        if geo is not None:
            pos = {int(p): float(v) for p, v in zip(geo["pair"], geo["lr"])}
            lr = np.array([pos.get(int(p), lr[j]) for j, p in enumerate(m["pair"])])
        beta = np.full(m.rows, float(run.hyper.get("momentum") or 0.0))
        if "momentum" in m.arrays:
            stored = np.asarray(m["momentum"], dtype=float)
            beta = np.where(np.isfinite(stored), stored, beta)
        eos[missing] = np.asarray(m["lambda_max"], dtype=float)[missing] * lr[missing] / (2.0 + 2.0 * beta[missing])
    return eos


def esd_figure(runs: Sequence[Run | str] | Run | str, max_curves: int = 6) -> Figure:
    """Hessian eigenvalue density (stochastic Lanczos quadrature) at up to ``max_curves`` points per run.

    One panel per run with ``hessian_esd`` rows; curves coloured by optimizer step, density on a log scale.
    """
    runs = [r for r in as_runs(runs) if r.has("hessian_esd")]
    if not runs:
        raise ReportError("no hessian_esd rows to draw")
    cmap = matplotlib.colormaps["viridis"]
    with style():
        fig = new_figure(11.0, 0.8 + 3.0 * len(runs))
        axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
        for ax, run in zip(axes, runs):
            m = run.metrics["hessian_esd"]
            ok = np.flatnonzero(np.isfinite(m["grid_lo"]) & np.isfinite(m["grid_hi"]))
            pick = ok[np.unique(np.linspace(0, len(ok) - 1, min(max_curves, len(ok))).round().astype(int))] if len(ok) else ok
            x_all = _x(m)
            lo_s, hi_s = (float(x_all[pick].min()), float(x_all[pick].max())) if len(pick) else (0.0, 1.0)
            norm = matplotlib.colors.Normalize(lo_s, hi_s if hi_s > lo_s else lo_s + 1)
            for j in pick:
                dens = np.asarray(m["density"][j], dtype=float)
                grid = np.linspace(float(m["grid_lo"][j]), float(m["grid_hi"][j]), len(dens))
                floor = max(float(np.nanmax(dens)) * 1e-6, 1e-300) if np.isfinite(dens).any() else 1e-12
                ax.plot(grid, np.clip(dens, floor, None), color=cmap(norm(x_all[j])), lw=1.3, label=f"step {x_all[j]:g}")
            ax.set_yscale("log")
            ax.set_xlabel("Hessian eigenvalue λ")
            ax.set_ylabel("spectral density (log scale)")
            ax.set_title(f"{run.label}: eigenvalue density (SLQ, Gaussian broadening)", loc="left")
            if len(pick):
                ax.legend(loc="upper right", fontsize=8, ncols=2 if len(pick) > 3 else 1, framealpha=0.85)
        fig.suptitle("Hessian spectrum at selected points", fontsize=11.5)
    return fig
