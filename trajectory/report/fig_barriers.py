"""Barriers along the valley floor: barrier height over training per span, and the fraction of spans with one.

The paper's question is whether SGD, moving from floor to floor, crosses barriers. The left panel shows
``barrier = max(path) − max(ends)`` on the straight path between floor points k records apart, per span k (line
style) and run (colour), with the ``barrier_tol`` threshold that decides ``has_barrier`` as a dashed line; the
right panel shows the fraction of (finite) spans above it, per span and run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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
        fig = new_figure(11.0, 4.2)
        ax, bx = fig.subplots(1, 2, width_ratios=[2.2, 1])
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
        for t in sorted(tols):
            ax.axhline(t, color="0.3", lw=0.9, ls=(0, (5, 3)))
        ax.set_xlabel(STEP_LABEL + " (first record of the span)")
        ax.set_ylabel(loss_label([r for r, _ in have], "barrier height").replace("(cross-entropy, nats)", "(nats)"))
        ax.set_title("Barrier between floor points k records apart", loc="left")
        values = np.concatenate([np.asarray(r.metrics["barriers"]["barrier"], dtype=float) for r, _ in have])
        values = values[np.isfinite(values)]
        vmin = float(values.min()) if len(values) else 0.0
        vmax = float(values.max()) if len(values) else 0.0
        top = max(max(tols) * 3, vmax * 1.08)
        ax.set_ylim(min(vmin, 0.0) - 0.04 * top, top)  # keeps a line of zeros visible above the x axis
        above = int(sum(np.sum(np.asarray(r.metrics["barriers"]["has_barrier"], dtype=bool)) for r, _ in have))
        ax.text(0.01, 0.97, f"{above} of {len(values)} spans above the threshold; largest barrier {vmax:.3g}",
                transform=ax.transAxes, va="top", ha="left", fontsize=8.5, color="0.25",
                bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.85))
        handles = [Line2D([], [], color="0.2", ls=_STYLES[j % len(_STYLES)], marker=_MARKERS[j % len(_MARKERS)], ms=3,
                          label=f"span k = {k}") for j, k in enumerate(spans)]
        handles.append(Line2D([], [], color="0.3", ls=(0, (5, 3)), label="threshold barrier_tol"
                              + (f" = {next(iter(tols)):g}" if len(tols) == 1 else "")))
        ax.legend(handles=handles, loc="upper right", framealpha=0.85, fontsize=8.5)

        width = 0.8 / len(have)
        for i, (run, color) in enumerate(have):
            ba = run.metrics["barriers"]
            ok = ~np.asarray(ba["nonfinite"], dtype=bool)
            fr = [float(np.mean(ba["has_barrier"][(ba["span"] == k) & ok])) if ((ba["span"] == k) & ok).any() else np.nan
                  for k in spans]
            xs = np.arange(len(spans)) + (i - (len(have) - 1) / 2) * width
            bars = bx.bar(xs, np.nan_to_num(fr), width=width * 0.92, color=color, label=run.label)
            bx.bar_label(bars, labels=["n/a" if np.isnan(f) else f"{f:.2f}" for f in fr], fontsize=8, padding=1.5, color=color)
        bx.set_xticks(np.arange(len(spans)), [str(k) for k in spans])
        bx.set_xlabel("span k (records)")
        bx.set_ylabel("fraction of spans with a barrier")
        bx.set_ylim(0, 1.12)
        bx.set_title("Barrier fraction per span", loc="left")
        if len(have) > 1:
            fig.legend(handles=[Line2D([], [], color=c, lw=2) for _, c in have], labels=[r.label for r, _ in have],
                       loc="outside lower center", ncols=min(len(have), 3), frameon=False)
        fig.suptitle("Barriers along the valley floor", fontsize=11.5)
    return fig
