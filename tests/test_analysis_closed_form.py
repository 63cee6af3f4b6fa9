"""Closed-form checks: least squares (exact parabola along any segment), a two-basin function with a
barrier of known height, and a convex bowl without barriers. Float64 throughout; 1e-6 relative."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trajectory import Recorder
from trajectory.analysis import ResultsFile, analyze


def _record(path, model, thetas):
    """Archive whose records are the given flat parameter vectors (hand-made 'SGD' path)."""
    params = list(model.parameters())
    def load(theta):
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(theta[off:off + p.numel()].view_as(p))
                off += p.numel()
    load(thetas[0])
    with Recorder(path, model) as rec:
        for th in thetas[1:]:
            load(th)
            rec.record()
    return str(path)


def _rows(out, metric):
    (t,) = ResultsFile(out, "r").by_metric(metric)
    return t.rows


def test_least_squares_floor_is_the_exact_parabola_minimum(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)  # theta = [w, b] matches Linear's order

    def loss(th):
        return float(((A @ th.view(-1, 1) - Y) ** 2).mean())

    rng = np.random.default_rng(1)
    th = torch.randn(d + 1, generator=g, dtype=torch.float64)
    thetas, expected = [th], []
    factors = [0.45, 0.7, 0.3, 1.6, 0.55]  # desired a* = factor (1.6: floor beyond the segment -> at a = 1)
    for fac in factors:
        grad = 2 * A.T @ (A @ th.view(-1, 1) - Y) / n
        dirn = -grad.view(-1) * (1 + rng.random())
        r0, dr = A @ th.view(-1, 1) - Y, A @ dirn.view(-1, 1)
        exact = float(-(r0 * dr).mean() / (dr ** 2).mean())  # line-search step along dirn
        nxt = th + dirn * exact / fac
        thetas.append(nxt)
        th = nxt
    for t in range(len(factors)):
        a0, a1 = thetas[t], thetas[t + 1]
        r0, dr = A @ a0.view(-1, 1) - Y, A @ (a1 - a0).view(-1, 1)
        a_star = float(-(r0 * dr).mean() / (dr ** 2).mean())
        a_clip = min(max(a_star, 0.0), 1.0)
        floor = loss(a0 + a_clip * (a1 - a0))
        expected.append((a_star, a_clip, floor, loss(a0) - floor, max(loss(a0), loss(a1)) - floor))
    path = _record(tmp_path / "ls.h5", model, thetas)
    out = tmp_path / "ls.results.h5"
    analyze(path, out, model=nn.Linear(d, 1).double(), data={"train": TensorDataset(X, Y)}, loss="mse",
            eval="train", dtype="float64", metrics=["floor"], options={"xtol": 1e-10})
    rows = _rows(out, "floor")
    for t, (a_star, a_clip, floor, h_start, h_max) in enumerate(expected):
        r = rows[(t,)]
        assert a_star == pytest.approx(factors[t], rel=1e-9)  # the construction itself
        if 0 < a_star < 1:
            assert r["a_star"] == pytest.approx(a_star, rel=1e-6)
            assert r["interior"] and r["convex"] and r["convex_interior"]
        else:
            assert r["a_star"] == pytest.approx(a_clip, abs=1e-6)
            assert not r["interior"]
        assert r["floor_loss"] == pytest.approx(floor, rel=1e-6)
        assert r["height"] == pytest.approx(h_start, rel=1e-6)
        assert r["height_start"] == pytest.approx(h_start, rel=1e-6)
        assert r["height_max"] == pytest.approx(h_max, rel=1e-6)
    # the interpolation curve is the exact parabola at every grid point
    curve = _rows(out, "interpolation")[(0,)]["loss"]
    for a, v in zip(np.linspace(0, 1, 21), curve):
        assert v == pytest.approx(loss(thetas[0] + a * (thetas[1] - thetas[0])), rel=1e-12)


class _Landscape(nn.Module):
    """Output sqrt(h(w)) for every sample: with zero targets the MSE loss *is* h(w)."""

    def __init__(self, two_basin: bool):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.two_basin = two_basin

    def forward(self, x):
        w0, w1 = self.w[0], self.w[1]
        h = (w0 ** 2 - 1) ** 2 + w1 ** 2 if self.two_basin else w0 ** 2 + w1 ** 2
        return torch.sqrt(h) * torch.ones_like(x[:, :1])


def _h(w0, two_basin=True):
    return (w0 ** 2 - 1) ** 2 if two_basin else w0 ** 2


@pytest.mark.parametrize("two_basin", [True, False])
def test_barrier_of_known_height_and_none_in_a_bowl(tmp_path, two_basin):
    ws = [(-1.2, 0.0), (-0.8, 0.0), (0.8, 0.0), (1.2, 0.0)]
    thetas = [torch.tensor(w, dtype=torch.float64) for w in ws]
    path = _record(tmp_path / "b.h5", _Landscape(two_basin), thetas)
    out = tmp_path / "b.results.h5"
    data = {"train": TensorDataset(torch.zeros(8, 1, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64))}
    analyze(path, out, model=_Landscape(two_basin), data=data, loss="mse", eval="train", dtype="float64",
            spans="1,2", options={"xtol": 1e-9})
    floor = _rows(out, "floor")
    bars = _rows(out, "barriers")
    assert set(bars) == {(0, 1), (1, 1), (0, 2)}  # pairs 0..2; the far pair t+k must exist
    if two_basin:
        # floors at w0 = -1 and +1 (interior, loss 0); the middle pair's floor is its start (tie, not interior)
        assert floor[(0,)]["a_star"] == pytest.approx(0.5, abs=1e-6) and floor[(0,)]["interior"]
        assert floor[(2,)]["a_star"] == pytest.approx(0.5, abs=1e-6) and floor[(2,)]["floor_loss"] == pytest.approx(0, abs=1e-12)
        assert not floor[(1,)]["interior"] and not floor[(1,)]["convex"]
        # phi_0 = (-1, 0) -> phi_2 = (1, 0): the path crosses w0 = 0 where h = 1, the ends are minima
        b = bars[(0, 2)]
        assert b["barrier"] == pytest.approx(1.0, rel=1e-9)
        assert b["has_barrier"] and b["beta_max"] == pytest.approx(0.5)
        # phi_1 = (-0.8, 0) -> phi_2 = (1, 0): the largest sampled value on the 11-point path
        w = -0.8 + 1.8 * np.linspace(0, 1, 11)
        assert bars[(1, 1)]["barrier"] == pytest.approx(_h(w).max() - _h(-0.8), rel=1e-9)
        assert not bars[(0, 1)]["has_barrier"]  # -1 -> -0.8 climbs monotonically: no barrier
        assert bars[(0, 1)]["barrier"] == pytest.approx(0.0, abs=1e-12)
    else:
        for r in floor.values():
            assert r["convex"]
        for b in bars.values():
            assert not b["has_barrier"]
            assert b["barrier"] <= 1e-12
        summary = analyze(path, out, model=_Landscape(False), data=data, loss="mse", eval="train", dtype="float64",
                          spans="1,2", options={"xtol": 1e-9}).summary
        (bt,) = [t for t in summary["tables"] if t["metric"] == "barriers"]
        assert bt["summary"]["span1"]["barrier_fraction"] == 0.0
