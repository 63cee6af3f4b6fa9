"""Barriers along the valley floor.

Floor points φ_t = θ(a*_t) (buffers interpolated likewise); for each span k the path φ_t → φ_{t+k} is
sampled at ``barrier_points`` evenly spaced points (ends included) on the data of pair t, and

    barrier = max(path) − max(path ends)

``has_barrier`` is ``barrier > barrier_tol`` (absolute, in loss units). Units are (t, k) with both
pair t and pair t+k among the selected pairs (k counts records).

Columns: ``barrier``, ``has_barrier``, ``beta_max`` (position of the path maximum in [0, 1]),
``path_loss`` (barrier_points,), ``nonfinite``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import AnalysisError
from ..metric import Metric
from ..options import parse_spans

__all__ = ["Barriers"]


class Barriers(Metric):
    name = "barriers"
    version = 1
    requires = ("floor",)
    keys = ("pair", "span")
    unit_options = ("spans",)
    defaults = {"spans": [1], "barrier_points": 11, "barrier_tol": 1e-3}
    description = "barriers between valley-floor points k records apart"

    def validate(self) -> None:
        o = self.options
        o["spans"] = parse_spans(o["spans"])
        o["barrier_points"] = int(o["barrier_points"])
        o["barrier_tol"] = float(o["barrier_tol"])
        if o["barrier_points"] < 3:
            raise AnalysisError("barrier_points must be >= 3")

    def units(self, pairs: Sequence[int]) -> list[tuple[int, ...]]:
        have = set(int(p) for p in pairs)
        return [(int(p), k) for p in pairs for k in self.options["spans"] if int(p) + k in have]

    def needs(self, unit: tuple[int, ...]) -> Sequence[int]:
        return (unit[0], unit[0] + unit[1])

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        n = self.options["barrier_points"]
        betas = np.linspace(0.0, 1.0, n)
        firsts = [u[0] for u in units]
        lasts = [u[0] + u[1] for u in units]
        fa = ctx.rows("floor", firsts)["a_star"]
        fb = ctx.rows("floor", lasts)["a_star"]
        lines, idx = [], []
        rows: list[dict[str, Any] | None] = [None] * len(units)
        for k, (u, a1, a2) in enumerate(zip(units, fa, fb)):
            if not (np.isfinite(a1) and np.isfinite(a2)):
                rows[k] = {"barrier": np.nan, "has_barrier": False, "beta_max": np.nan, "path_loss": np.full(n, np.nan), "nonfinite": True}
                continue
            t, t2 = u[0], u[0] + u[1]
            phi_a = ctx.line(ctx.state(t), ctx.state(t + 1), [float(a1)])[0]
            phi_b = ctx.line(ctx.state(t2), ctx.state(t2 + 1), [float(a2)])[0]
            lines.append((phi_a, phi_b, betas, t))
            idx.append(k)
        for k, (loss, _acc) in zip(idx, ctx.evaluate_lines(lines)):
            if not np.all(np.isfinite(loss)):
                rows[k] = {"barrier": np.nan, "has_barrier": False, "beta_max": np.nan, "path_loss": loss, "nonfinite": True}
                continue
            j = int(np.argmax(loss))
            b = float(loss[j] - max(loss[0], loss[-1]))
            rows[k] = {"barrier": b, "has_barrier": bool(b > self.options["barrier_tol"]), "beta_max": float(betas[j]),
                       "path_loss": loss, "nonfinite": False}
        return rows  # type: ignore[return-value]

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """``barrier_points`` model evaluations per unit (exact; units whose floor is NaN cost nothing, counted anyway)."""
        return float(len(units) * self.options["barrier_points"] * ctx.eval_size)

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        spans = rows["span"]
        for k in np.unique(spans):
            sel = (spans == k) & ~rows["nonfinite"].astype(bool)
            out[f"span{int(k)}"] = {
                "spans": int((spans == k).sum()),
                "barrier_fraction": float(np.mean(rows["has_barrier"][sel])) if sel.any() else float("nan"),
                "median_barrier": float(np.median(rows["barrier"][sel])) if sel.any() else float("nan"),
            }
        return out
