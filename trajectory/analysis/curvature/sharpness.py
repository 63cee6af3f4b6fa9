"""Sharpness measures that are not spectral: Keskar's ε-sharpness and the Gaussian-perturbation loss increase.

* :func:`eps_sharpness` maximises L(θ + δ) over the box |δ_i| ≤ ε(|θ_i| + 1) (Keskar et al. 2017) by projected
  sign-gradient ascent (PGD) from a seeded uniform start inside the box; the largest loss met on the way is
  the maximum. Keskar's normalised value 100·(max L − L(θ)) / (1 + L(θ)) is returned with the raw increase.
* :func:`gaussian_increase` is E_δ[L(θ + δ)] − L(θ) for δ ~ N(0, σ² I), averaged over seeded draws, with
  its standard error.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = ["eps_sharpness", "gaussian_increase"]


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
