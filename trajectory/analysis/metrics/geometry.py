"""Geometry of the path, from parameters only (buffers excluded, as the authors): no loss evaluation.

Columns: ``step_length`` ‖θ_{t+1} − θ_t‖, ``dist_init`` ‖θ_t − θ_0‖ and ``dist_init_b`` ‖θ_{t+1} − θ_0‖
(θ_0 = the archive's first record), ``cos_prev`` cosine between this update and the previous one
θ_t − θ_{t−1} (NaN for the first record, and NaN when the two pairs span different numbers of optimizer
steps, e.g. a single update next to a chord across a gap between recorded windows: such a cosine compares
unlike things), ``lr`` recorded learning rate of the update (NaN if none). Computed in float64.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..metric import Metric

__all__ = ["Geometry"]


class Geometry(Metric):
    name = "geometry"
    version = 2  # 2: cos_prev is NaN across pairs of different step spans
    uses_data = False
    description = "step length, distance from the first record, cosine of consecutive updates"

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """No model evaluation: parameter vectors only."""
        return 0.0

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        p0 = ctx.params(0)
        steps = ctx.steps
        rows = []
        for (i,) in units:
            pa, pb = ctx.params(i), ctx.params(i + 1)
            d = pb - pa
            step = float(torch.linalg.vector_norm(d))
            if i > 0 and steps[i + 1] - steps[i] == steps[i] - steps[i - 1]:
                prev = pa - ctx.params(i - 1)
                den = float(torch.linalg.vector_norm(prev)) * step
                cos = float(torch.dot(d, prev)) / den if den > 0 else float("nan")
            else:
                cos = float("nan")
            rows.append({
                "step_length": step,
                "dist_init": float(torch.linalg.vector_norm(pa - p0)),
                "dist_init_b": float(torch.linalg.vector_norm(pb - p0)),
                "cos_prev": cos,
                "lr": ctx.lr(i),
            })
        return rows

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        if len(rows["step_length"]) == 0:
            return {}
        with np.errstate(all="ignore"):
            return {
                "median_step_length": float(np.nanmedian(rows["step_length"])),
                "final_dist_init": float(rows["dist_init_b"][-1]),
                "median_cos_prev": float(np.nanmedian(rows["cos_prev"])) if np.isfinite(rows["cos_prev"]).any() else float("nan"),
            }
