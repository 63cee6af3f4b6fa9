"""The ``gradients`` metric against a plain float64 loop (per-sample backward passes) and against the analytic
gradient noise scale of a linear model with known noise; every issue-14 metric under torchrun equals one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from issue14_support import ce, flat_grad, linear_data, linear_model, load, record_linear, splits
from test_analysis_support import data_spec, mlp_spec, record_mlp
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.errors import AnalysisError
from trajectory.archive.reader import Trajectory


def _rows(path, metric="gradients"):
    f = ResultsFile(path, "r")
    (t,) = [t for (m, _), t in f.tables.items() if m == metric]
    return t.arrays()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("grad") / "run.h5", steps=4, lr=0.3, seed=5)


def test_gradients_match_a_float64_loop(mlp, tmp_path):
    out = tmp_path / "r.h5"
    analyze(mlp, out, metrics=["gradients"], eval="test", dtype="float64")
    got = _rows(out)
    xt, yt = data_spec().build(split="test").tensors
    xtr, ytr = data_spec().build(split="train").tensors
    model = mlp_spec().build().double()
    traj = Trajectory(mlp)
    try:
        for r, i in enumerate(got["pair"]):
            i = int(i)
            load(model, traj.state_dict(i))
            g = flat_grad(model, ce(model, xt, yt))
            d = (traj.params(i + 1) - traj.params(i)).double()
            G = torch.stack([flat_grad(model, ce(model, xt[j : j + 1], yt[j : j + 1])) for j in range(len(xt))])
            n = len(xt)
            trace = float(((G * G).sum() - n * (G.mean(0) @ G.mean(0))) / (n - 1))
            u = (G @ d).numpy()
            gb = flat_grad(model, ce(model, xtr[traj.batch_indices(i)], ytr[traj.batch_indices(i)]))
            with torch.no_grad():
                u0 = torch.nn.functional.cross_entropy(model(xt.double()), yt, reduction="none")
                l0 = float(u0.mean())
                u1 = torch.nn.functional.cross_entropy(load(model, traj.state_dict(i + 1))(xt.double()), yt, reduction="none")
                l1 = float(u1.mean())
            ref = {
                "loss": l0, "grad_norm": float(g.norm()), "grad_b_norm": float(gb.norm()),
                "cos_update": float(-(g @ d) / (g.norm() * d.norm())), "cos_gb_g": float(gb @ g / (gb.norm() * g.norm())),
                "trace_sigma": trace, "b_simple": trace / float(g @ g), "pred_change": float(g @ d),
                "pred_change_se": float(u.std(ddof=1) / np.sqrt(n)), "actual_change": l1 - l0, "noise_units": n,
                "actual_change_se": float((u1 - u0).std() / np.sqrt(n)),
            }
            for k, v in ref.items():
                np.testing.assert_allclose(got[k][r], v, rtol=1e-8, atol=1e-12, err_msg=k)
    finally:
        traj.close()


def test_minibatch_gradient_is_the_update_direction_under_plain_sgd(mlp, tmp_path):
    """Plain SGD: Δθ = −lr·g_B, so cos(Δθ, −g) equals cos(g_B, g) (to the float32 storage of the records)."""
    out = tmp_path / "r.h5"
    analyze(mlp, out, metrics=["gradients"], eval="subset:100", dtype="float64", options={"noise": "batch", "noise_batch": 10})
    got = _rows(out)
    np.testing.assert_allclose(got["cos_update"], got["cos_gb_g"], rtol=1e-4)
    assert (got["noise_units"] == 10).all()


@pytest.mark.parametrize("noise,tol", [("sample", 0.05), ("batch", 0.12)])
def test_b_simple_matches_the_linear_model_with_known_noise(tmp_path, noise, tol):
    """y = x·w* + σε, x ~ N(0, I_d), loss (w·x − y)²: per-sample gradient 2(δ·x − σε)x with δ = w − w*, so
    g = 2δ and tr Σ = 4(σ²d + ‖δ‖²(d + 1)); B_simple = (σ²d + ‖δ‖²(d + 1)) / ‖δ‖²."""
    d, sigma = 4, 1.5
    x, y, w_star = linear_data(400, d, sigma, seed=1)
    xt, yt, _ = linear_data(40000, d, sigma, seed=2, w_star=w_star)
    arch = record_linear(tmp_path / "lin.h5", x, y, steps=3)
    out = tmp_path / "r.h5"
    analyze(arch, out, metrics=["gradients"], model=linear_model(d), data=splits(x, y, xt, yt), eval="test",
            loss="mse", dtype="float64", options={"noise": noise, "noise_batch": 8})
    got = _rows(out)
    with Trajectory(arch) as traj:
        for r, i in enumerate(got["pair"]):
            delta = traj.params(int(i)).double() - w_star.double()
            dd = float(delta @ delta)
            analytic = (sigma ** 2 * d + dd * (d + 1)) / dd
            assert abs(got["b_simple"][r] / analytic - 1) < tol, (got["b_simple"][r], analytic)
            assert abs(got["grad_norm"][r] / (2 * np.sqrt(dd)) - 1) < 0.03


def test_bad_noise_option_is_one_error():
    from trajectory.analysis.metrics.gradients import Gradients

    with pytest.raises(AnalysisError, match="noise"):
        Gradients(noise="bootstrap")
    with pytest.raises(AnalysisError, match="noise_batch"):
        Gradients(noise_batch=0)


@pytest.mark.slow
def test_issue14_metrics_under_torchrun_equal_one_process(tmp_path):
    from test_analysis_distributed import _assert_same, _tables, _torchrun

    arch = record_mlp(tmp_path / "run.h5", steps=6, lr=0.3, seed=11)
    args = ["--eval", "subset:150", "--dtype", "float64", "--metric", "gradients,eigen_split,per_layer", "--k", "2"]
    ref = tmp_path / "ref.h5"
    analyze(arch, ref, eval="subset:150", dtype="float64", metrics=["gradients", "eigen_split", "per_layer"],
            options={"k": 2}, distributed=False)
    out = tmp_path / "dist.h5"
    p = _torchrun(2, [arch, "--out", str(out), *args, "-q"])
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    got = _tables(out)
    _assert_same(got, _tables(ref), metrics=("gradients", "eigen_split", "per_layer"))
    assert {k[0] for k in got} >= {"gradients", "eigen_split", "per_layer"}


def test_batchnorm_train_minibatch_replays_the_recorded_update(tmp_path):
    """BatchNorm model trained in train mode: under --eval minibatch --bn train, g is exactly the gradient the
    optimizer used, so cos(Δθ, −g) = 1 and Δθ = −lr·g; per-sample noise is undefined there (NaN), per-batch works."""
    arch = record_mlp(tmp_path / "bn.h5", steps=3, lr=0.2, seed=4, batchnorm=True)
    out = tmp_path / "r.h5"
    analyze(arch, out, metrics=["gradients"], eval="minibatch", bn="train", dtype="float64")
    got = _rows(out)
    np.testing.assert_allclose(got["cos_update"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(got["grad_b_norm"], got["grad_norm"], rtol=1e-12)
    with Trajectory(arch) as traj:
        for r, i in enumerate(got["pair"]):
            step = float((traj.params(int(i) + 1).double() - traj.params(int(i)).double()).norm())
            np.testing.assert_allclose(step, 0.2 * got["grad_norm"][r], rtol=1e-5)
    assert np.isnan(got["b_simple"]).all()
    out2 = tmp_path / "r2.h5"
    analyze(arch, out2, metrics=["gradients"], eval="subset:120", bn="train", dtype="float64",
            options={"noise": "batch", "noise_batch": 20})
    assert np.isfinite(_rows(out2)["b_simple"]).all()
