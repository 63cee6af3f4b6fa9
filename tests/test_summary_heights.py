"""Summaries (issue 13): interior-floor heights apart from descent steps, and ``median_loss_start`` read at a = 0.

Closed form: the least-squares path of test_analysis_closed_form, whose floors are exact parabola minima."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trajectory.analysis import analyze
from trajectory.analysis.heights import height_split
from trajectory.analysis.summary import format_summary

from test_analysis_closed_form import _record


def _least_squares(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 100, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64)
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)

    def loss(th):
        return float(((A @ th.view(-1, 1) - Y) ** 2).mean())

    th = torch.randn(d + 1, generator=g, dtype=torch.float64)
    thetas = [th]
    for fac in [0.5, 1.6, 0.4, 2.0, 0.6]:  # desired a* (> 1: a descent step, floor at a = 1)
        r0 = A @ th.view(-1, 1) - Y
        dirn = -(2 * A.T @ r0 / n).view(-1)
        dr = A @ dirn.view(-1, 1)
        exact = float(-(r0 * dr).mean() / (dr ** 2).mean())
        th = th + dirn * exact / fac
        thetas.append(th)
    path = _record(tmp_path / "ls.h5", nn.Linear(d, 1).double(), thetas)
    return path, thetas, loss, X, Y, d


def test_interior_heights_and_descent_steps_apart_and_loss_start_at_a0(tmp_path):
    path, thetas, loss, X, Y, d = _least_squares(tmp_path)
    rep = analyze(path, tmp_path / "r.h5", model=nn.Linear(d, 1).double(), data={"train": TensorDataset(X, Y)},
                  loss="mse", eval="train", dtype="float64", metrics=["floor"], alphas="-0.5:1.5:41",
                  options={"xtol": 1e-10})
    tabs = {t["metric"]: t for t in rep.summary["tables"]}
    # closed forms: interior pairs 0, 2, 4 (a* = 0.5, 0.4, 0.6), height L(θt) − min of the parabola;
    # descent pairs 1, 3 (a* ≥ 1: floor at a = 1), "height" L(θt) − L(θt+1)
    inner, descent = [], []
    for t, fac in enumerate([0.5, 1.6, 0.4, 2.0, 0.6]):
        a0, a1 = thetas[t], thetas[t + 1]
        if fac < 1:
            grid = np.linspace(fac - 1e-3, fac + 1e-3, 2001)
            inner.append(loss(a0) - min(loss(a0 + a * (a1 - a0)) for a in grid))
        else:
            descent.append(loss(a0) - loss(a1))
    fs = tabs["floor"]["summary"]
    assert fs["interior_pairs"] == 3 and fs["descent_pairs"] == 2
    assert fs["median_interior_height"] == pytest.approx(np.median(inner), rel=1e-6)
    assert fs["median_descent_step"] == pytest.approx(np.median(descent), rel=1e-9)
    # the interpolation summary reads L(θt) at a = 0 (index 10 of -0.5:1.5:41), not at a = -0.5
    start = [loss(th) for th in thetas[:-1]]
    assert tabs["interpolation"]["summary"]["median_loss_start"] == pytest.approx(np.median(start), rel=1e-12)
    text = format_summary(rep.summary)
    assert "median interior height" in text and "median descent step" in text and "descent steps 2" in text


def test_height_split_of_rows_with_nonfinite_and_empty_groups():
    rows = {"height": np.array([0.1, 0.3, np.nan, 0.2, 0.05]), "interior": np.array([True, True, False, False, False]),
            "nonfinite": np.array([False, False, True, False, False])}
    s = height_split(rows)
    assert s == {"interior_pairs": 2, "median_interior_height": pytest.approx(0.2), "descent_pairs": 2,
                 "median_descent_step": pytest.approx(0.125)}
    rows["interior"][:] = False
    assert np.isnan(height_split(rows)["median_interior_height"])
