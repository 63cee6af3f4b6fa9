"""Gradient dynamics at the records: how each update relates to the full-batch gradient, and how noisy it is.

Why: the update line shows *where* SGD went; this metric says how that step relates to the gradient it
approximates (cos(Δθ, −g)), how well the recorded minibatch's gradient g_B points along g (cos(g_B, g)), and the
gradient noise scale B_simple = tr(Σ)/‖g‖² (McCandlish et al. 2018, "An empirical model of large-batch
training"), the batch size above which larger batches stop helping.

At record θ_i of pair i (buffers held at θ_i's, the run's evaluation data, loss, dtype and BatchNorm policy,
through :func:`~trajectory.analysis.curvature.objective.objective_for`):

``loss``            L(θ_i)
``grad_norm``       ‖g‖, g = ∇L(θ_i) on the evaluation data
``grad_b_norm``     ‖g_B‖, g_B the gradient on the pair's recorded minibatch (training split; NaN when the pair spans
                    several updates or the archive records no indices; the training split is loaded once
                    when the evaluation data are not drawn from it)
``cos_update``      cos(Δθ, −g), Δθ = θ_{i+1} − θ_i (parameters)
``cos_gb_g``        cos(g_B, g)
``trace_sigma``     tr(Σ), Σ the covariance of one sample's gradient: from per-sample gradients
                    (``noise="sample"``, torch.func vmap(grad)) or from gradients of disjoint batches of
                    ``noise_batch`` samples (``noise="batch"``: b·(Σ_j‖G_j‖² − m‖Ḡ‖²)/(m − 1), the trailing partial
                    batch dropped; required under BatchNorm 'train', where one sample has no batch statistics)
``b_simple``        tr(Σ)/‖g‖²
``pred_change``     g·Δθ, the first-order prediction of the loss change along the update
``pred_change_se``  its standard error over the evaluation samples (sd of the per-unit values G_j·Δθ over √m)
``actual_change``   L(θ_{i+1}) − L(θ_i) by the run's evaluator (buffers of each record)
``actual_change_se`` its paired standard error over the evaluation units (:mod:`trajectory.analysis.stderr`)
``noise_units``     m, the per-sample (or per-batch) gradients used
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from ..curvature.objective import COST_GRAD, COST_LOSS, objective_for
from ..errors import AnalysisError
from ..metric import Metric

__all__ = ["Gradients", "unit_gradient_moments", "minibatch"]

#: gradient elements one pass of per-unit gradients may hold (chunk x n_params), bounding memory on large models.
#: 2**21 (16 MiB in float64) keeps each block under glibc's largest mmap threshold (32 MiB), so freed blocks are
#: reused instead of being unmapped and faulted in again: with 2**25 (256 MiB) per-sample gradients of 2,000 samples
#: spent 43% of their time in the kernel (page faults); 4 records of the sample archive: 3.46 -> 2.51 s wall, 1.49 ->
#: 0.45 s system time, 560k -> 124k minor faults (float64, subset:2000, 1 thread).
_GRAD_BUDGET = 1 << 21

_COLUMNS = ("loss", "grad_norm", "grad_b_norm", "cos_update", "cos_gb_g", "trace_sigma", "b_simple", "pred_change",
            "pred_change_se", "actual_change", "actual_change_se", "noise_units")


def minibatch(ctx: Any, pair: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The recorded minibatch (inputs, labels, on the device) of the single update leaving record ``pair``
    (:meth:`ReplayContext.minibatch <trajectory.analysis.replay.ReplayContext.minibatch>`); None for a context
    without one (a plug-in's own context), when the pair spans several updates, or no indices are recorded."""
    fn = getattr(ctx, "minibatch", None)
    return fn(pair) if callable(fn) else None


class _DataView:
    """A context whose data for every pair is the given batch (so ``objective_for`` builds the minibatch objective
    with BatchNorm batch = the whole batch, as loss evaluation under ``--eval minibatch`` does)."""

    def __init__(self, ctx: Any, data: tuple[torch.Tensor, torch.Tensor]):
        self._ctx, self._data = ctx, data
        self.evaluator = ctx.evaluator
        self.eval = type("E", (), {"kind": "minibatch"})()
        self.data_shard = None

    def data(self, pair: int):
        return self._data


def unit_gradient_moments(obj: Any, p: torch.Tensor, d: torch.Tensor, batch: int) -> dict[str, float]:
    """Moments of the gradients of disjoint units of ``batch`` samples (``batch`` = 1: per-sample, by vmap(grad)).

    Returns m (units), trace_sigma (per-sample covariance trace estimate, see the module docstring), and the mean and
    standard error of the per-unit directional derivatives G_j·d. Sums in float64."""
    model, loss_fn = obj.model, obj._loss
    n = obj.n_data
    b = max(1, int(batch))
    m = n // b
    if m < 2:
        return {"m": m, "trace_sigma": float("nan"), "dir_mean": float("nan"), "dir_se": float("nan")}
    s1 = torch.zeros_like(p, dtype=torch.float64)
    s2 = 0.0
    u1 = u2 = 0.0
    d64 = d.to(p.device, torch.float64)

    def unit_loss(pp: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (obj._params(pp), obj.buffers), (xb,))
        return loss_fn(out, yb)

    gfun = vmap(grad(unit_loss), in_dims=(None, 0, 0))
    x, y = obj.x[: m * b], obj.y[: m * b]
    xs = x.reshape(m, b, *x.shape[1:])
    ys = y.reshape(m, b, *y.shape[1:])
    # units per pass: the objective's activation chunk, and at most _GRAD_BUDGET gradient elements held at once
    chunk = max(1, min(int(obj.chunk) // b, _GRAD_BUDGET // max(1, p.numel())))
    for s in range(0, m, chunk):
        if b == 1 or obj.bn != "train":
            G = gfun(p.detach(), xs[s : s + chunk], ys[s : s + chunk])
        else:  # BatchNorm 'train': batch statistics per unit, one autograd pass each
            G = torch.stack([_grad_one(unit_loss, p, xs[j], ys[j])
                             for j in range(s, min(m, s + chunk))])
        G = G.to(torch.float64)
        s1 += G.sum(0)
        s2 += float((G * G).sum())
        u = G @ d64
        u1 += float(u.sum())
        u2 += float((u * u).sum())
        if obj.on_samples is not None:
            obj.on_samples(COST_GRAD * G.shape[0] * b)
    mean = s1 / m
    trace = b * (s2 - m * float(mean @ mean)) / (m - 1)
    dmean = u1 / m
    dvar = max(0.0, (u2 - m * dmean * dmean) / (m - 1))
    return {"m": m, "trace_sigma": trace, "dir_mean": dmean, "dir_se": math.sqrt(dvar / m)}


def _grad_one(fn, p: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    q = p.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(fn(q, xb, yb), q)[0]


def _actual_change(ctx: Any, i: int) -> tuple[float, float]:
    """L(θ_{i+1}) − L(θ_i) and its paired standard error (per-unit losses of the replay, :mod:`..stderr`); the SE is
    NaN with a replay that has no per-unit losses."""
    try:
        loss, _acc, units = ctx.evaluate_lines([(i, i + 1, [0.0, 1.0], i)], units=True)[0]
    except TypeError:  # a replay without per-unit losses
        loss, _acc = ctx.evaluate_lines([(i, i + 1, [0.0, 1.0], i)])[0]
        return float(loss[1] - loss[0]), float("nan")
    from ..stderr import diff_se

    return float(loss[1] - loss[0]), float(diff_se(units[1], units[0]))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


class Gradients(Metric):
    name = "gradients"
    version = 1
    defaults = {"noise": "sample", "noise_batch": 32}
    description = "full-batch and minibatch gradients, cos(update, -g), gradient noise scale B_simple, first-order change"

    def validate(self) -> None:
        o = self.options
        if o["noise"] not in ("sample", "batch"):
            raise AnalysisError(f"option noise={o['noise']!r}: expected sample or batch")
        try:
            nb = int(o["noise_batch"])
        except (TypeError, ValueError):
            raise AnalysisError(f"option noise_batch={o['noise_batch']!r} is not an integer") from None
        if nb < 1:
            raise AnalysisError("option noise_batch must be >= 1")
        o["noise_batch"] = nb

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        rows = []
        for (i,) in units:
            rows.append(self._one(ctx, int(i)))
        return rows

    def _nan(self) -> dict[str, Any]:
        row = {c: float("nan") for c in _COLUMNS}
        row["noise_units"] = 0
        return row

    def _one(self, ctx: Any, i: int) -> dict[str, Any]:
        sa = ctx.state(i)
        sb = ctx.state(i + 1)
        if not (bool(torch.isfinite(sa).all()) and bool(torch.isfinite(sb).all())):
            return self._nan()
        obj = objective_for(ctx, sa, i)
        if obj is None:
            return self._nan()
        obj.on_samples = getattr(ctx.evaluator, "on_samples", None)
        p = sa[: ctx.n_params].detach()
        loss, g = obj.loss_grad(p)
        g = g.to(torch.float64)
        d = (ctx.params(i + 1) - ctx.params(i)).to(g.device, torch.float64)
        row = self._nan()
        row.update(loss=float(loss), grad_norm=float(torch.linalg.vector_norm(g)), cos_update=_cos(d, -g),
                   pred_change=float(g @ d))
        mb = minibatch(ctx, i)
        if mb is not None and len(mb[0]) > 0:
            objb = objective_for(_DataView(ctx, mb), sa, i)
            objb.on_samples = obj.on_samples
            _, gb = objb.loss_grad(p)
            gb = gb.to(torch.float64)
            row.update(grad_b_norm=float(torch.linalg.vector_norm(gb)), cos_gb_g=_cos(gb, g))
        b = 1 if self.options["noise"] == "sample" else self.options["noise_batch"]
        if b == 1 and obj.bn == "train":
            b = 0  # one sample has no batch statistics: no per-sample noise under BatchNorm 'train'
        if b:
            mom = unit_gradient_moments(obj, p, d, b)
            gn2 = row["grad_norm"] ** 2
            row.update(trace_sigma=mom["trace_sigma"], b_simple=mom["trace_sigma"] / gn2 if gn2 > 0 else float("nan"),
                       pred_change_se=mom["dir_se"], noise_units=int(mom["m"]))
        row["actual_change"], row["actual_change_se"] = _actual_change(ctx, i)
        return row

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """Two gradients (g, g_B), the per-unit gradients (one more gradient's worth) and two losses per pair."""
        return float(len(units) * ctx.eval_size * (3 * COST_GRAD + 2 * COST_LOSS))

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        if len(rows.get("grad_norm", [])) == 0:
            return {}
        med = lambda c: float(np.nanmedian(rows[c])) if np.isfinite(rows[c]).any() else float("nan")  # noqa: E731
        with np.errstate(all="ignore"):
            return {"median_grad_norm": med("grad_norm"), "median_cos_update": med("cos_update"),
                    "median_cos_gb_g": med("cos_gb_g"), "median_b_simple": med("b_simple")}
