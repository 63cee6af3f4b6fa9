"""Barriers along the valley floor: barrier and dip over training per span, the fraction of spans with one, and
the peaks of the floor-loss sequence.

The paper's question is whether SGD, moving from floor to floor, crosses barriers. The top-left panel shows
``barrier = max(path) − max(ends)`` on the straight path between floor points k records apart, per span k (line
style) and run (colour), with the ``barrier_tol`` threshold that decides ``has_barrier`` as a dashed line, and
below zero, faint, ``−dip`` (``dip = min(ends) − min(path)``: how far the path falls below both floors). The
top-right panel shows the fraction of (finite) spans with a barrier (solid) and with a dip (hatched), per span and
run. The bottom panel shows the floor loss of each update along training, with the peaks of that sequence
marked and their prominence drawn as a vertical bar down to the higher base (:func:`scipy.signal.find_peaks`;
:func:`~trajectory.analysis.metrics.barriers.floor_peaks`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..analysis.metrics.barriers import floor_peaks
from .errors import ReportError
from .load import Run, as_runs
from .plotting import STEP_LABEL, loss_label, new_figure, run_colors, style

__all__ = ["barriers_figure"]

_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v"]


def barriers_figure(runs: Sequence[Run | str] | Run | str) -> Figure:
    """Barrier height over training (per span) and barrier fraction per span; runs in colours.

    Raises :class:`~trajectory.report.errors.ReportError` when no run has barrier rows.
    """
    runs = as_runs(runs)
    have = [(r, c) for r, c in zip(runs, run_colors(len(runs))) if r.has("barriers")]
    if not have:
        raise ReportError("no barrier rows to draw")
    spans = sorted({int(k) for r, _ in have for k in np.unique(r.metrics["barriers"]["span"])})
    with style():
        floors = [(r, c) for r, c in have if r.has("floor")]
        fig = new_figure(11.0, 7.4 if floors else 4.2)
        if floors:
            mosaic = fig.subplot_mosaic([["bar", "frac"], ["floor", "floor"]], width_ratios=[2.2, 1])
            ax, bx, cx = mosaic["bar"], mosaic["frac"], mosaic["floor"]
        else:
            ax, bx = fig.subplots(1, 2, width_ratios=[2.2, 1])
            cx = None
        dips_drawn = False
        tols = set()
        for run, color in have:
            ba = run.metrics["barriers"]
            tols.add(float(ba.config.get("options", {}).get("barrier_tol", 1e-3)))
            for j, k in enumerate(spans):
                sel = ba["span"] == k
                if not sel.any():
                    continue
                n = int(sel.sum())
                ax.plot(ba["step_a"][sel], ba["barrier"][sel], color=color, ls=_STYLES[j % len(_STYLES)], lw=1.1,
                        marker=_MARKERS[j % len(_MARKERS)] if n <= 40 else None, ms=3)
                if "dip" in ba.arrays:  # barriers v2: −dip below the axis, faint
                    ax.plot(ba["step_a"][sel], -np.asarray(ba["dip"][sel], dtype=float), color=color,
                            ls=_STYLES[j % len(_STYLES)], lw=0.9, alpha=0.45, gid="dip")
                    dips_drawn = True
        for t in sorted(tols):
            ax.axhline(t, color="0.3", lw=0.9, ls=(0, (5, 3)))
        ax.set_xlabel(STEP_LABEL + " (first record of the span)")
        ax.set_ylabel(loss_label([r for r, _ in have], "barrier height").replace("(cross-entropy, nats)", "(nats)"))
        ax.set_title("Barrier (above 0) and −dip (below) between floor points k records apart" if dips_drawn
                     else "Barrier between floor points k records apart", loc="left")
        values = np.concatenate([np.asarray(r.metrics["barriers"]["barrier"], dtype=float) for r, _ in have])
        values = values[np.isfinite(values)]
        vmin = float(values.min()) if len(values) else 0.0
        vmax = float(values.max()) if len(values) else 0.0
        top = max(max(tols) * 3, vmax * 1.08)
        dips = np.concatenate([np.asarray(r.metrics["barriers"]["dip"], dtype=float) for r, _ in have
                               if "dip" in r.metrics["barriers"].arrays] or [np.zeros(0)])
        dips = dips[np.isfinite(dips)]
        dmax = float(dips.max()) if len(dips) else 0.0
        ax.set_ylim(min(vmin, -dmax * 1.08, 0.0) - 0.04 * top, top)  # keeps a line of zeros visible above the x axis
        if dips_drawn:
            ax.axhline(0.0, color="0.5", lw=0.7)
        above = int(sum(np.sum(np.asarray(r.metrics["barriers"]["has_barrier"], dtype=bool)) for r, _ in have))
        ax.text(0.01, 0.97, f"{above} of {len(values)} spans above the threshold; largest barrier {vmax:.3g}",
                transform=ax.transAxes, va="top", ha="left", fontsize=8.5, color="0.25",
                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.85))
        handles = [Line2D([], [], color="0.2", ls=_STYLES[j % len(_STYLES)], marker=_MARKERS[j % len(_MARKERS)], ms=3,
                          label=f"span k = {k}") for j, k in enumerate(spans)]
        handles.append(Line2D([], [], color="0.3", ls=(0, (5, 3)), label="threshold barrier_tol"
                              + (f" = {next(iter(tols)):g}" if len(tols) == 1 else "")))
        if dips_drawn:
            handles.append(Line2D([], [], color="0.3", lw=0.9, alpha=0.45, label="−dip (faint)"))
        ax.legend(handles=handles, loc="upper right", framealpha=0.85, fontsize=8.5)

        width = 0.8 / len(have)
        for i, (run, color) in enumerate(have):
            ba = run.metrics["barriers"]
            ok = ~np.asarray(ba["nonfinite"], dtype=bool)
            fr = [float(np.mean(ba["has_barrier"][(ba["span"] == k) & ok])) if ((ba["span"] == k) & ok).any() else np.nan
                  for k in spans]
            xs = np.arange(len(spans)) + (i - (len(have) - 1) / 2) * width
            if "dip" in ba.arrays:  # barrier (left half, solid) and dip (right half, hatched) fractions
                fd = [float(np.mean(ba["has_dip"][(ba["span"] == k) & ok])) if ((ba["span"] == k) & ok).any() else np.nan
                      for k in spans]
                bars = bx.bar(xs - width / 4, np.nan_to_num(fr), width=width * 0.46, color=color, label=run.label)
                dbars = bx.bar(xs + width / 4, np.nan_to_num(fd), width=width * 0.46, color=color, alpha=0.35,
                               hatch="//", gid="dip_fraction")
                bx.bar_label(dbars, labels=["n/a" if np.isnan(f) else f"{f:.2f}" for f in fd], fontsize=7, padding=1.5,
                             color=color)
            else:
                bars = bx.bar(xs, np.nan_to_num(fr), width=width * 0.92, color=color, label=run.label)
            bx.bar_label(bars, labels=["n/a" if np.isnan(f) else f"{f:.2f}" for f in fr], fontsize=8, padding=1.5, color=color)
        bx.set_xticks(np.arange(len(spans)), [str(k) for k in spans])
        bx.set_xlabel("span k (records)")
        bx.set_ylabel("fraction of spans")
        bx.set_ylim(0, 1.12)
        bx.set_title("Barrier (solid) and dip (hatched) fraction" if dips_drawn else "Barrier fraction per span",
                     loc="left")
        if cx is not None:
            _floor_panel(cx, floors)
        if len(have) > 1:
            fig.legend(handles=[Line2D([], [], color=c, lw=2) for _, c in have], labels=[r.label for r, _ in have],
                       loc="outside lower center", ncols=min(len(have), 3), frameon=False)
        fig.suptitle("Barriers along the valley floor", fontsize=11.5)
    return fig


def _floor_panel(cx, floors) -> None:
    """Floor loss per update over training, peaks of the sequence marked, prominence as a bar down to the base."""
    total, largest = 0, 0.0
    for run, color in floors:
        fl = run.metrics["floor"]
        order = np.argsort(np.asarray(fl["step_a"]))
        x = np.asarray(fl["step_a"], dtype=float)[order]
        y = np.asarray(fl["floor_loss"], dtype=float)[order]
        cx.plot(x, y, color=color, lw=1.0, alpha=0.8, marker="o" if len(y) <= 40 else None, ms=2.5)
        idx, prom, _, _ = floor_peaks(y)
        if len(idx):
            cx.plot(x[idx], y[idx], ls="none", marker="^", ms=6, color=color, mec="0.15", mew=0.6, gid="floor_peaks")
            cx.vlines(x[idx], y[idx] - prom, y[idx], color=color, lw=2.2, alpha=0.5, gid="prominence")
            largest = max(largest, float(prom.max()))
        total += len(idx)
    cx.set_xlabel(STEP_LABEL)
    cx.set_ylabel(loss_label([r for r, _ in floors], r"$L_\mathrm{floor}$").replace("(cross-entropy, nats)", "(nats)"))
    cx.set_title("Floor loss of each update: peaks (▲) and their prominence (bar down to the higher base)", loc="left")
    cx.text(0.01, 0.97, f"{total} peaks; largest prominence {largest:.3g}", transform=cx.transAxes, va="top",
            ha="left", fontsize=8.5, color="0.25", bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.85))
