"""trajectory.landscape on in-memory models against independent references (float64, small models):

* interpolate: a naive loop (load the interpolated state dict, forward the data batch by batch) under each BatchNorm
  policy; the floor against scipy's bounded minimiser of that naive loss;
* hessian_top: eigh of the autograd Hessian (1e-9 relative), eigenvectors up to sign;
* hessian_trace: the trace of that Hessian (Hutch++ with as many products as parameters is exact);
* hessian_esd: full-length Lanczos (iters = n) gives the Hessian's eigenvalues as nodes, weights summing to one;
* sharpness: λ_max against eigh, λ_max·lr/2, Keskar's normalisation 100·Δ/(1 + L).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from trajectory import landscape
from trajectory.errors import SgdwalkError

REL = 1e-9


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 4, dtype=torch.float64) * 2 + 1)
    return net


def _data(n: int = 40):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _naive_loss(model: nn.Module, x, y, *, bn: str, bn_batch: int) -> float:
    """Mean cross-entropy, BatchNorm with batch statistics per batch of bn_batch ('train') or running ones ('eval')."""
    m = copy.deepcopy(model)
    m.train() if bn == "train" else m.eval()
    total = 0.0
    if bn == "train":  # the analyzer's grouping: true batches of a permutation seeded seed + 2 (default seed 0)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))[: (len(x) // bn_batch) * bn_batch]
        x, y = x[perm], y[perm]
    with torch.no_grad():
        step = bn_batch if bn == "train" else len(x)
        for s in range(0, len(x), step):
            total += float(F.cross_entropy(m(x[s:s + step]), y[s:s + step], reduction="sum"))
    return total / len(x)


def _lerp(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    out = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    out.load_state_dict({k: (sa[k] + t * (sb[k] - sa[k])) if sa[k].is_floating_point() else sa[k] for k in sa})
    return out


def _hessian(model: nn.Module, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    p0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(p):
        d, pos = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            d[n] = p[pos:pos + k].reshape(s)
            pos += k
        return F.cross_entropy(functional_call(model, d, (x,)), y)

    return torch.autograd.functional.hessian(f, p0)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_interpolate_matches_a_naive_loop_and_its_floor(bn):
    a, b = _bn_net(0), _bn_net(1)
    x, y = _data()
    alphas = np.linspace(-0.5, 1.5, 9)
    curve = landscape.interpolate(a, b, (x, y), alphas=alphas, bn=bn, dtype="float64", bn_batch=10)
    want = [_naive_loss(_lerp(a, b, t), x, y, bn=bn, bn_batch=10) for t in alphas]
    np.testing.assert_allclose(curve.loss, want, rtol=REL)
    assert curve.alphas.tolist() == pytest.approx(alphas.tolist())
    assert a.training  # the caller's models are not touched
    # the floor: Brent on the same loss vs scipy's bounded minimiser of the naive loop
    f = lambda t: _naive_loss(_lerp(a, b, t), x, y, bn=bn, bn_batch=10)  # noqa: E731
    ref = minimize_scalar(f, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-9})
    a_star, floor, height = curve.floor
    assert floor == pytest.approx(min(ref.fun, f(0.0), f(1.0)), rel=1e-8)
    assert height == pytest.approx(f(0.0) - floor, rel=1e-6, abs=1e-12)
    assert f(a_star) == pytest.approx(floor, rel=REL)


def test_interpolate_accepts_state_dicts_datasets_and_loaders():
    a, b = _mlp(0), _mlp(1)
    x, y = _data()
    ref = landscape.interpolate(a, b, (x, y), dtype="float64")
    sd = landscape.interpolate(a.state_dict(), b.state_dict(), (x, y), model=_mlp(5), dtype="float64")
    ds = landscape.interpolate(a, b, TensorDataset(x, y), dtype="float64")
    dl = landscape.interpolate(a, b, DataLoader(TensorDataset(x, y), batch_size=7), dtype="float64")
    for other in (sd, ds, dl):
        np.testing.assert_allclose(other.loss, ref.loss, rtol=REL)
        np.testing.assert_allclose(other.acc, ref.acc)
    want = [_naive_loss(_lerp(a, b, t), x, y, bn="eval", bn_batch=len(x)) for t in ref.alphas]
    np.testing.assert_allclose(ref.loss, want, rtol=REL)
    assert landscape.interpolate(a, b, (x, y), alphas=[0.25, 0.5]).floor is None  # no segment ends on the grid


def test_hessian_top_trace_and_esd_match_eigh_of_the_autograd_hessian():
    model = _mlp(0)
    x, y = _data()
    H = _hessian(model, x, y)
    ev, vecs = torch.linalg.eigh(H)
    ev, vecs = ev.flip(0).numpy(), vecs.flip(1).numpy()
    n = H.shape[0]

    top = landscape.hessian_top(model, (x, y), k=3, vectors=True, dtype="float64", tol=1e-12)
    np.testing.assert_allclose(top.eigenvalues, ev[:3], rtol=REL)
    assert top.eigenvectors.shape == (3, n)
    for j in range(3):
        assert abs(float(top.eigenvectors[j] @ vecs[:, j])) == pytest.approx(1.0, rel=1e-8)
    assert top.loss == pytest.approx(_naive_loss(model, x, y, bn="eval", bn_batch=len(x)), rel=REL)

    tr = landscape.hessian_trace(model, (x, y), probes=3 * n, dtype="float64")
    assert tr.trace == pytest.approx(float(np.sum(ev)), rel=REL)

    esd = landscape.hessian_esd(model, (x, y), probes=1, iters=n, dtype="float64")
    nodes, weights = esd.nodes[esd.weights > 0], esd.weights[esd.weights > 0]
    assert weights.sum() == pytest.approx(1.0, rel=REL)
    scale = float(np.max(np.abs(ev)))
    for node in nodes:  # every Ritz value of a full-length Lanczos run is an eigenvalue
        assert float(np.min(np.abs(ev - node))) <= 1e-9 * scale
    assert nodes.max() == pytest.approx(ev[0], rel=REL)


def test_hessian_top_with_batchnorm_in_train_mode_matches_eigh():
    model = _bn_net(0)
    x, y = _data(20)  # one BatchNorm batch of 20: the loss is a function of the parameters through batch statistics
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.track_running_stats = False
    ev = torch.linalg.eigvalsh(_hessian(m, x, y)).flip(0).numpy()
    top = landscape.hessian_top(model, (x, y), k=2, dtype="float64", tol=1e-12, bn="train", bn_batch=20)
    np.testing.assert_allclose(top.eigenvalues, ev[:2], rtol=REL)


def test_sharpness_reports_lambda_max_and_the_edge_of_stability_ratio():
    model = _mlp(2)
    x, y = _data()
    lam = float(torch.linalg.eigvalsh(_hessian(model, x, y))[-1])
    s = landscape.sharpness(model, (x, y), lr=0.1, dtype="float64", tol=1e-12)
    assert s.lambda_max == pytest.approx(lam, rel=REL)
    assert s.eos_ratio == pytest.approx(lam * 0.1 / 2, rel=REL)
    assert s.loss == pytest.approx(_naive_loss(model, x, y, bn="eval", bn_batch=len(x)), rel=REL)
    assert s.eps_sharpness == pytest.approx(100 * s.eps_increase / (1 + s.loss), rel=1e-9)
    assert s.eps_increase > 0


def test_bad_input_is_one_line():
    a = _mlp(0)
    x, y = _data()
    for call in (lambda: landscape.interpolate(a.state_dict(), a.state_dict(), (x, y)),
                 lambda: landscape.interpolate(a, a, (x, y), bn="sometimes"),
                 lambda: landscape.hessian_top(a, "data"),
                 lambda: landscape.hessian_top(a, (x, y), kk=3),
                 lambda: landscape.interpolate(a, a, (x, y.double()))):
        with pytest.raises(SgdwalkError) as err:
            call()
        assert "\n" not in str(err.value)
