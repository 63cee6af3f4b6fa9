"""The numbers of the report's summary table, per run, from the arrays of :class:`~trajectory.report.load.Run`.

Kept apart from the HTML so the numbers can be checked (and reused) as plain floats. Conventions follow the
metrics' own summaries (``sgdwalk show``): fractions and medians of floor columns are over the pairs whose
curve was finite (``nonfinite`` rows excluded), barrier fractions over finite spans.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..analysis.heights import height_split
from ..analysis.metrics.barriers import floor_peaks
from .load import Run

__all__ = ["run_summary", "summary_rows", "format_number"]


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


def _median(x: np.ndarray) -> float | None:
    f = _finite(x)
    return float(np.median(f)) if len(f) else None


def run_summary(run: Run) -> dict[str, Any]:
    """Summary numbers of one run; a key is absent when its metric is (keys: see :func:`summary_rows`)."""
    out: dict[str, Any] = {}
    first = next((run.get(m) for m in ("floor", "interpolation", "geometry") if run.has(m)), None)
    if first is None:
        first = next((m for m in run.metrics.values() if m.rows), None)
    if first is not None:
        out["pairs"] = first.rows
        out["step_first"] = int(first["step_a"].min())
        out["step_last"] = int(first["step_b"].max())
    fl = run.get("floor")
    if fl is not None:
        ok = ~np.asarray(fl["nonfinite"], dtype=bool)
        out["nonfinite_pairs"] = int((~ok).sum())
        if ok.any():
            out["convex_interior_fraction"] = float(np.mean(fl["convex_interior"][ok]))
            out["convex_fraction"] = float(np.mean(fl["convex"][ok]))
            out["interior_fraction"] = float(np.mean(fl["interior"][ok]))
            out["median_a_star"] = float(np.median(fl["a_star"][ok]))
            out["median_height"] = float(np.median(fl["height"][ok]))
            out["mean_height"] = float(np.mean(fl["height"][ok]))
            split = height_split(fl)  # interior floors apart from descent steps (a* at an end)
            out["interior_pairs"] = split["interior_pairs"]
            out["descent_pairs"] = split["descent_pairs"]
            if split["interior_pairs"]:
                out["median_interior_height"] = split["median_interior_height"]
            if split["descent_pairs"]:
                out["median_descent_step"] = split["median_descent_step"]
            order = np.argsort(np.asarray(fl["step_a"]))
            _, prom, _, _ = floor_peaks(np.asarray(fl["floor_loss"], dtype=float)[order])
            out["floor_peaks"] = int(len(prom))
            if len(prom):
                out["max_floor_prominence"] = float(prom.max())
    ba = run.get("barriers")
    if ba is not None:
        spans = ba["span"]
        bad = np.asarray(ba["nonfinite"], dtype=bool)
        for k in np.unique(spans):
            sel = (spans == k) & ~bad
            if sel.any():
                out[f"barrier_fraction_span{int(k)}"] = float(np.mean(ba["has_barrier"][sel]))
                out[f"median_barrier_span{int(k)}"] = float(np.median(ba["barrier"][sel]))
                if "dip" in ba.arrays:  # barriers v2
                    out[f"dip_fraction_span{int(k)}"] = float(np.mean(ba["has_dip"][sel]))
                    out[f"median_dip_span{int(k)}"] = float(np.median(ba["dip"][sel]))
    geo = run.get("geometry")
    if geo is not None:
        final = geo["dist_init_b"][-1]
        out["final_dist_init"] = float(final) if math.isfinite(final) else None
        out["median_step_length"] = _median(geo["step_length"])
        out["median_cos_prev"] = _median(geo["cos_prev"])
    top = run.get("hessian_top") or run.get("sharpness")
    if top is not None:
        lam = _finite(top["lambda_max"])
        if len(lam):
            out["lambda_max_min"] = float(lam.min())
            out["lambda_max_max"] = float(lam.max())
        eos = _finite(top["eos_ratio"])
        if len(eos):
            out["max_eos_ratio"] = float(eos.max())
    tr = run.get("hessian_trace")
    if tr is not None:
        out["median_trace"] = _median(tr["trace"])
    sh = run.get("sharpness")
    if sh is not None:
        out["median_eps_sharpness"] = _median(sh["eps_sharpness"])
    return {k: v for k, v in out.items() if v is not None}


def format_number(v: Any, key: str = "") -> str:
    """Fractions with 3 decimals, counts as integers, everything else with 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if "fraction" in key:
        return f"{v:.3f}"
    return f"{v:.4g}"


_ROWS: list[tuple[str, str]] = [
    ("pairs", "pairs analysed"),
    ("steps", "optimizer steps covered"),
    ("nonfinite_pairs", "pairs with NaN/Inf loss"),
    ("convex_interior_fraction", "fraction convex with interior floor"),
    ("convex_fraction", "fraction convex"),
    ("interior_fraction", "fraction with interior floor"),
    ("median_a_star", "median a* (floor position, 0 = θ_t, 1 = θ_t+1)"),
    ("median_height", "median height above floor (nats)"),
    ("mean_height", "mean height above floor (nats)"),
    ("interior_pairs", "pairs with an interior floor"),
    ("median_interior_height", "median height above an interior floor (nats)"),
    ("descent_pairs", "descent steps (floor at an end)"),
    ("median_descent_step", "median loss decrease of descent steps (nats)"),
    ("floor_peaks", "peaks of the floor-loss sequence"),
    ("max_floor_prominence", "largest floor-peak prominence (nats)"),
    ("barriers", ""),
    ("final_dist_init", "final ‖θ − θ₀‖₂"),
    ("median_step_length", "median step length ‖θ_t+1 − θ_t‖₂"),
    ("median_cos_prev", "median cos(consecutive updates)"),
    ("lambda_max", "λ_max range (min – max)"),
    ("max_eos_ratio", "max λ_max·lr/(2 + 2β) (1 = edge of stability; β: momentum)"),
    ("median_trace", "median Hessian trace"),
    ("median_eps_sharpness", "median ε-sharpness (Keskar, %)"),
]


def summary_rows(runs: Sequence[Run], summaries: Sequence[dict[str, Any]] | None = None) -> list[tuple[str, list[str]]]:
    """(row label, one formatted cell per run) for the rows at least one run has, in a fixed order."""
    sums = list(summaries) if summaries is not None else [run_summary(r) for r in runs]
    mse = all(r.loss_name == "mse" for r in runs) and runs
    rows: list[tuple[str, list[str]]] = []
    spans = sorted({int(k[len("barrier_fraction_span"):]) for s in sums for k in s if k.startswith("barrier_fraction_span")})
    for key, label in _ROWS:
        if key == "steps":
            if any("step_first" in s for s in sums):
                rows.append((label, [f"{s['step_first']}–{s['step_last']}" if "step_first" in s else "–" for s in sums]))
        elif key == "barriers":
            for k in spans:
                fk, mk = f"barrier_fraction_span{k}", f"median_barrier_span{k}"
                rows.append((f"barrier fraction, span {k}", [format_number(s.get(fk), fk) for s in sums]))
                rows.append((f"median barrier, span {k} (nats)" if not mse else f"median barrier, span {k}",
                             [format_number(s.get(mk), mk) for s in sums]))
                dk, dm = f"dip_fraction_span{k}", f"median_dip_span{k}"
                if any(dk in s for s in sums):
                    rows.append((f"dip fraction, span {k}", [format_number(s.get(dk), dk) for s in sums]))
                    rows.append((f"median dip, span {k} (nats)" if not mse else f"median dip, span {k}",
                                 [format_number(s.get(dm), dm) for s in sums]))
        elif key == "lambda_max":
            if any("lambda_max_min" in s for s in sums):
                rows.append((label, [f"{format_number(s['lambda_max_min'])} – {format_number(s['lambda_max_max'])}"
                                     if "lambda_max_min" in s else "–" for s in sums]))
        elif any(key in s for s in sums):
            if mse:
                label = label.replace(" (nats)", "")
            rows.append((label, [format_number(s.get(key), key) for s in sums]))
    return rows
