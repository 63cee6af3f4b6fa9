"""Matrix-free estimators over a symmetric operator given as ``matmat(V) -> A·V`` (rows of V are vectors).

* :func:`lanczos`        Lanczos tridiagonalisation with full (twice-applied) reorthogonalisation.
* :func:`top_eigen`      top-k eigenpairs by Lanczos (or power iteration with deflation), with explicit
                         residual norms ‖A y − θ y‖ of the returned Ritz pairs.
* :func:`hutchinson`     trace by Rademacher probes, with the standard error of the mean.
* :func:`hutchpp`        Hutch++ (Meyer et al. 2021): low-rank part exactly, Hutchinson on the rest.
* :func:`slq`            stochastic Lanczos quadrature: Ritz nodes/weights per probe, and
  :func:`gaussian_density` a Gaussian-broadened spectral density on a grid.

Random vectors come from a ``torch.Generator`` on the CPU (float64, then cast and moved), so the numbers
do not depend on the device. Tridiagonal algebra is float64 numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["lanczos", "top_eigen", "power_deflation", "hutchinson", "hutchpp", "slq", "gaussian_density",
           "rademacher", "gaussian", "EigenResult", "LanczosResult"]

MatMat = Callable[[torch.Tensor], torch.Tensor]


def rademacher(k: int, n: int, gen: torch.Generator, like: torch.Tensor | None = None) -> torch.Tensor:
    z = torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    return z if like is None else z.to(like.device, like.dtype)


def gaussian(k: int, n: int, gen: torch.Generator, like: torch.Tensor | None = None) -> torch.Tensor:
    z = torch.randn((k, n), generator=gen, dtype=torch.float64)
    return z if like is None else z.to(like.device, like.dtype)


@dataclass
class LanczosResult:
    alpha: np.ndarray   # (m,) diagonal of T
    beta: np.ndarray    # (m,) off-diagonal; beta[m-1] couples to the next (unbuilt) vector
    Q: torch.Tensor     # (m, n) Lanczos basis
    theta: np.ndarray   # (m,) Ritz values, ascending
    S: np.ndarray       # (m, m) eigenvectors of T
    matvecs: int

    @property
    def estimates(self) -> np.ndarray:
        """Lanczos residual estimates |β_m · s_{m,i}| of each Ritz pair (exact with full reorthogonalisation)."""
        return np.abs(self.beta[-1] * self.S[-1, :]) if len(self.beta) else np.zeros(0)

    def vectors(self, idx) -> torch.Tensor:
        """Ritz vectors (len(idx), n) for indices into ``theta``."""
        s = torch.as_tensor(self.S[:, idx].T.copy(), dtype=self.Q.dtype, device=self.Q.device)
        return s @ self.Q


def _tridiag_eig(alpha, beta_inner):
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        b = np.asarray(beta_inner[: m - 1], dtype=np.float64)
        T += np.diag(b, 1) + np.diag(b, -1)
    return np.linalg.eigh(T)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(-np.abs(theta), kind="stable") if which == "LM" else np.argsort(-theta, kind="stable")
    return order[:k]


def lanczos(matmat: MatMat, v0: torch.Tensor, m: int, *, k: int | None = None, tol: float = 0.0,
            which: str = "LA", check_every: int = 1) -> LanczosResult:
    """m steps of Lanczos from v0 with full reorthogonalisation; stops early when the k selected Ritz values
    have residual estimates ≤ tol·max|θ| (if k and tol are given) or at an invariant subspace."""
    n = v0.numel()
    m = int(max(1, min(m, n)))
    Q = torch.empty((m, n), dtype=v0.dtype, device=v0.device)
    q = v0 / torch.linalg.vector_norm(v0)
    Q[0] = q
    alpha: list[float] = []
    beta: list[float] = []
    theta = S = None
    scale = 0.0
    for j in range(m):
        w = matmat(Q[j].unsqueeze(0))[0]
        a = float(torch.dot(w, Q[j]))
        alpha.append(a)
        w = w - a * Q[j]
        if j > 0:
            w = w - beta[j - 1] * Q[j - 1]
        B = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - (B @ w) @ B
        b = float(torch.linalg.vector_norm(w))
        beta.append(b)
        scale = max(scale, abs(a), b)
        done = j + 1 == m
        if b <= 1e-12 * max(scale, 1e-300) * math.sqrt(n):
            done = True  # invariant subspace: T's eigenvalues are exact eigenvalues of A
            beta[-1] = 0.0
        if not done and k is not None and tol > 0 and j + 1 >= k and (j + 1) % check_every == 0:
            theta, S = _tridiag_eig(alpha, beta)
            sel = _select(theta, k, which)
            est = np.abs(b * S[-1, sel])
            if np.all(est <= tol * max(np.max(np.abs(theta)), 1e-300)):
                done = True
        if done:
            break
        Q[j + 1] = w / b
    theta, S = _tridiag_eig(alpha, beta)
    mm = len(alpha)
    return LanczosResult(np.array(alpha), np.array(beta), Q[:mm], theta, S, mm)


@dataclass
class EigenResult:
    values: np.ndarray      # (k,) eigenvalue estimates, in the selection order (largest first)
    vectors: torch.Tensor   # (k, n) unit eigenvector estimates
    residuals: np.ndarray   # (k,) ‖A v − λ v‖ (explicit)
    iters: int              # Lanczos steps (or power steps in total)
    matvecs: int            # operator applications, residuals included
    converged: bool         # every residual ≤ tol·max|λ| (tol of the call)


def top_eigen(matmat: MatMat, n: int, k: int, *, iters: int = 100, tol: float = 1e-6, which: str = "LA",
              gen: torch.Generator, like: torch.Tensor, method: str = "lanczos") -> EigenResult:
    """Top-k eigenpairs of the symmetric operator (``which``: 'LA' largest algebraic, 'LM' largest magnitude)."""
    k = int(min(k, n))
    if method == "power":
        return power_deflation(matmat, n, k, iters=iters, tol=tol, gen=gen, like=like)
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    v0 = gaussian(1, n, gen, like)[0]
    # stop on the Lanczos estimate a little below tol so that the explicit residual meets tol too
    res = lanczos(matmat, v0, iters, k=k, tol=tol * 0.1, which=which, check_every=1)
    sel = _select(res.theta, k, which)
    vals = res.theta[sel]
    Y = res.vectors(sel)
    Y = Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)
    AY = matmat(Y)
    r = torch.linalg.vector_norm(AY - torch.as_tensor(vals, dtype=Y.dtype, device=Y.device).unsqueeze(1) * Y, dim=1)
    resid = r.double().cpu().numpy()
    if len(vals) < k:  # the Krylov space was exhausted (n small or invariant subspace): pad
        pad = k - len(vals)
        vals = np.concatenate([vals, np.full(pad, np.nan)])
        resid = np.concatenate([resid, np.full(pad, np.nan)])
        Y = torch.cat([Y, torch.full((pad, n), float("nan"), dtype=Y.dtype, device=Y.device)])
    top = float(np.nanmax(np.abs(vals))) if np.any(np.isfinite(vals)) else 0.0
    conv = bool(np.all(resid[np.isfinite(resid)] <= tol * max(top, 1e-300)))
    return EigenResult(vals, Y, resid, res.matvecs, res.matvecs + len(sel), conv)


def power_deflation(matmat: MatMat, n: int, k: int, *, iters: int = 15, tol: float = 1e-6,
                    gen: torch.Generator, like: torch.Tensor) -> EigenResult:
    """Power iteration (Gaussian start) for the largest-magnitude eigenpair, then the next ones in the
    orthogonal complement of those found (deflation by projection). ``iters`` steps at most per pair; a pair
    stops early when its Rayleigh quotient changes by less than tol·|λ|. The paper's protocol: k=1, iters=15."""
    found: list[torch.Tensor] = []
    vals, res = [], []
    steps = 0
    mv = 0
    for _ in range(k):
        v = gaussian(1, n, gen, like)[0]
        lam_prev = None
        lam, r = float("nan"), float("nan")
        for _t in range(max(1, iters)):
            for u in found:
                v = v - torch.dot(u, v) * u
            v = v / torch.linalg.vector_norm(v)
            w = matmat(v.unsqueeze(0))[0]
            mv += 1
            steps += 1
            lam = float(torch.dot(v, w))
            r = float(torch.linalg.vector_norm(w - lam * v))
            if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-300):
                break
            lam_prev = lam
            nw = torch.linalg.vector_norm(w)
            if float(nw) == 0.0:
                break
            v_next = w / nw
            if _t + 1 < iters:
                v = v_next
        found.append(v)
        vals.append(lam)
        res.append(r)
    vals_a, res_a = np.array(vals), np.array(res)
    top = float(np.max(np.abs(vals_a))) if len(vals_a) else 0.0
    return EigenResult(vals_a, torch.stack(found), res_a, steps, mv, bool(np.all(res_a <= tol * max(top, 1e-300))))


def hutchinson(matmat: MatMat, n: int, probes: int, *, gen: torch.Generator, like: torch.Tensor,
               block: int = 8) -> tuple[float, float, np.ndarray]:
    """tr(A) ≈ mean of zᵀAz over Rademacher z; returns (estimate, standard error, per-probe values)."""
    vals = []
    for s in range(0, probes, block):
        Z = rademacher(min(block, probes - s), n, gen, like)
        vals.append((Z * matmat(Z)).sum(1).double().cpu().numpy())
    v = np.concatenate(vals)
    se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(np.mean(v)), se, v


def hutchpp(matmat: MatMat, n: int, matvecs: int, *, gen: torch.Generator, like: torch.Tensor,
            block: int = 8) -> tuple[float, float, int]:
    """Hutch++ with ``matvecs`` operator applications: tr(QᵀAQ) + Hutchinson on (I−QQᵀ)A(I−QQᵀ).

    Returns (estimate, standard error of the stochastic part, matvecs used). Needs matvecs ≥ 3."""
    s = max(1, matvecs // 3)
    g = max(1, matvecs - 2 * s)
    S = rademacher(s, n, gen, like)
    Y = torch.cat([matmat(S[i : i + block]) for i in range(0, s, block)])
    Q, _ = torch.linalg.qr(Y.T)  # (n, s)
    Qt = Q.T.contiguous()
    AQ = torch.cat([matmat(Qt[i : i + block]) for i in range(0, Qt.shape[0], block)])
    t1 = float((Qt * AQ).sum())
    G = rademacher(g, n, gen, like)
    G = G - (G @ Q) @ Qt
    vals = []
    for i in range(0, g, block):
        Gi = G[i : i + block]
        AGi = matmat(Gi)
        AGi = AGi - (AGi @ Q) @ Qt
        vals.append((Gi * AGi).sum(1).double().cpu().numpy())
    v = np.concatenate(vals)
    se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return t1 + float(np.mean(v)), se, 2 * s + g


def slq(matmat: MatMat, n: int, probes: int, iters: int, *, gen: torch.Generator,
        like: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Stochastic Lanczos quadrature: for each Rademacher probe v (‖v‖ = 1), ``iters`` Lanczos steps give
    nodes θ_j and weights τ_j = s_{1j}² with Σ_j τ_j f(θ_j) ≈ vᵀf(A)v (exact for polynomials of degree < 2·steps).

    Returns nodes (probes, iters) and weights (probes, iters), padded with NaN / 0 when Lanczos stops early
    (invariant subspace), and the matvecs used."""
    nodes = np.full((probes, iters), np.nan)
    weights = np.zeros((probes, iters))
    mv = 0
    for i in range(probes):
        v = rademacher(1, n, gen, like)[0]
        r = lanczos(matmat, v, iters)
        m = len(r.theta)
        nodes[i, :m] = r.theta
        weights[i, :m] = r.S[0, :] ** 2
        mv += r.matvecs
    return nodes, weights, mv


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Density φ(t) = mean over probes of Σ_j τ_j N(t; θ_j, σ²) on ``grid`` (integrates to ~1)."""
    ok = np.isfinite(nodes) & (weights > 0)
    th = nodes[ok]
    w = weights[ok] / nodes.shape[0]
    d = (grid[:, None] - th[None, :]) / sigma
    return (np.exp(-0.5 * d * d) * w[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
