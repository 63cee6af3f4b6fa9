"""Shared drawing helpers: one style, colours per run, axis labels with units, smoothing, saving.

Figures are plain :class:`matplotlib.figure.Figure` objects drawn by the Agg/PDF canvases: no pyplot, so a report
never opens a window, never touches a notebook's current figure, and leaks no global state (the style is applied
with ``rc_context`` only while a figure is built and saved).
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .load import Run

__all__ = [
    "STYLE", "STEP_LABEL", "style", "new_figure", "run_colors", "loss_label", "rolling_median", "plot_series",
    "add_run_legend", "save_figure", "png_bytes",
]

#: rc settings applied while a report figure is built and saved.
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays selectable and editable
    "figure.dpi": 100,
}

STEP_LABEL = "optimizer step"


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The report's style, for the duration of the block only."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout (labels and legends never overlap), attached to no window manager."""
    return Figure(figsize=(width, height), layout="constrained")


def run_colors(n: int) -> list[str]:
    """Distinct colours for n runs (tab10, then tab20)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def loss_label(runs: Sequence[Run], what: str = "loss") -> str:
    """``loss (cross-entropy, nats)`` or ``loss (mean squared error)``, from the runs' configurations."""
    names = {r.loss_name for r in runs}
    if names == {"mse"}:
        return f"{what} (mean squared error)"
    if names == {"cross_entropy"}:
        return f"{what} (cross-entropy, nats)"
    return f"{what} (per run: cross-entropy in nats / MSE)"


def rolling_median(y: np.ndarray, k: int) -> np.ndarray:
    """Centred rolling median over k points (odd), ignoring NaNs; the ends use the points available."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    if n == 0 or k <= 1:
        return y.copy()
    h = k // 2
    pad = np.concatenate([np.full(h, np.nan), y, np.full(h, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(pad, 2 * h + 1)
    out = np.full(n, np.nan)
    has = np.isfinite(windows).any(axis=1)
    if has.any():
        out[has] = np.nanmedian(windows[has], axis=1)
    return out


def smoothing_window(n: int) -> int:
    """Points of the rolling median drawn over a noisy per-pair series of n points (0: none)."""
    if n < 40:
        return 0
    k = max(5, n // 25)
    return k + 1 - k % 2


def panel_grid(n_panels: int) -> tuple[Figure, list[Axes], int]:
    """A figure of ``n_panels`` panels, two per row, sharing the step axis (spare cells removed).
    Call inside :func:`style`. Returns the figure, the panels' axes and the number of columns."""
    ncols = 2 if n_panels > 1 else 1
    nrows = -(-n_panels // ncols)
    fig = new_figure(11.0, 0.9 + 2.9 * nrows)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels], ncols


def label_bottom_axes(axes: Sequence[Axes], ncols: int, xlabel: str) -> None:
    """Tick labels and the x label on the lowest panel of each column (the cell below may have been removed)."""
    for j, ax in enumerate(axes):
        if j + ncols >= len(axes):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)


def contiguous_runs(step_a: np.ndarray, step_b: np.ndarray) -> list[slice]:
    """Index ranges of pairs that follow each other without a gap (pair j+1 starts where pair j ends)."""
    step_a, step_b = np.asarray(step_a), np.asarray(step_b)
    if len(step_a) == 0:
        return []
    breaks = (np.nonzero(step_a[1:] != step_b[:-1])[0] + 1).tolist()
    edges = [0, *breaks, len(step_a)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def plot_series(ax: Axes, x: np.ndarray, y: np.ndarray, *, color: str, label: str | None, smooth: bool = True,
                marker: str | None = None, x_end: np.ndarray | None = None) -> None:
    """Per-pair values as a thin line, with a thick rolling median on top when the series is long and noisy.

    With ``x_end`` (each pair's last step), pairs that are not contiguous (windows of dense records separated
    by gaps) are drawn as separate pieces and smoothed within each piece, so no line or median bridges a gap."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    k = smoothing_window(len(y)) if smooth else 0
    pieces = contiguous_runs(x, x_end) if x_end is not None else []
    if len(pieces) > 1:
        for j, sl in enumerate(pieces):
            xs, ys = x[sl], y[sl]
            lab = label if j == 0 else None
            kk = k if len(ys) >= max(k, 1) else 0
            if len(ys) == 1:
                ax.plot(xs, ys, color=color, ls="none", marker=marker or "o", ms=3, label=lab)
            elif kk:
                ax.plot(xs, ys, color=color, lw=0.7, alpha=0.3)
                ax.plot(xs, rolling_median(ys, kk), color=color, lw=1.8, label=lab)
            else:
                ax.plot(xs, ys, color=color, lw=1.0, alpha=0.8 if smooth else 1.0, label=lab)
        return
    if k:
        ax.plot(x, y, color=color, lw=0.7, alpha=0.3)
        ax.plot(x, rolling_median(y, k), color=color, lw=1.8, label=label)
    else:
        ax.plot(x, y, color=color, lw=1.3, label=label, marker=marker or ("o" if len(y) <= 30 else None), ms=3)


def add_run_legend(fig: Figure, runs: Sequence[Run], colors: Sequence[str], note: str | None = None) -> None:
    """One legend for the whole figure, below the panels: one entry per run (its label), plus an optional note."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2) for c in colors]
    labels = [r.label for r in runs]
    if note:
        handles.append(Line2D([], [], color="none"))
        labels.append(note)
    ncols = min(len(labels), 3)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)


def save_figure(fig: Figure, base: str | os.PathLike, formats: Sequence[str]) -> list[str]:
    """Write ``base.<fmt>`` for each format; returns the paths written."""
    out = []
    with style():
        for fmt in formats:
            path = f"{os.fspath(base)}.{fmt}"
            fig.savefig(path, format=fmt, metadata=_metadata(fmt))
            out.append(path)
    return out


def _metadata(fmt: str) -> dict[str, Any] | None:
    from .. import __version__

    if fmt == "png":
        return {"Software": f"sgdwalk {__version__}"}
    if fmt in ("pdf", "svg"):
        return {"Creator": f"sgdwalk {__version__}"}
    return None


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (what the HTML page embeds)."""
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png", metadata=_metadata("png"))
    return buf.getvalue()
