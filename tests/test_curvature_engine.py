"""Curvature metrics through the analyzer: exact Hessians of the run's loss on the run's evaluation data and
BatchNorm policy, the floor point, results file, resume and seeded repeatability."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from test_analysis_support import data_spec, mlp_spec, record_mlp
from trajectory.analysis import analyze
from trajectory.analysis.data import subset_indices
from trajectory.archive.reader import Trajectory

METRICS = ["hessian_top", "hessian_trace", "hessian_esd", "sharpness"]
OPTS = {"k": 3, "probes": 30, "esd_probes": 2, "esd_iters": 15, "esd_grid": 64, "noise_draws": 4, "ascent_steps": 3,
        "tol": 1e-9, "iters": 150}
N_EVAL = 200


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("curv") / "run.h5", steps=5, lr=0.3, seed=2)


@pytest.fixture(scope="module")
def bn_archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("curvbn") / "run.h5", steps=4, lr=0.1, seed=3, batchnorm=True)


def eval_data():
    x, y = data_spec().build(split="train").tensors
    idx = torch.as_tensor(subset_indices(len(x), N_EVAL, 0))
    return x[idx].double(), y[idx]


def exact_hessian(archive, state_fn, bn_batches: int | None = None, batchnorm: bool = False, matrix: bool = False):
    """Hessian of the mean cross-entropy at the parameters state_fn(traj) gives, independent of the analyzer."""
    model = mlp_spec(batchnorm=batchnorm).build().double()
    with Trajectory(archive) as traj:
        p, bufs = state_fn(traj)
    names = [(k, v.shape, v.numel()) for k, v in model.named_parameters()]
    assert sum(n for *_, n in names) == p.numel()
    buffers = {k: v for k, v in model.named_buffers()}
    if bufs is not None:
        pos = 0
        for k, v in model.named_buffers():
            if v.is_floating_point():
                buffers[k] = bufs[pos : pos + v.numel()].view(v.shape).double()
                pos += v.numel()
    x, y = eval_data()
    if bn_batches:
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.track_running_stats = False
    else:
        model.eval()

    def f(q):
        out, pos = {}, 0
        for k, shape, n in names:
            out[k] = q[pos : pos + n].view(shape)
            pos += n
        if not bn_batches:
            return F.cross_entropy(functional_call(model, (out, buffers), (x,)), y)
        total = 0
        if isinstance(bn_batches, int):  # near-equal chunks of the stored order
            groups = torch.tensor_split(torch.arange(len(x)), bn_batches)
        else:  # explicit groups of sample indices
            groups = bn_batches
        n_used = sum(len(idx) for idx in groups)
        for idx in groups:
            total = total + len(idx) / n_used * F.cross_entropy(functional_call(model, (out, buffers), (x[idx],)), y[idx])
        return total

    H = torch.autograd.functional.hessian(f, p.double())
    if matrix:
        return H.numpy()
    return np.linalg.eigvalsh(H.numpy())[::-1], float(torch.trace(H)), float(f(p.double()))


def run(archive, out, **kw):
    from trajectory.analysis import get_metric

    metrics = kw.pop("metrics", METRICS)
    known = {k for m in metrics for k in get_metric(m).defaults}
    kw["options"] = {k: v for k, v in kw.get("options", OPTS).items() if k in known}  # options are checked per run
    return analyze(archive, out, metrics=metrics, eval=f"subset:{N_EVAL}", dtype="float64",
                   steps=kw.pop("steps", "0:2"), **kw)


def test_metrics_at_records_match_exact_hessian_and_resume(archive, tmp_path):
    out = tmp_path / "r.h5"
    rep = run(archive, out)
    assert all(rep.computed[m] == 2 for m in METRICS)
    t = {m: rep.tables[m].arrays() for m in METRICS + ["interpolation"]}
    for j, pair in enumerate(t["hessian_top"]["pair"]):
        evals, tr, loss = exact_hessian(archive, lambda traj: (traj.params(int(pair)), None))
        top = t["hessian_top"]
        assert np.allclose(top["eigenvalues"][j], evals[:3], rtol=1e-6)
        assert np.all(top["residuals"][j] < 1e-6 * evals[0]) and top["converged"][j]
        assert top["lambda_max"][j] == pytest.approx(evals[0], rel=1e-6)
        assert top["eos_ratio"][j] == pytest.approx(evals[0] * 0.3 / 2, rel=1e-6)  # recorded lr 0.3
        assert top["loss"][j] == pytest.approx(loss, rel=1e-10)
        trace = t["hessian_trace"]
        assert abs(trace["trace"][j] - tr) <= 3 * trace["trace_se"][j]
        esd = t["hessian_esd"]
        assert esd["density"].shape == (2, 64) and esd["nodes"].shape == (2, 30)
        # Ritz values interlace: never beyond the spectrum; 15 steps get close to the top
        assert evals[-1] - 1e-9 <= esd["ritz_min"][j] and esd["ritz_max"][j] <= evals[0] + 1e-9
        assert esd["ritz_max"][j] == pytest.approx(evals[0], rel=1e-2)
        sh = t["sharpness"]
        assert sh["lambda_max"][j] == pytest.approx(evals[0], rel=1e-6)
        assert sh["eps_sharpness"][j] >= 0 and math.isfinite(sh["gauss_increase"][j])
        # the objective's loss is the evaluator's loss (same data, same policy)
        assert sh["loss"][j] == pytest.approx(t["interpolation"]["loss"][j][0], rel=1e-10)
    again = run(archive, out)
    assert sum(again.computed.values()) == 0 and all(again.reused[m] == 2 for m in METRICS)
    # same configuration in another file: the same numbers
    other = run(archive, tmp_path / "r2.h5")
    for m in METRICS:
        a, b = other.tables[m].arrays(), t[m]
        for c in a:
            if c != "run":
                assert np.array_equal(a[c], b[c], equal_nan=True), (m, c)
    # another seed: other random vectors (a new configuration next to the old one)
    seeded = run(archive, out, metrics=["hessian_trace"], options={**OPTS, "seed": 1})
    assert seeded.computed["hessian_trace"] == 2
    assert not np.array_equal(seeded.tables["hessian_trace"].arrays()["trace"], t["hessian_trace"]["trace"])


def test_hessian_top_at_floor(archive, tmp_path):
    rep = run(archive, tmp_path / "f.h5", metrics=["hessian_top"], options={**OPTS, "at": "floor"}, steps="1:3")
    top = rep.tables["hessian_top"].arrays()
    fl = rep.tables["floor"].arrays()
    assert np.array_equal(top["a"], fl["a_star"])
    for j, pair in enumerate(top["pair"]):
        a = float(fl["a_star"][j])

        def at_floor(traj, i=int(pair), a=a):
            return traj.params(i).double() + a * (traj.params(i + 1).double() - traj.params(i).double()), None

        evals, _, _ = exact_hessian(archive, at_floor)
        assert np.allclose(top["eigenvalues"][j], evals[:3], rtol=1e-6)


def test_batchnorm_train_policy_matches_batched_reference(bn_archive, tmp_path):
    # BatchNorm in train mode: the loss is the mean over BatchNorm batches of bn_batch (32) samples of a seeded
    # permutation; the Hessian differentiates through the batch statistics
    rep = run(bn_archive, tmp_path / "bn.h5", metrics=["hessian_top", "interpolation"], bn="train", steps="0:1", bn_batch=32)
    top = rep.tables["hessian_top"].arrays()
    # the documented grouping, written out independently: a permutation seeded by subset_seed + 2 (= 2), cut into
    # true batches of 32, the remainder (200 % 32 = 8 samples) dropped
    perm = torch.randperm(N_EVAL, generator=torch.Generator().manual_seed(2))
    groups = [perm[j * 32 : (j + 1) * 32] for j in range(N_EVAL // 32)]
    evals, _, loss = exact_hessian(bn_archive, lambda traj: (traj.params(0), traj.buffers(0)), bn_batches=groups,
                                   batchnorm=True)
    assert np.allclose(top["eigenvalues"][0], evals[:3], rtol=1e-6)
    assert top["loss"][0] == pytest.approx(loss, rel=1e-10)
    assert top["loss"][0] == pytest.approx(rep.tables["interpolation"].arrays()["loss"][0][0], rel=1e-10)


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_batchnorm_policies_agree_with_evaluator(bn_archive, tmp_path, bn):
    rep = run(bn_archive, tmp_path / f"{bn}.h5", metrics=["hessian_top", "interpolation"], bn=bn, steps="0:1",
              options={"k": 1, "iters": 30})
    top = rep.tables["hessian_top"].arrays()
    assert top["loss"][0] == pytest.approx(rep.tables["interpolation"].arrays()["loss"][0][0], rel=1e-10)
    assert np.isfinite(top["lambda_max"][0]) and top["lambda_max"][0] > 0
    if bn == "eval":
        evals, _, _ = exact_hessian(bn_archive, lambda traj: (traj.params(0), traj.buffers(0)), batchnorm=True)
        assert top["lambda_max"][0] == pytest.approx(evals[0], rel=1e-6)


def test_bad_options_fail_early(archive, tmp_path):
    from trajectory.analysis import AnalysisError

    for opts in ({"at": "middle"}, {"k": 0}, {"trace_method": "x"}, {"esd_grid": "1:0:5"}, {"hvp": "both"}):
        with pytest.raises(AnalysisError):
            run(archive, tmp_path / "bad.h5", options=opts)


def test_update_alignment_matches_exact_eigenvectors(archive, tmp_path):
    """Share of each recorded update in the top-3 eigenspace, against eigh of the autograd Hessian."""
    rep = run(archive, tmp_path / "a.h5", metrics=["update_alignment"], options={"k": 3, "tol": 1e-10, "iters": 150})
    t = rep.tables["update_alignment"].arrays()
    assert t["pair"].tolist() == [0, 1]
    for j, pair in enumerate(t["pair"]):
        H = exact_hessian(archive, lambda traj: (traj.params(int(pair)), None), matrix=True)
        w, V = np.linalg.eigh(H)
        top = V[:, ::-1][:, :3]
        with Trajectory(archive) as traj:
            d = (traj.params(int(pair) + 1).double() - traj.params(int(pair)).double()).numpy()
        proj = top.T @ d
        assert t["top_fraction"][j] == pytest.approx(np.linalg.norm(proj) / np.linalg.norm(d), rel=1e-6)
        assert np.allclose(t["cos_top"][j], np.abs(proj) / np.linalg.norm(d), rtol=1e-5, atol=1e-9)
        assert np.allclose(t["eigenvalues"][j], w[::-1][:3], rtol=1e-6)
        assert t["update_norm"][j] == pytest.approx(np.linalg.norm(d), rel=1e-12)
        assert t["random_fraction"][j] == pytest.approx(math.sqrt(3 / len(d)))
        assert t["converged"][j]
