"""Eigen-direction split of each update: how much of the bounce lies in the sharp directions, how much in the river.

Why: the valley picture (Xing et al. 2018; the "river valley" of Wen et al. 2024) says SGD bounces across the few
sharp directions while it drifts along the flat rest. With the top-k Hessian eigenvectors V (k × n, orthonormal) at
record θ_i (the curvature code's Lanczos, shared with ``hessian_top`` through the run's eigenpair cache: same
options, same seeded start vector), the update d = θ_{i+1} − θ_i splits into

    d_top = Vᵀ(V d)        d_rest = d − d_top

and the loss is evaluated along each component alone, θ_i + a·d_top and θ_i + a·d_rest (buffers interpolated as on
the update's own segment), on the options' ``alphas`` grid. On a quadratic loss L(θ+x) = L + gᵀx + ½xᵀHx with V
spanning an invariant subspace of H the cross term vanishes, so

    height_top + height_rest = height_full,   height_X = L(θ_i + d_X) − L(θ_i)

exactly (tests/test_eigen_split.py); ``interaction`` = height_full − height_top − height_rest measures how far the
loss is from that picture. ``share_top`` = height_top / height_full and ``share_rest`` likewise (shares of the end-point
change). ``top_fraction`` = ‖d_top‖²/‖d‖².

The paper's *height* is the height above the valley floor, not the end-point change, and a bounce that lands on the
far wall about as high as it left has height_full ≈ 0, which made ``share_top`` swing to 1.2 or −0.65 on the
reproduction sweeps (docs/reproduction.md). So the split of the height above the floor is given too:
``depth_X`` = L(θ_i) − min over the grid points a ∈ [0, 1] of L(θ_i + a·d_X) (how far the loss dips along the
component; ``depth_full`` is the update's own height above its floor on the grid), and ``depth_share_top`` =
depth_top / depth_full, ``depth_share_rest`` likewise: "how much of the height lies in the top-k directions".

Columns: ``loss_full``, ``loss_top``, ``loss_rest`` (len(alphas),), ``height_full``, ``height_top``,
``height_rest``, ``interaction``, ``share_top``, ``share_rest``, ``depth_full``, ``depth_top``, ``depth_rest``,
``depth_share_top``, ``depth_share_rest``, ``top_fraction``, ``eigenvalues`` (k,), ``converged``. Only ``at: record`` is supported (the split is of the update leaving the record).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..curvature.objective import COST_LOSS
from ..errors import AnalysisError
from ..options import parse_alphas
from .curvature import _COMMON, _EIGEN, HessianTop, _med, _samples, _TopEigen

__all__ = ["EigenSplit"]


class EigenSplit(_TopEigen):
    name = "eigen_split"
    version = 2  # 2: depth_* columns (the split of the height above the floor)
    tag = HessianTop.tag  # hessian_top's start vector: one Lanczos per point when both run with the same options
    defaults = {**_COMMON, **_EIGEN, "k": 5, "alphas": parse_alphas(None)}
    description = "split of each update into its top-k Hessian eigenspace component and the rest; loss along each"

    def validate(self) -> None:
        super().validate()
        self.options["alphas"] = parse_alphas(self.options["alphas"])
        if 0.0 not in self.options["alphas"] or 1.0 not in self.options["alphas"]:
            raise AnalysisError("eigen_split needs an alphas grid holding 0 and 1 (the heights are L(a=1) - L(a=0))")
        if self.options["at"] != "record":
            raise AnalysisError("eigen_split splits the update leaving a record: option at must be 'record'")

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        return super().unit_cost(n_samples, n_params) + n_samples * COST_LOSS * 3 * len(self.options["alphas"])

    def compute_one(self, ctx, pair, obj, p, state, a):
        al = self.options["alphas"]
        r = self.eigenpairs(ctx, obj, p, pair, a, need_vectors=True)
        V = r.vectors.to(torch.float64)
        d = (ctx.params(pair + 1) - ctx.params(pair)).to(V.device, torch.float64)
        top = V.T @ (V @ d)
        rest = d - top
        sa, sb = ctx.state(pair), ctx.state(pair + 1)
        n = ctx.n_params
        w = torch.as_tensor(al, dtype=sa.dtype, device=sa.device).reshape(-1, 1)
        seg = ctx.line(sa, sb, al)  # full update, buffers interpolated
        comps = []
        for comp in (top, rest):
            st = seg.clone()
            st[:, :n] = sa[:n].unsqueeze(0) + w * comp.to(sa.device, sa.dtype).unsqueeze(0)
            comps.append(st)
        loss, _ = ctx.evaluate(torch.cat([seg, *comps]), pair)
        self._external += float(3 * len(al) * _samples(ctx, pair))  # reported by the evaluator: no top-up for them
        k = len(al)
        lf, lt, lr = loss[:k], loss[k : 2 * k], loss[2 * k :]
        base = lf[list(al).index(0.0)]
        hf, ht, hr = self._height(al, lf, base), self._height(al, lt, base), self._height(al, lr, base)
        dd = float(d @ d)
        inside = [j for j, x in enumerate(al) if 0.0 <= x <= 1.0]
        df, dt, dr = (float(base - np.min(c[inside])) for c in (lf, lt, lr))
        with np.errstate(all="ignore"):
            return {
                "loss_full": lf, "loss_top": lt, "loss_rest": lr,
                "height_full": hf, "height_top": ht, "height_rest": hr, "interaction": hf - ht - hr,
                "share_top": ht / hf if hf != 0 else float("nan"), "share_rest": hr / hf if hf != 0 else float("nan"),
                "depth_full": df, "depth_top": dt, "depth_rest": dr,
                "depth_share_top": dt / df if df > 0 else float("nan"),
                "depth_share_rest": dr / df if df > 0 else float("nan"),
                "top_fraction": float(top @ top) / dd if dd > 0 else float("nan"),
                "eigenvalues": self.padded(r.values), "converged": bool(r.converged),
            }

    @staticmethod
    def _height(alphas: Sequence[float], loss: np.ndarray, base: float) -> float:
        """L(θ_i + d_X) − L(θ_i): the loss at a = 1 of the grid (validated to hold 0 and 1)."""
        return float(loss[list(alphas).index(1.0)] - base)

    def nan_row(self, ctx, a):
        k, nan, na = self.options["k"], float("nan"), len(self.options["alphas"])
        return {"loss_full": np.full(na, nan), "loss_top": np.full(na, nan), "loss_rest": np.full(na, nan),
                "height_full": nan, "height_top": nan, "height_rest": nan, "interaction": nan, "share_top": nan,
                "share_rest": nan, "depth_full": nan, "depth_top": nan, "depth_rest": nan, "depth_share_top": nan,
                "depth_share_rest": nan, "top_fraction": nan, "eigenvalues": np.full(k, nan), "converged": False}

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        f = rows.get("top_fraction", [])
        if len(f) == 0:
            return {}
        return {"pairs": len(f), "median_top_fraction": _med(f), "median_share_top": _med(rows["share_top"]),
                "median_depth_share_top": _med(rows["depth_share_top"]) if "depth_share_top" in rows else float("nan"),
                "median_share_rest": _med(rows["share_rest"]), "median_interaction": _med(rows["interaction"])}
