"""Sharpness measures that are not spectral: Keskar's ε-sharpness and the Gaussian-perturbation loss increase.

* :func:`eps_sharpness` maximises L(θ + δ) over the box |δ_i| ≤ ε(|θ_i| + 1) (Keskar et al. 2017) by projected
  sign-gradient ascent (PGD) from a seeded uniform start inside the box; the largest loss met on the way is
  the maximum. Keskar's normalised value 100·(max L − L(θ)) / (1 + L(θ)) is returned with the raw increase.
* :func:`gaussian_increase` is E_δ[L(θ + δ)] − L(θ) for δ ~ N(0, σ² I), averaged over seeded draws, with
  its standard error.
* :func:`eos_critical_step` is the edge-of-stability threshold of the recorded optimizer, as the critical value
  of lr·λ (2 for plain SGD; see its docstring for heavy-ball and Nesterov momentum).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch

__all__ = ["eps_sharpness", "gaussian_increase", "eos_critical_step", "sgd_momentum"]


def eps_sharpness(loss_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]], loss: Callable[[torch.Tensor], float],
                  p0: torch.Tensor, eps: float, steps: int, *, gen: torch.Generator, step_frac: float | None = None
                  ) -> tuple[float, float, float]:
    """(Keskar sharpness in percent, max L − L(θ), L(θ)); ``steps`` gradient evaluations plus two losses."""
    base = loss(p0)
    box = eps * (p0.abs() + 1.0)
    alpha = step_frac if step_frac is not None else 2.5 / max(1, steps)
    u = torch.rand(p0.shape, generator=gen, dtype=torch.float64).to(p0.device, p0.dtype)
    delta = (2 * u - 1) * box
    best = base
    for _ in range(max(0, steps)):
        l, g = loss_grad(p0 + delta)
        if math.isfinite(l):
            best = max(best, l)
        delta = torch.maximum(torch.minimum(delta + alpha * box * torch.sign(g), box), -box)
    if steps > 0:
        l = loss(p0 + delta)
        if math.isfinite(l):
            best = max(best, l)
    inc = best - base
    return 100.0 * inc / (1.0 + base), inc, base


def gaussian_increase(losses_at: Callable[[torch.Tensor], np.ndarray], p0: torch.Tensor, sigma: float, draws: int,
                      base: float, *, gen: torch.Generator) -> tuple[float, float]:
    """(mean of L(θ + σz) − L(θ) over ``draws`` seeded z ~ N(0, I), its standard error).

    ``losses_at(P)`` returns the losses at the rows of P (draws, n) in one batched call."""
    z = torch.randn((draws, p0.numel()), generator=gen, dtype=torch.float64).to(p0.device, p0.dtype)
    vals = np.asarray(losses_at(p0.unsqueeze(0) + sigma * z), dtype=np.float64) - base
    se = float(np.std(vals, ddof=1) / math.sqrt(draws)) if draws > 1 else float("nan")
    return float(np.mean(vals)), se


def sgd_momentum(optimizer: Mapping[str, Any] | str | None) -> tuple[float, float, bool] | None:
    """(momentum β, dampening τ, nesterov) of a recorded ``torch.optim.SGD`` (archive attribute ``optimizer``:
    class, defaults, param_groups; the first group wins, as for the recorded learning rate); (0, 0, False)
    when no optimizer was recorded (an own training loop: plain SGD assumed, today's behaviour); None for a
    recorded optimizer that is not SGD (Adam, RMSprop...: no scalar momentum threshold applies)."""
    if not isinstance(optimizer, Mapping) or not optimizer:
        return 0.0, 0.0, False
    cls = str(optimizer.get("class", ""))
    if cls.rsplit(".", 1)[-1] != "SGD":
        return None
    groups = optimizer.get("param_groups") if isinstance(optimizer.get("param_groups"), list) else []
    g0 = groups[0] if groups and isinstance(groups[0], Mapping) else {}
    defaults = optimizer.get("defaults") if isinstance(optimizer.get("defaults"), Mapping) else {}

    def pick(key: str, default: Any) -> Any:
        v = g0.get(key, defaults.get(key, default))
        return default if v is None else v

    return float(pick("momentum", 0.0)), float(pick("dampening", 0.0)), bool(pick("nesterov", False))


def eos_critical_step(beta: float, dampening: float = 0.0, nesterov: bool = False) -> float:
    """Critical lr·λ above which SGD with momentum diverges along a Hessian eigendirection of curvature λ.

    On a quadratic, torch's SGD (buf ← β·buf + (1 − τ)·g; step −lr·buf, or −lr·(g + β·buf) with Nesterov)
    is a linear map of (θ, buf) along each eigenvector; its eigenvalue −1 crossing gives

    * heavy ball:  lr·λ < (2 + 2β) / (1 − τ)        (τ = 0: the (2 + 2β)/lr of Cohen et al. 2021, appendix on momentum)
    * Nesterov:    lr·λ < (2 + 2β) / (1 + β + β(1 − τ))   (τ = 0: (2 + 2β)/(1 + 2β))

    and 2 for plain SGD (β = 0). So ``eos_ratio = λ·lr / eos_critical_step(...)`` is 1 at the edge of stability
    whatever the momentum."""
    if beta == 0.0:
        return 2.0
    d = 1.0 - dampening
    if nesterov:
        return (2.0 + 2.0 * beta) / (1.0 + beta + beta * d)
    return (2.0 + 2.0 * beta) / d if d > 0 else math.inf
