"""Interpolation curve: loss and accuracy at θ(a) = θ_t + a·(θ_{t+1} − θ_t) on a grid of a, with the standard
error of each point's loss (``loss_se``, from the per-unit losses: :mod:`~trajectory.analysis.stderr`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..metric import Metric
from ..options import parse_alphas
from ..stderr import mean_se

__all__ = ["Interpolation"]


class Interpolation(Metric):
    """Columns: ``loss`` (len(alphas),), ``acc`` (len(alphas),), ``loss_se`` (len(alphas),): standard error of each
    mean loss over the evaluation units (samples, or BatchNorm groups under ``--bn train``; NaN with fewer than 2
    units). The grid is in the configuration. Version 2 (issue 13): ``loss_se`` added, and ``--bn train`` groups
    are true batches of a seeded permutation (values of BatchNorm models changed)."""

    name = "interpolation"
    version = 2
    defaults = {"alphas": parse_alphas(None)}
    description = "loss and accuracy along each update's segment"

    def validate(self) -> None:
        self.options["alphas"] = parse_alphas(self.options["alphas"])

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        al = self.options["alphas"]
        curves = ctx.evaluate_segments([(u[0], al) for u in units], units=True)
        return [{"loss": loss, "acc": acc, "loss_se": np.asarray(mean_se(per), dtype=np.float64).reshape(len(al))}
                for loss, acc, per in curves]

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """One model evaluation per grid point and unit (exact)."""
        return float(len(units) * len(self.options["alphas"]) * ctx.eval_size)

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        loss = rows["loss"]
        if len(loss) == 0:
            return {}
        al = [float(v) for v in self.options["alphas"]]
        start = loss[:, al.index(0.0)] if 0.0 in al and len(al) == loss.shape[1] else np.full(len(loss), np.nan)
        with np.errstate(all="ignore"):  # L(θ_t) is the grid point a = 0, not the first one (--alphas=-0.5:1.5:41)
            return {"nonfinite_pairs": int((~np.isfinite(loss)).any(axis=1).sum()),
                    "median_loss_start": float(np.nanmedian(start)) if np.isfinite(start).any() else float("nan"),
                    **({"median_loss_se": float(np.nanmedian(rows["loss_se"])) if np.isfinite(rows["loss_se"]).any()
                        else float("nan")} if "loss_se" in rows else {})}
