"""Per-layer views of each update: which parameter groups move, turn and carry the loss change.

Why: one global step length hides that layers move at very different rates (and that normalised layers can turn
while their loss barely changes). Groups are the parameter entries of the archive layout, in layout order
(``sgdwalk info run.h5`` lists them; the report labels them by index). Per pair i and group j (float64,
parameters only):

``step_length``   ‖Δθ_j‖, Δθ = θ_{i+1} − θ_i restricted to group j                     (G,)
``cos_prev``      cos(Δθ_j, θ_i − θ_{i−1} on j); NaN for the first record, for pairs of different step spans
                  (as ``geometry``), and for a zero step                                (G,)
``dist_init``     ‖θ_i − θ_0‖ on group j                                                 (G,)
``layer_loss``    loss at θ_i with group j moved alone along the update, θ_i + a·Δθ_j (every other group and the
                  buffers fixed at θ_i), for a in ``layer_alphas``; flattened group-major  (G·len(layer_alphas),)
``layer_height``  layer_loss at a = 1 minus at a = 0                                      (G,)

The per-layer interpolation evaluates G·len(layer_alphas) states per pair on the run's data (default grid 0, 0.25,
0.5, 0.75, 1), with the run's dtype and BatchNorm policy.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import AnalysisError
from ..metric import Metric
from ..options import parse_alphas

__all__ = ["PerLayer", "param_groups"]


def param_groups(layout: Any) -> list[tuple[str, int, int]]:
    """(name, start, stop) of every parameter entry of the layout, in the flat parameter vector."""
    from ...archive.layout import PARAMS

    return [(e.name, int(e.offset), int(e.stop)) for e in layout.entries if e.dataset == PARAMS]


class PerLayer(Metric):
    name = "per_layer"
    version = 1
    defaults = {"layer_alphas": [0.0, 0.25, 0.5, 0.75, 1.0]}
    description = "step length, cosine, distance from init and a one-group-moves interpolation per parameter group"

    def validate(self) -> None:
        al = parse_alphas(self.options["layer_alphas"])
        if 0.0 not in al or 1.0 not in al:
            raise AnalysisError("layer_alphas must hold 0 and 1")
        self.options["layer_alphas"] = al

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        groups = param_groups(ctx.evaluator.layout)
        al = self.options["layer_alphas"]
        i0, i1 = al.index(0.0), al.index(1.0)
        p0 = ctx.params(0)
        steps = ctx.steps
        rows = []
        for (i,) in units:
            pa, pb = ctx.params(i), ctx.params(i + 1)
            d = pb - pa
            prev = pa - ctx.params(i - 1) if i > 0 and steps[i + 1] - steps[i] == steps[i] - steps[i - 1] else None
            step, cos, dist = [], [], []
            for _, s, e in groups:
                dj = d[s:e]
                nj = float(torch.linalg.vector_norm(dj))
                step.append(nj)
                dist.append(float(torch.linalg.vector_norm(pa[s:e] - p0[s:e])))
                if prev is None:
                    cos.append(float("nan"))
                else:
                    den = nj * float(torch.linalg.vector_norm(prev[s:e]))
                    cos.append(float(dj @ prev[s:e]) / den if den > 0 else float("nan"))
            sa = ctx.state(i)
            dd = d.to(sa.device, sa.dtype)
            w = torch.as_tensor(al, dtype=sa.dtype, device=sa.device).reshape(-1, 1)
            states = []
            for _, s, e in groups:
                st = sa.unsqueeze(0).repeat(len(al), 1)
                st[:, s:e] = sa[s:e].unsqueeze(0) + w * dd[s:e].unsqueeze(0)
                states.append(st)
            loss, _ = ctx.evaluate(torch.cat(states), i)
            curves = loss.reshape(len(groups), len(al))
            rows.append({"step_length": np.array(step), "cos_prev": np.array(cos), "dist_init": np.array(dist),
                         "layer_loss": curves.reshape(-1), "layer_height": curves[:, i1] - curves[:, i0]})
        return rows

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """One model evaluation per group and grid point per pair."""
        g = len(param_groups(ctx.evaluator.layout))
        return float(len(units) * g * len(self.options["layer_alphas"]) * ctx.eval_size)

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Which group moves most and which carries the largest loss drop (layout indices; medians over pairs)."""
        st = np.asarray(rows.get("step_length", []), dtype=np.float64)
        if len(st) == 0 or st.ndim != 2:
            return {}
        with np.errstate(all="ignore"):
            ms = np.nanmedian(st, axis=0)
            mh = np.nanmedian(np.asarray(rows["layer_height"], dtype=np.float64), axis=0)
        out: dict[str, Any] = {"groups": int(st.shape[1])}
        if np.isfinite(ms).any():
            out["longest_step_group"] = int(np.nanargmax(ms))
        if np.isfinite(mh).any():
            out["largest_drop_group"] = int(np.nanargmin(mh))
        return out
