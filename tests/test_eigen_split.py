"""``eigen_split`` on a quadratic loss (bias-free linear model, mse), where everything has a closed form: the Hessian
is H = 2XᵀX/N, the top-k eigenvectors come from ``eigh``, the loss along each component is a parabola, and the
heights of the two components add up to the update's height exactly (the cross term vanishes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from issue14_support import linear_data, linear_model, record_linear, splits
from test_analysis_support import record_mlp
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.errors import AnalysisError
from trajectory.archive.reader import Trajectory

ALPHAS = [0.0, 0.25, 0.5, 1.0, 1.5]


def _rows(path, metric):
    f = ResultsFile(path, "r")
    (t,) = [t for (m, _), t in f.tables.items() if m == metric]
    return t.arrays()


def test_split_is_exact_on_a_quadratic(tmp_path):
    d, k = 6, 2
    scale = torch.tensor([3.0, 2.0, 1.0, 0.7, 0.5, 0.3])  # distinct curvatures, so the top-k space is well defined
    x, y, w_star = linear_data(300, d, 0.3, seed=1)
    xt, yt, _ = linear_data(2000, d, 0.3, seed=2, w_star=w_star)
    x, xt = x * scale, xt * scale
    arch = record_linear(tmp_path / "lin.h5", x, y, steps=3, lr=0.02)
    out = tmp_path / "r.h5"
    analyze(arch, out, metrics=["eigen_split"], model=linear_model(d), data=splits(x, y, xt, yt), eval="test",
            loss="mse", dtype="float64", alphas=ALPHAS, options={"k": k, "iters": 50, "tol": 1e-10})
    got = _rows(out, "eigen_split")
    X, Y = xt.double(), yt.double()[:, 0]
    H = 2 * X.T @ X / len(X)
    evals, evecs = torch.linalg.eigh(H)
    V = evecs[:, -k:].flip(1)
    P = V @ V.T

    def L(w):
        return float(((X @ w - Y) ** 2).mean())

    with Trajectory(arch) as traj:
        for r, i in enumerate(got["pair"]):
            w = traj.params(int(i)).double()
            dlt = traj.params(int(i) + 1).double() - w
            top, rest = P @ dlt, dlt - P @ dlt
            for col, comp in (("loss_full", dlt), ("loss_top", top), ("loss_rest", rest)):
                np.testing.assert_allclose(got[col][r], [L(w + a * comp) for a in ALPHAS], rtol=1e-9, err_msg=col)
            np.testing.assert_allclose(got["eigenvalues"][r], evals.flip(0)[:k].numpy(), rtol=1e-8)
            hf, ht, hr = (L(w + c) - L(w) for c in (dlt, top, rest))
            np.testing.assert_allclose([got["height_full"][r], got["height_top"][r], got["height_rest"][r]], [hf, ht, hr], rtol=1e-8)
            assert abs(got["interaction"][r]) < 1e-10 * max(1.0, abs(hf))  # exact split on a quadratic
            np.testing.assert_allclose(got["share_top"][r] + got["share_rest"][r], 1.0, rtol=1e-8)
            np.testing.assert_allclose(got["top_fraction"][r], float(top @ top / (dlt @ dlt)), rtol=1e-8)
            # the split of the height above the floor: the dip along each component on the grid points in [0, 1]
            depths = [L(w) - min(L(w + a * c) for a in ALPHAS if a <= 1.0) for c in (dlt, top, rest)]
            np.testing.assert_allclose([got["depth_full"][r], got["depth_top"][r], got["depth_rest"][r]], depths, rtol=1e-8, atol=1e-14)
            np.testing.assert_allclose(got["depth_share_top"][r], depths[1] / depths[0], rtol=1e-8)


def test_eigen_split_shares_hessian_tops_eigenpairs(tmp_path):
    """Run next to hessian_top with the same k: the same eigenvalues (one Lanczos per point, the run's cache)."""
    arch = record_mlp(tmp_path / "run.h5", steps=3, seed=2)
    out = tmp_path / "r.h5"
    analyze(arch, out, metrics=["eigen_split", "hessian_top"], eval="subset:100", dtype="float64", options={"k": 2})
    np.testing.assert_array_equal(_rows(out, "eigen_split")["eigenvalues"], _rows(out, "hessian_top")["eigenvalues"])


def test_bad_options_are_one_error():
    from trajectory.analysis.metrics.eigen_split import EigenSplit

    with pytest.raises(AnalysisError, match="0 and 1"):
        EigenSplit(alphas=[0.0, 0.5])
    with pytest.raises(AnalysisError, match="record"):
        EigenSplit(at="floor")
