"""Curvature estimators against exact Hessians (torch.autograd.functional.hessian + numpy.linalg.eigh) and
closed forms, on small float64 problems."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trajectory.analysis.curvature import (
    Objective,
    eps_sharpness,
    gaussian_density,
    gaussian_increase,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
    top_eigen,
)

D = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_problem(seed: int = 0, n: int = 64, batchnorm: bool = False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 14)] + ([nn.BatchNorm1d(14)] if batchnorm else []) + [nn.Tanh(), nn.Linear(14, 5)]
    model = nn.Sequential(*layers).to(D)
    x = torch.randn(n, 6, dtype=D)
    y = torch.randint(0, 5, (n,))
    return model, x, y


def reference_loss(model, x, y):
    """An independent L(p): unflatten p in named_parameters order and call the model (eval mode)."""
    names = [(k, v.shape, v.numel()) for k, v in model.named_parameters()]
    bufs = dict(model.named_buffers())

    def f(p):
        out, pos = {}, 0
        for k, shape, n in names:
            out[k] = p[pos : pos + n].view(shape)
            pos += n
        return F.cross_entropy(functional_call(model.eval(), (out, bufs), (x,)), y)

    return f


@pytest.fixture(scope="module")
def problem():
    model, x, y = small_problem()
    obj, p0 = Objective.from_model(model, x, y, chunk=23)  # uneven chunks: per-chunk HVPs weighted by size
    H = torch.autograd.functional.hessian(reference_loss(model, x, y), p0)
    evals, evecs = np.linalg.eigh(H.numpy())
    return obj, p0, H, evals, evecs


def test_objective_matches_reference_loss(problem):
    obj, p0, H, *_ = problem
    assert p0.numel() > 150
    ref = reference_loss(*small_problem())
    assert obj.loss(p0) == pytest.approx(float(ref(p0)), rel=1e-12)
    l, g = obj.loss_grad(p0)
    g_ref = torch.autograd.functional.jacobian(ref, p0)
    assert torch.allclose(g, g_ref, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_hvp_matches_exact_hessian(problem, mode):
    obj, p0, H, *_ = problem
    model, x, y = small_problem()
    o2, _ = Objective.from_model(model, x, y, chunk=23, hvp=mode)
    V = torch.randn(5, p0.numel(), dtype=D, generator=gen(1))
    assert torch.allclose(o2.hvp_many(p0, V), V @ H, atol=1e-12, rtol=1e-10)
    assert torch.allclose(o2.hvp(p0, V[0]), H @ V[0], atol=1e-12, rtol=1e-10)
    # batching over data does not change the product
    o3, _ = Objective.from_model(model, x, y, chunk=64, hvp=mode)
    assert torch.allclose(o3.hvp_many(p0, V), V @ H, atol=1e-12, rtol=1e-10)


def test_lanczos_top_k_matches_eigh(problem):
    obj, p0, H, evals, _ = problem
    r = top_eigen(obj.matmat(p0), p0.numel(), 5, iters=200, tol=1e-9, gen=gen(0), like=p0)
    top = evals[::-1][:5]
    assert np.allclose(r.values, top, rtol=1e-6, atol=0)
    assert r.converged
    # residuals reported are the explicit ones
    Y = r.vectors
    explicit = torch.linalg.vector_norm(Y @ H - torch.as_tensor(r.values).unsqueeze(1) * Y, dim=1).numpy()
    assert np.allclose(r.residuals, explicit, atol=1e-12)
    assert np.all(r.residuals < 1e-8 * abs(top[0]))
    # largest magnitude
    r = top_eigen(obj.matmat(p0), p0.numel(), 2, iters=200, tol=1e-9, which="LM", gen=gen(0), like=p0)
    lm = evals[np.argsort(-np.abs(evals))][:2]
    assert np.allclose(r.values, lm, rtol=1e-6)


def test_power_iteration_with_deflation(problem):
    obj, p0, H, evals, _ = problem
    r = top_eigen(obj.matmat(p0), p0.numel(), 2, iters=3000, tol=1e-13, gen=gen(0), like=p0, method="power")
    lm = evals[np.argsort(-np.abs(evals))][:2]
    assert np.allclose(r.values, lm, rtol=1e-6)
    Y = r.vectors
    explicit = torch.linalg.vector_norm(Y @ H - torch.as_tensor(r.values).unsqueeze(1) * Y, dim=1).numpy()
    assert np.allclose(r.residuals, explicit, atol=1e-10)


def test_trace_estimators_within_three_standard_errors(problem):
    obj, p0, H, evals, _ = problem
    tr = float(np.sum(evals))
    est, se, _ = hutchinson(obj.matmat(p0), p0.numel(), 60, gen=gen(3), like=p0)
    assert se > 0 and abs(est - tr) <= 3 * se
    est, se, mv = hutchpp(obj.matmat(p0), p0.numel(), 60, gen=gen(3), like=p0)
    assert mv == 60 and se > 0 and abs(est - tr) <= 3 * se


def test_hutchpp_beats_hutchinson_on_average():
    # Hutch++ pays off when the spectrum decays (a few large eigenvalues dominate the trace, as in trained
    # networks' Hessians): least squares with geometrically decaying feature scales, HVPs through Objective.
    # (On a flat spectrum it can lose: it spends 2/3 of its matvecs on the sketch; see docs/analysis.md.)
    N, d = 300, 120
    g = gen(21)
    R, _ = torch.linalg.qr(torch.randn(d, d, dtype=D, generator=g))  # a random basis: H not diagonal-dominant
    X = (torch.randn(N, d, dtype=D, generator=g) * (0.93 ** torch.arange(d, dtype=D))) @ R
    y = torch.randn(N, 1, dtype=D, generator=g)
    obj, p0 = Objective.from_model(nn.Linear(d, 1, bias=False).to(D), X, y, loss="mse")
    tr = float(torch.trace(2.0 / N * X.T @ X))
    mm = obj.matmat(p0)
    err_h, err_pp = [], []
    for s in range(20):
        err_h.append(abs(hutchinson(mm, d, 30, gen=gen(s), like=p0)[0] - tr))
        err_pp.append(abs(hutchpp(mm, d, 30, gen=gen(s), like=p0)[0] - tr))
    assert np.mean(err_pp) < 0.5 * np.mean(err_h)


def test_slq_moments_and_density(problem):
    obj, p0, H, evals, _ = problem
    n = p0.numel()
    probes, iters = 12, 25
    nodes, weights, mv = slq(obj.matmat(p0), n, probes, iters, gen=gen(7), like=p0)
    assert nodes.shape == (probes, iters) and mv == probes * iters
    assert np.allclose(weights.sum(1), 1.0, atol=1e-12)
    # Gauss quadrature is exact for low-degree polynomials: per probe, Σ τθ = vᵀHv and Σ τθ² = vᵀH²v
    g = gen(7)
    Hn = H.numpy()
    for i in range(probes):
        v = (torch.randint(0, 2, (1, n), generator=g, dtype=torch.int8).to(D) * 2 - 1)[0].numpy()
        v = v / np.linalg.norm(v)
        assert (weights[i] * nodes[i]).sum() == pytest.approx(v @ Hn @ v, rel=1e-8, abs=1e-12)
        assert (weights[i] * nodes[i] ** 2).sum() == pytest.approx(v @ Hn @ Hn @ v, rel=1e-8, abs=1e-14)
        # the extreme Ritz values converge to the extreme eigenvalues (25 steps on ~180 dims)
        assert nodes[i].max() == pytest.approx(evals[-1], rel=1e-6)
    m1 = (weights * nodes).sum(1)
    m2 = (weights * nodes**2).sum(1)
    for m, exact in ((m1, evals.mean()), (m2, (evals**2).mean())):
        assert abs(m.mean() - exact) <= 3 * m.std(ddof=1) / np.sqrt(probes)
    # the broadened density integrates to one and keeps the first moment; second moment grows by σ²
    sigma = 0.01 * (evals[-1] - evals[0])
    grid = np.linspace(evals[0] - 6 * sigma, evals[-1] + 6 * sigma, 4001)
    dens = gaussian_density(nodes, weights, grid, sigma)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(grid * dens, grid) == pytest.approx(m1.mean(), rel=1e-5, abs=1e-9)
    assert np.trapezoid(grid**2 * dens, grid) == pytest.approx(m2.mean() + sigma**2, rel=1e-5)


def test_ggn_matches_explicit_gauss_newton(problem):
    model, x, y = small_problem()
    obj, p0 = Objective.from_model(model, x, y, chunk=23, operator="ggn")
    names = [(k, v.shape, v.numel()) for k, v in model.named_parameters()]

    def outputs(p):
        out, pos = {}, 0
        for k, shape, n in names:
            out[k] = p[pos : pos + n].view(shape)
            pos += n
        return functional_call(model, out, (x,))

    J = torch.autograd.functional.jacobian(outputs, p0).reshape(len(x) * 5, -1)
    s = torch.softmax(outputs(p0), -1)
    HL = torch.block_diag(*[(torch.diag(si) - torch.outer(si, si)) / len(x) for si in s])
    G = J.T @ HL @ J
    V = torch.randn(3, p0.numel(), dtype=D, generator=gen(2))
    assert torch.allclose(obj.hvp_many(p0, V), V @ G, atol=1e-12, rtol=1e-10)
    r = top_eigen(obj.matmat(p0), p0.numel(), 3, iters=200, tol=1e-9, gen=gen(0), like=p0)
    assert np.allclose(r.values, np.linalg.eigvalsh(G.numpy())[::-1][:3], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- closed form
def least_squares(N: int = 40, d: int = 8, orthogonal: bool = False):
    g = gen(11)
    X = torch.randn(N, d, dtype=D, generator=g) * torch.linspace(0.3, 3.0, d, dtype=D)
    if orthogonal:
        Q, _ = torch.linalg.qr(X)
        X = Q * torch.linspace(1.0, 5.0, d, dtype=D)
    y = torch.randn(N, dtype=D, generator=g)
    model = nn.Linear(d, 1, bias=False).to(D)
    obj, p0 = Objective.from_model(model, X, y.unsqueeze(1), loss="mse")
    return obj, p0, X, y, 2.0 / N * X.T @ X


def test_least_squares_closed_form():
    obj, p0, X, y, H = least_squares()
    exact = np.linalg.eigvalsh(H.numpy())[::-1]
    r = top_eigen(obj.matmat(p0), p0.numel(), 3, iters=50, tol=1e-10, gen=gen(0), like=p0)
    assert np.allclose(r.values, exact[:3], rtol=1e-10)
    # Lanczos on an 8-dim operator: the Krylov space is exhausted, all eigenvalues exact
    lr = lanczos(obj.matmat(p0), torch.ones(8, dtype=D), 50)
    assert np.allclose(np.sort(lr.theta)[::-1], exact, rtol=1e-9)
    tr = float(torch.trace(H))
    est, se, _ = hutchpp(obj.matmat(p0), 8, 30, gen=gen(0), like=p0)  # 10 sketch vectors span R^8: exact
    assert est == pytest.approx(tr, rel=1e-10)
    est, se, _ = hutchinson(obj.matmat(p0), 8, 200, gen=gen(0), like=p0)
    assert abs(est - tr) <= 3 * se
    # Gaussian perturbations of a quadratic: E[L(θ+σz)] − L(θ) = σ²·tr(H)/2
    sigma = 0.05
    losses = lambda P: np.array([obj.loss(p) for p in P])  # noqa: E731
    gi, gse = gaussian_increase(losses, p0, sigma, 400, obj.loss(p0), gen=gen(4))
    assert abs(gi - sigma**2 * tr / 2) <= 3 * gse


def test_eps_sharpness_closed_form():
    # orthogonal columns: H diagonal, so the maximum over the box at the minimum is any vertex: Σ (H_ii/2)·box_i²
    obj, _, X, y, H = least_squares(orthogonal=True)
    w = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.reshape(-1)
    eps = 1e-2
    box = eps * (w.abs() + 1)
    keskar, inc, base = eps_sharpness(obj.loss_grad, obj.loss, w, eps, 10, gen=gen(0))
    exact = float((torch.diag(H) / 2 * box**2).sum())
    assert inc == pytest.approx(exact, rel=1e-9)
    assert keskar == pytest.approx(100 * exact / (1 + base), rel=1e-9)
    # never above the brute-force maximum over the vertices
    best = max(obj.loss(w + torch.tensor(s, dtype=D) * box) for s in itertools.product((-1, 1), repeat=len(w)))
    assert inc <= best - base + 1e-12


def test_seeded_estimators_repeat(problem):
    obj, p0, *_ = problem
    a = hutchpp(obj.matmat(p0), p0.numel(), 12, gen=gen(5), like=p0)
    b = hutchpp(obj.matmat(p0), p0.numel(), 12, gen=gen(5), like=p0)
    c = hutchpp(obj.matmat(p0), p0.numel(), 12, gen=gen(6), like=p0)
    assert a == b and a[0] != c[0]
    n1 = slq(obj.matmat(p0), p0.numel(), 2, 10, gen=gen(5), like=p0)
    n2 = slq(obj.matmat(p0), p0.numel(), 2, 10, gen=gen(5), like=p0)
    assert np.array_equal(n1[0], n2[0]) and np.array_equal(n1[1], n2[1])
