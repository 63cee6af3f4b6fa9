"""Optimizer-aware analysis: the update taken apart with the recorded optimizer state, and the stability that applies.

Why: with momentum or Adam the update is not −lr·gradient, and the edge of stability is not λ_max = 2/lr. The
recorder can store the optimizer state with every record (``Recorder(..., optimizer_state=True)``, ``sgdwalk train
--record-optimizer-state``; archive datasets ``optimizer/<key>``); from the state at both ends of a single update
this metric recovers the gradient the optimizer consumed, splits the update as torch computed it, and measures the
curvature against the threshold of the recorded optimizer. The algebra (and the exact choice of Adam's
preconditioner) is in :mod:`trajectory.analysis.curvature.preconditioned`.

One row per pair i = (θ_i, θ_{i+1}). Only pairs that are one optimizer step apart are computed; the others get a
NaN row whose ``status`` says why (0 computed; 1 the pair spans several optimizer steps; 2 no finite state or no
evaluation data for the pair; 3 the optimizer's step count does not advance by one across the pair, e.g. a step
skipped by AMP's GradScaler). g is the full-batch gradient at θ_i on the run's evaluation data (dtype, BatchNorm
policy and buffers of θ_i as every curvature metric), g_B the gradient on the pair's recorded minibatch
(:func:`~trajectory.analysis.metrics.gradients.minibatch`), g_opt the gradient recovered from the state alone.

Every optimizer:
``optimizer`` (1 SGD, 2 Adam, 3 AdamW), ``status``, ``loss`` L(θ_i), ``grad_norm`` ‖g‖, ``lr`` (recorded),
``momentum`` (SGD β, Adam β1), ``gopt_norm`` ‖g_opt‖, ``gb_norm`` ‖g_B‖, ``cos_gopt_gb`` and ``rel_err_gopt``
‖g_opt − g_B‖/‖g_B‖ (they validate the replay: 1 and ~1e-6 when the analysis reproduces the training gradient),
``update_norm`` ‖Δθ‖, ``update_residual`` ‖Δθ − Δθ_state‖/‖Δθ‖ (Δθ_state the update rebuilt from the state and lr:
validates lr and state alignment), ``cos_update`` cos(Δθ, −g), ``eos_threshold``, ``eos_ratio`` (1 at the edge),
``iters``, ``matvecs``, ``converged`` (of the Lanczos run).

SGD (momentum buffer): Δθ = mom + grad, ``mom_norm`` ‖mom‖, ``grad_part_norm`` ‖grad‖, ``cos_mom_g`` cos(mom, −g),
``cos_grad_g`` cos(grad, −g); first-order loss changes ``pred_change`` g·Δθ, ``pred_change_mom`` g·mom,
``pred_change_grad`` g·grad with standard errors ``pred_change_mom_se``/``pred_change_grad_se`` over the evaluation
samples (per-sample or per-batch gradients, options ``noise``/``noise_batch`` as for ``gradients``), ``share_mom`` =
g·mom / (g·mom + g·grad), ``noise_units``; ``lambda_max`` λ_max(H) (Lanczos, shared with ``hessian_top``/``sharpness``
through the run's eigenpair cache) and ``lambda_residual``; ``eos_threshold``/``eos_ratio``/``momentum`` from
:func:`~trajectory.analysis.metrics.curvature.eos_columns` ((2 + 2β)/lr for heavy ball).

Adam/AdamW: ``precond_lambda_max`` λ_max(P⁻¹H) (H + wd·I under Adam's L2 weight decay) by Lanczos on the symmetric
P^{-1/2} H P^{-1/2}, ``precond_residual``, ``eos_threshold`` (2 + 2β1)/((1 − β1)·lr), ``eos_ratio`` =
precond_lambda_max / eos_threshold; ``precond_step_norm`` lr·‖P⁻¹g‖, ``cos_update_pg`` cos(Δθ, −P⁻¹g),
``bias_correction1`` 1 − β1^s, ``p_min``/``p_max`` (of P on the coordinates kept), ``masked`` (coordinates left
out: v̂ = 0). λ_max(H) itself is not computed for Adam (``lambda_max`` NaN; run ``hessian_top`` for it): it would be a
second Lanczos run on another operator.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from ..curvature.linalg import top_eigen
from ..curvature.objective import COST_GRAD, COST_HVP, COST_LOSS, objective_for
from ..curvature.preconditioned import (SGD, OptimizerHyper, adam_split, adam_threshold, masked_scale,
                                        parse_optimizer, preconditioned_matmat, sgd_split)
from ..errors import AnalysisError
from .curvature import _BLOCK, _COMMON, EIGEN_STREAM, _Curvature, _int, _med, _pos, eos_columns, recorded_optimizer
from .gradients import _DataView, _GRAD_BUDGET, _grad_one, minibatch

__all__ = ["OptimizerMetric", "directional_moments", "STATUS"]

#: meaning of the ``status`` column
STATUS = {0: "computed", 1: "pair spans several optimizer steps", 2: "no finite state or no evaluation data",
          3: "optimizer step count does not advance by one"}

_FLOAT = ("loss", "grad_norm", "lr", "momentum", "gopt_norm", "gb_norm", "cos_gopt_gb", "rel_err_gopt", "update_norm",
          "update_residual", "cos_update", "mom_norm", "grad_part_norm", "cos_mom_g", "cos_grad_g", "pred_change",
          "pred_change_mom", "pred_change_mom_se", "pred_change_grad", "pred_change_grad_se", "share_mom",
          "lambda_max", "lambda_residual", "precond_lambda_max", "precond_residual", "precond_step_norm",
          "cos_update_pg", "bias_correction1", "p_min", "p_max", "eos_threshold", "eos_ratio")
_INT = ("optimizer", "status", "noise_units", "masked", "iters", "matvecs")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def _norm(a: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a))


def directional_moments(obj: Any, p: torch.Tensor, D: torch.Tensor, batch: int) -> dict[str, Any]:
    """Mean and standard error of the per-unit directional derivatives G_j·d for every row d of D (k, n), G_j the
    gradient of disjoint units of ``batch`` samples (1: per-sample, by vmap(grad)); the one-direction
    :func:`~trajectory.analysis.metrics.gradients.unit_gradient_moments` for several directions in one pass.
    Returns m (units), ``mean`` and ``se`` (k,) numpy arrays (NaN with fewer than 2 units). Sums in float64."""
    model, loss_fn = obj.model, obj._loss
    b = max(1, int(batch))
    m = obj.n_data // b
    k = D.shape[0]
    if m < 2:
        return {"m": m, "mean": np.full(k, np.nan), "se": np.full(k, np.nan)}
    D64 = D.to(p.device, torch.float64)
    u1 = torch.zeros(k, dtype=torch.float64, device=p.device)
    u2 = torch.zeros(k, dtype=torch.float64, device=p.device)

    def unit_loss(pp: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (obj._params(pp), obj.buffers), (xb,)), yb)

    gfun = vmap(grad(unit_loss), in_dims=(None, 0, 0))
    x, y = obj.x[: m * b], obj.y[: m * b]
    xs, ys = x.reshape(m, b, *x.shape[1:]), y.reshape(m, b, *y.shape[1:])
    chunk = max(1, min(int(obj.chunk) // b, _GRAD_BUDGET // max(1, p.numel())))
    for s in range(0, m, chunk):
        if b == 1 or obj.bn != "train":
            G = gfun(p.detach(), xs[s : s + chunk], ys[s : s + chunk])
        else:  # BatchNorm 'train': batch statistics per unit
            G = torch.stack([_grad_one(unit_loss, p, xs[j], ys[j]) for j in range(s, min(m, s + chunk))])
        u = G.to(torch.float64) @ D64.T
        u1 += u.sum(0)
        u2 += (u * u).sum(0)
        if obj.on_samples is not None:
            obj.on_samples(COST_GRAD * G.shape[0] * b)
    mean = (u1 / m).cpu().numpy()
    var = np.maximum(0.0, (u2.cpu().numpy() - m * mean * mean) / (m - 1))
    return {"m": m, "mean": mean, "se": np.sqrt(var / m)}


def _trajectory(ctx: Any) -> Any:
    """The replayed archive (``ctx.archive``), whose optimizer-state rows this metric reads."""
    traj = getattr(ctx, "archive", None)
    if traj is None:
        raise AnalysisError("metric optimizer needs the archive behind the replay (its optimizer state)")
    return traj


_NO_STATE = ("the archive records no optimizer state; metric optimizer needs it: record with "
             "`sgdwalk train --record-optimizer-state` or Recorder(..., optimizer=opt, optimizer_state=True)")


def _check_state(traj: Any, hp: OptimizerHyper) -> None:
    keys = tuple(getattr(traj, "optimizer_state_keys", ()) or ())
    if not keys:
        raise AnalysisError(_NO_STATE)
    need = ("momentum_buffer",) if hp.kind == SGD else ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp.amsgrad else ())
    missing = [k for k in need if k not in keys]
    if missing:
        raise AnalysisError(f"the archive's optimizer state holds {list(keys)}; metric optimizer needs {list(need)} "
                            f"for {hp.name}{' with momentum' if hp.kind == SGD else ''}")


class OptimizerMetric(_Curvature):
    name = "optimizer"
    version = 1
    tag = 14
    requires = ()  # always at the record: the update leaving θ_i
    defaults = {**_COMMON, "iters": 100, "tol": 1e-4, "noise": "sample", "noise_batch": 32}
    description = "update vs gradient from the recorded optimizer state; momentum-aware and Adam-preconditioned sharpness"

    def validate(self) -> None:
        super().validate()
        o = self.options
        if o["at"] != "record":
            raise AnalysisError("metric optimizer analyses the update leaving a record: option at must be 'record'")
        _int(o, "iters")
        _pos(o, "tol")
        if o["noise"] not in ("sample", "batch"):
            raise AnalysisError(f"option noise={o['noise']!r}: expected sample or batch")
        _int(o, "noise_batch")

    # ------------------------------------------------------------------ the run
    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        traj = _trajectory(ctx)
        self._hp = parse_optimizer(recorded_optimizer(ctx))
        _check_state(traj, self._hp)
        self._traj = traj
        return super().compute(ctx, units)

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        """Upper estimate (the SGD row): g, g_B, per-unit gradients, one Lanczos run and a loss."""
        return n_samples * (3 * COST_GRAD + COST_HVP * (min(self.options["iters"], n_params) + 1) + COST_LOSS)

    def nan_row(self, ctx: Any, a: float, status: int = 2) -> dict[str, Any]:
        row: dict[str, Any] = {c: float("nan") for c in _FLOAT}
        row.update({c: 0 for c in _INT})
        row.update(status=int(status), converged=False)
        hp = getattr(self, "_hp", None)
        row["optimizer"] = int(hp.kind) if hp is not None else 0
        return row

    def compute_one(self, ctx, pair, obj, p, state, a):
        i = int(pair)
        steps = ctx.steps
        if i + 1 >= len(steps) or int(steps[i + 1]) - int(steps[i]) != 1:
            return self.nan_row(ctx, a, status=1)
        s0, s1 = self._traj.optimizer_state(i), self._traj.optimizer_state(i + 1)
        hp = self._hp
        if hp.kind != SGD and float(s1["step"]) != float(s0["step"]) + 1:
            return self.nan_row(ctx, a, status=3)
        if not (bool(torch.isfinite(ctx.state(i + 1)).all())):
            return self.nan_row(ctx, a, status=2)
        dev = p.device
        lr = float(ctx.lr(i))
        theta = ctx.params(i).to(dev)
        delta = (ctx.params(i + 1) - ctx.params(i)).to(dev)
        loss, g = obj.loss_grad(p)
        g = g.to(torch.float64)
        row = self.nan_row(ctx, a, status=0)
        row.update(loss=float(loss), grad_norm=_norm(g), lr=lr, momentum=hp.momentum, update_norm=_norm(delta),
                   cos_update=_cos(delta, -g), pred_change=float(g @ delta))
        st = {k: v.to(dev, torch.float64) for k, v in s0.items() if k != "step"}, \
             {k: v.to(dev, torch.float64) for k, v in s1.items() if k != "step"}
        if hp.kind == SGD:
            parts = sgd_split(hp, theta, st[0]["momentum_buffer"], st[1]["momentum_buffer"], lr)
        else:
            vkey = "max_exp_avg_sq" if hp.amsgrad else "exp_avg_sq"
            parts = adam_split(hp, theta, st[0]["exp_avg"], st[1]["exp_avg"], st[1][vkey], float(s1["step"]), lr)
        g_opt = parts["g"]
        dn = _norm(delta)
        row.update(gopt_norm=_norm(g_opt),
                   update_residual=_norm(delta - parts["update"]) / dn if dn > 0 else float("nan"))
        mb = minibatch(ctx, i)
        if mb is not None and len(mb[0]) > 0:
            objb = objective_for(_DataView(ctx, mb), state, i)
            objb.on_samples = obj.on_samples
            _, gb = objb.loss_grad(p)
            gb = gb.to(torch.float64)
            gbn = _norm(gb)
            row.update(gb_norm=gbn, cos_gopt_gb=_cos(g_opt, gb),
                       rel_err_gopt=_norm(g_opt - gb) / gbn if gbn > 0 else float("nan"))
        if hp.kind == SGD:
            self._sgd(ctx, row, obj, p, g, parts, i, lr)
        else:
            self._adam(row, obj, p, g, parts, st[1][vkey], float(s1["step"]), i, lr, delta)
        return row

    def _sgd(self, ctx, row, obj, p, g, parts, i, lr) -> None:
        o = self.options
        mom, gp = parts["mom"], parts["grad"]
        pm, pg = float(g @ mom), float(g @ gp)
        row.update(mom_norm=_norm(mom), grad_part_norm=_norm(gp), cos_mom_g=_cos(mom, -g), cos_grad_g=_cos(gp, -g),
                   pred_change_mom=pm, pred_change_grad=pg, share_mom=pm / (pm + pg) if pm + pg != 0 else float("nan"))
        b = 1 if o["noise"] == "sample" else o["noise_batch"]
        if b == 1 and obj.bn == "train":
            b = 0  # one sample has no batch statistics
        if b:
            mo = directional_moments(obj, p, torch.stack([mom, gp]), b)
            row.update(pred_change_mom_se=float(mo["se"][0]), pred_change_grad_se=float(mo["se"][1]), noise_units=int(mo["m"]))
        r = self.top_eigenpairs(ctx, obj, p, i, 0.0, k=1, iters=o["iters"], tol=o["tol"], method="lanczos", which="LA",
                                stream=EIGEN_STREAM, need_vectors=False)
        lam = float(r.values[0])
        row.update(lambda_max=lam, lambda_residual=float(r.residuals[0]), iters=int(r.iters), matvecs=int(r.matvecs),
                   converged=bool(r.converged), **eos_columns(ctx, lam, lr))

    def _adam(self, row, obj, p, g, parts, v_next, step, i, lr, delta) -> None:
        o, hp = self.options, self._hp
        P, masked = masked_scale(parts["P"], v_next)
        kept = torch.isfinite(P)
        pg = torch.where(kept, g / P, torch.zeros_like(g))
        shift = 0.0 if hp.decoupled else hp.weight_decay
        mm, left_out = preconditioned_matmat(obj.matmat(p, _BLOCK), P, shift)
        r = top_eigen(mm, p.numel(), 1, iters=o["iters"], tol=o["tol"], which="LA", gen=self.generator(i), like=p,
                      method="lanczos")
        lam = float(r.values[0])
        thr = adam_threshold(hp.momentum, lr)
        Pk = P[kept]
        row.update(precond_lambda_max=lam, precond_residual=float(r.residuals[0]), iters=int(r.iters),
                   matvecs=int(r.matvecs), converged=bool(r.converged), eos_threshold=thr,
                   eos_ratio=lam / thr if thr > 0 else float("nan"), precond_step_norm=lr * _norm(pg),
                   cos_update_pg=_cos(delta, -pg), bias_correction1=1.0 - hp.momentum ** step,
                   p_min=float(Pk.min()) if len(Pk) else float("nan"), p_max=float(Pk.max()) if len(Pk) else float("nan"),
                   masked=int(left_out))

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        st = np.asarray(rows.get("status", []))
        if len(st) == 0:
            return {}
        out: dict[str, Any] = {"pairs": int(len(st)), "computed": int((st == 0).sum())}
        for col in ("eos_ratio", "cos_gopt_gb", "share_mom", "lambda_max", "precond_lambda_max"):
            v = _med(rows[col])
            if np.isfinite(v):  # the other optimizer's columns are all NaN: not shown
                out[f"median_{col}"] = v
        return out
