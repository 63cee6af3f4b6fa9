"""The optimizer's own view of an update, from its recorded state: recovered gradient, update split, preconditioner.

Why: an SGD-with-momentum or Adam update is not −lr·gradient. With the optimizer state at both ends of an update
(archive datasets ``optimizer/<key>``, issue 14 item 5) the update can be taken apart exactly, the way torch
computes it, and the curvature that governs its stability is the *preconditioned* Hessian (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"). Pure tensor algebra here (no archive, no model), so the
metric :mod:`trajectory.analysis.metrics.optimizer` and the tests share one implementation.

State convention (the archive's): ``m_prev`` is the state when θ_i was recorded (before the update leaving θ_i),
``m_next`` when θ_{i+1} was; before torch's first step the state is all zeros.

torch.optim.SGD (momentum β, dampening τ, weight decay wd; ``maximize`` flips the gradient's sign first)::

    d   = g + wd·θ_i                       g the minibatch gradient the optimizer consumed
    m'  = d            (first step: torch sets buf = d, no dampening)
    m'  = β·m + (1 − τ)·d                  (later steps)
    Δθ  = −lr·m'                           heavy ball
    Δθ  = −lr·(d + β·m')                   Nesterov

so g = (m' − β·m)/c − wd·θ_i with c = 1 on the first step (m all zero), 1 − τ after, and the update splits into a
momentum part (what the step would be with a zero gradient) and a gradient part:

    heavy ball:  Δθ = −lr·β·m        − lr·c·d
    Nesterov:    Δθ = −lr·β²·m       − lr·(1 + β·c)·d

torch.optim.Adam / AdamW (β1, β2, eps, weight decay wd, amsgrad; s = ``state['step']`` after the update)::

    d   = g + wd·θ_i  (Adam, L2)    or   d = g  (AdamW: θ_i ← (1 − lr·wd)·θ_i first, decoupled)
    m'  = β1·m + (1 − β1)·d,   v' = β2·v + (1 − β2)·d²   (v̂ from max_exp_avg_sq' under amsgrad)
    Δθ  = −lr·m' / ((1 − β1^s)·(√(v'/(1 − β2^s)) + eps))   [− lr·wd·θ_i for AdamW]

The preconditioner is P = (1 − β1^s)·diag(√v̂ + eps), v̂ = v'/(1 − β2^s): Cohen et al. 2022 (section 2, Adam)
fold the first-moment bias correction into P so that the update is exactly Δθ = −lr·P⁻¹·m', a preconditioned
heavy-ball/EMA step with a frozen P, whose stability threshold on λ_max(P⁻¹H) is then (2 + 2β1)/((1 − β1)·lr)
(38/lr for β1 = 0.9) at every step. Without the factor (P = diag(√v̂ + eps)) the threshold would carry 1 − β1^s;
the two differ by less than 1 % after 44 steps at β1 = 0.9. P is built from the state *after* the update (v',
step s), because that is the denominator the update leaving θ_i divides by. Coordinates whose v̂ is exactly 0
(parameters outside the optimizer, frozen ones, ones that never had a gradient) have not been moved by Adam and
are left out of the preconditioned operator (P^{-1/2} = 0 there) instead of being weighted by 1/eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import AnalysisError

__all__ = ["OptimizerHyper", "parse_optimizer", "sgd_split", "adam_split", "adam_preconditioner",
           "preconditioned_matmat", "masked_scale", "adam_threshold", "SGD", "ADAM", "ADAMW"]

#: optimizer codes stored in the ``optimizer`` column of the metric's rows
SGD, ADAM, ADAMW = 1, 2, 3


@dataclass(frozen=True)
class OptimizerHyper:
    """Hyperparameters of the recorded optimizer's first parameter group (lr comes from the recorded ``lr`` scalar)."""

    kind: int                 # SGD, ADAM or ADAMW
    momentum: float = 0.0     # SGD β; Adam β1
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    amsgrad: bool = False
    maximize: bool = False

    @property
    def decoupled(self) -> bool:
        return self.kind == ADAMW

    @property
    def name(self) -> str:
        return {SGD: "SGD", ADAM: "Adam", ADAMW: "AdamW"}[self.kind]


def parse_optimizer(info: Mapping[str, Any] | str | None) -> OptimizerHyper:
    """The recorded ``optimizer`` attribute (:func:`trajectory.recorder.optimizer_info`) as :class:`OptimizerHyper`;
    AnalysisError (one line) for a missing or unsupported optimizer. Group 0 wins, as for the recorded lr."""
    if not isinstance(info, Mapping) or not info:
        raise AnalysisError("the archive records no optimizer; metric optimizer needs the optimizer and its state "
                            "(Recorder(..., optimizer=opt, optimizer_state=True) or `sgdwalk train --record-optimizer-state`)")
    cls = str(info.get("class", "")).rsplit(".", 1)[-1]
    groups = info.get("param_groups") if isinstance(info.get("param_groups"), list) else []
    g0 = groups[0] if groups and isinstance(groups[0], Mapping) else {}
    defaults = info.get("defaults") if isinstance(info.get("defaults"), Mapping) else {}

    def pick(key: str, default: Any) -> Any:
        v = g0.get(key, defaults.get(key, default))
        return default if v is None else v

    _check_groups(cls, groups)
    try:
        if cls == "SGD":
            return OptimizerHyper(SGD, momentum=float(pick("momentum", 0.0)), dampening=float(pick("dampening", 0.0)),
                                  nesterov=bool(pick("nesterov", False)), weight_decay=float(pick("weight_decay", 0.0)),
                                  maximize=bool(pick("maximize", False)))
        if cls in ("Adam", "AdamW"):
            betas = pick("betas", (0.9, 0.999))
            decoupled = cls == "AdamW" or bool(pick("decoupled_weight_decay", False))
            return OptimizerHyper(ADAMW if decoupled else ADAM, momentum=float(betas[0]), beta2=float(betas[1]),
                                  eps=float(pick("eps", 1e-8)), weight_decay=float(pick("weight_decay", 0.0)),
                                  amsgrad=bool(pick("amsgrad", False)), maximize=bool(pick("maximize", False)))
    except (TypeError, ValueError, IndexError):
        raise AnalysisError(f"cannot read the hyperparameters of the recorded optimizer {cls}") from None
    raise AnalysisError(f"metric optimizer supports torch.optim.SGD, Adam and AdamW; the archive records {cls or 'an unnamed optimizer'}")


#: hyperparameters that must agree across parameter groups (the archive does not say which parameter is in which group)
_SAME = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize", "weight_decay")


def _check_groups(cls: str, groups: list) -> None:
    """AnalysisError (one line) when parameter groups differ in a hyperparameter the analysis uses: the archive does
    not record which parameter belongs to which group, so one set must apply to all. AdamW may differ in
    weight_decay (the usual no-decay group for biases and norms): its decoupled decay changes neither the recovered
    gradient nor P, only ``update_residual`` of the parameters outside group 0."""
    gs = [g for g in groups if isinstance(g, Mapping)]
    for key in _SAME:
        if key == "weight_decay" and cls == "AdamW":
            continue
        vals = [_hashable(g.get(key)) for g in gs]
        if len(set(vals)) > 1:
            shown = ", ".join(str(g.get(key)) for g in gs[:4])
            raise AnalysisError(f"the recorded {cls} has parameter groups with different {key} ({shown}); metric "
                                "optimizer needs one set of hyperparameters (the archive does not say which parameter is in which group)")


def _hashable(v: Any) -> Any:
    """A hashable form of a recorded hyperparameter (lists, e.g. betas, become tuples)."""
    return tuple(v) if isinstance(v, list) else v


def sgd_split(hp: OptimizerHyper, theta: torch.Tensor, m_prev: torch.Tensor, m_next: torch.Tensor,
              lr: float) -> dict[str, torch.Tensor]:
    """SGD with momentum, from the state alone: ``g`` the gradient the optimizer consumed, ``mom`` and ``grad`` the
    momentum and gradient parts of the update (Δθ = mom + grad), ``update`` = mom + grad (what torch did). float64."""
    t, m0, m1 = (x.to(torch.float64) for x in (theta, m_prev, m_next))
    beta = hp.momentum
    first = not bool(m0.any())
    c = 1.0 if first else 1.0 - hp.dampening
    if c == 0.0:
        raise AnalysisError("SGD with dampening 1 ignores its gradients after the first step: nothing to recover")
    d = (m1 - beta * m0) / c
    g = d - hp.weight_decay * t
    if hp.maximize:
        g = -g
    if hp.nesterov:
        mom, grad = -lr * beta * beta * m0, -lr * (1.0 + beta * c) * d
    else:
        mom, grad = -lr * beta * m0, -lr * c * d
    return {"g": g, "mom": mom, "grad": grad, "update": mom + grad}


def adam_preconditioner(hp: OptimizerHyper, v_next: torch.Tensor, step: float) -> torch.Tensor:
    """Diagonal of P = (1 − β1^s)·(√(v'/(1 − β2^s)) + eps) (see the module docstring), float64; v' is ``exp_avg_sq``
    (``max_exp_avg_sq`` under amsgrad) after the update, s its step count."""
    s = float(step)
    bc1 = 1.0 - hp.momentum ** s
    bc2 = 1.0 - hp.beta2 ** s
    return bc1 * (v_next.to(torch.float64).sqrt() / math.sqrt(bc2) + hp.eps)


def adam_split(hp: OptimizerHyper, theta: torch.Tensor, m_prev: torch.Tensor, m_next: torch.Tensor,
               v_next: torch.Tensor, step: float, lr: float) -> dict[str, torch.Tensor]:
    """Adam/AdamW from the state alone: ``g`` the gradient the optimizer consumed, ``P`` the preconditioner's
    diagonal, ``update`` the step torch took (−lr·P⁻¹m' and, for AdamW, −lr·wd·θ_i). float64."""
    t, m0, m1 = (x.to(torch.float64) for x in (theta, m_prev, m_next))
    beta1 = hp.momentum
    d = (m1 - beta1 * m0) / (1.0 - beta1)
    g = d if hp.decoupled else d - hp.weight_decay * t
    if hp.maximize:
        g = -g
    P = adam_preconditioner(hp, v_next, step)
    update = -lr * m1 / P
    if hp.decoupled:
        update = update - lr * hp.weight_decay * t
    return {"g": g, "P": P, "update": update}


def preconditioned_matmat(matmat: Callable[[torch.Tensor], torch.Tensor], P: torch.Tensor, shift: float = 0.0
                          ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """V -> D·(H + shift·I)·D·V with D = P^{-1/2}: the symmetric form of P⁻¹(H + shift·I), with the same
    eigenvalues. Coordinates where P is +inf (:func:`masked_scale`), not positive or not finite get D = 0 (left
    out). ``matmat`` is H's (rows of V are vectors). Returns the operator and the number of coordinates left out."""
    D = P.rsqrt()
    bad = ~torch.isfinite(P) | (P <= 0)
    D = torch.where(bad, torch.zeros_like(D), D)
    return _scaled(matmat, D, shift), int(bad.sum())


def masked_scale(P: torch.Tensor, v_next: torch.Tensor) -> tuple[torch.Tensor, int]:
    """P with +inf where v' = 0 exactly (coordinates Adam has not moved; left out of the operator), and their count."""
    zero = v_next == 0
    return torch.where(zero.to(P.device), torch.full_like(P, math.inf), P), int(zero.sum())


def _scaled(matmat: Callable[[torch.Tensor], torch.Tensor], D: torch.Tensor, shift: float):
    def mm(V: torch.Tensor) -> torch.Tensor:
        d = D.to(V.device, V.dtype)
        W = V * d
        out = matmat(W)
        if shift:
            out = out + shift * W
        return out * d

    return mm


def adam_threshold(beta1: float, lr: float) -> float:
    """(2 + 2β1)/((1 − β1)·lr): the largest λ(P⁻¹H) at which Adam with a frozen preconditioner is stable on a
    quadratic (Cohen et al. 2022; 38/lr for β1 = 0.9). NaN without a positive lr."""
    if not (lr > 0) or beta1 >= 1.0:
        return math.nan
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
