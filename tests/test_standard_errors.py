"""Paired standard errors (issue 13 item 1) against a brute-force float64 loop.

The reference loads each point into the model with load_state_dict, computes the per-sample losses of the
evaluation subset in float64 and forms the estimator independently: independent samples -> sd(per-sample
losses, ddof=1)/sqrt(n) for a mean and sd(per-sample differences)/sqrt(n) for a difference (height); under
``--bn train`` the units are the BatchNorm groups (true batches of a seeded permutation): the same formulas on
the group means. Agreement to 1e-6 relative.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_analysis_support import data_spec, record_mlp
from trajectory import Trajectory
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.data import subset_indices
from trajectory.analysis.stderr import diff_se, mean_se

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
N, BN_BATCH = 200, 32  # under train BN: 6 groups of 32, 8 samples dropped


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("se")
    return {"plain": record_mlp(d / "plain.h5", steps=6, lr=2.0, seed=1),  # lr 2: interior floors, heights 2-6 se
            "bn": record_mlp(d / "bn.h5", steps=4, lr=0.3, seed=2, batchnorm=True)}


def _units(model, sa, sb, a, x, y, bn):
    """Per-unit float64 losses at θ_a + a·(θ_b − θ_a): per sample, or per seeded BatchNorm group under 'train'."""
    m = model.double()
    m.load_state_dict({k: (sa[k].double() + a * (sb[k].double() - sa[k].double())) if sa[k].is_floating_point() else sa[k]
                       for k in sa})
    m.eval()
    with torch.no_grad():
        if bn != "train":
            return F.cross_entropy(m(x.double()), y, reduction="none").numpy()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))  # subset_seed 0 + 2
        out = []
        for j in range(len(x) // BN_BATCH):
            idx = perm[j * BN_BATCH : (j + 1) * BN_BATCH]
            out.append(float(F.cross_entropy(m(x[idx].double()), y[idx])))
        return np.array(out)


def _sd_se(u):  # written out, not via the module under test
    u = np.asarray(u, dtype=np.float64)
    return math.sqrt(((u - u.mean()) ** 2).sum() / (len(u) - 1)) / math.sqrt(len(u))


@pytest.mark.parametrize("kind,bn", [("plain", "eval"), ("bn", "train"), ("bn", "eval")])
def test_loss_floor_and_height_se_match_brute_force(archives, tmp_path, kind, bn):
    path = archives[kind]
    out = tmp_path / "r.h5"
    analyze(path, out, metrics=["floor"], eval=f"subset:{N}", bn=bn, dtype="float64", alphas=ALPHAS, bn_batch=BN_BATCH,
            options={"xtol": 1e-7})
    x, y = data_spec().build(split="train").tensors
    idx = torch.as_tensor(subset_indices(len(x), N, 0))
    x, y = x[idx], y[idx]
    traj = Trajectory(path)
    model = traj.build_model()
    f = ResultsFile(out, "r")
    interp, floor = f.by_metric("interpolation")[0], f.by_metric("floor")[0]
    checked = 0
    for (i,), row in interp.rows.items():
        sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
        units = [_units(model, sa, sb, a, x, y, bn) for a in ALPHAS]
        assert len(units[0]) == (N // BN_BATCH if bn == "train" else N)
        ref = np.array([_sd_se(u) for u in units])
        np.testing.assert_allclose(row["loss_se"], ref, rtol=1e-6)
        np.testing.assert_allclose(row["loss"], [u.mean() for u in units], rtol=1e-9)  # loss = mean of the units
        fr = floor.rows[(i,)]
        u0, u1 = units[0], units[-1]
        us = _units(model, sa, sb, float(fr["a_star"]), x, y, bn)
        np.testing.assert_allclose(fr["floor_se"], _sd_se(us), rtol=1e-6)
        np.testing.assert_allclose(fr["loss_a_se"], _sd_se(u0), rtol=1e-6)
        np.testing.assert_allclose(fr["loss_b_se"], _sd_se(u1), rtol=1e-6)
        np.testing.assert_allclose(fr["height_start_se"], _sd_se(u0 - us), rtol=1e-6)
        np.testing.assert_allclose(fr["height_se"], fr["height_start_se"], rtol=0)  # height option 'start'
        top = u0 if fr["loss_a"] >= fr["loss_b"] else u1
        np.testing.assert_allclose(fr["height_max_se"], _sd_se(top - us), rtol=1e-6)
        if fr["a_star"] not in (0.0, 1.0):  # the paired error of a height is below the unpaired one
            assert fr["height_start_se"] < math.hypot(fr["loss_a_se"], fr["floor_se"])
        checked += 1
    assert checked == len(traj) - 1


@pytest.mark.parametrize("z", [1.0, 3.0, 1e6])
def test_significance_decides_interior_by_paired_errors_and_stays_out_of_default_hash(archives, tmp_path, z):
    path = archives["plain"]
    kw = dict(metrics=["floor"], eval=f"subset:{N}", dtype="float64", alphas=ALPHAS)
    analyze(path, tmp_path / "a.h5", **kw)
    analyze(path, tmp_path / "b.h5", options={"significance": 0}, **kw)
    analyze(path, tmp_path / "c.h5", options={"significance": z}, **kw)
    fa = ResultsFile(tmp_path / "a.h5", "r").by_metric("floor")[0]
    fb = ResultsFile(tmp_path / "b.h5", "r").by_metric("floor")[0]
    fc = ResultsFile(tmp_path / "c.h5", "r").by_metric("floor")[0]
    assert fa.config_json == fb.config_json and "significance" not in fa.config_json
    assert '"significance":' in fc.config_json
    x, y = data_spec().build(split="train").tensors
    idx = torch.as_tensor(subset_indices(len(x), N, 0))
    x, y = x[idx], y[idx]
    traj = Trajectory(path)
    model = traj.build_model()
    for (i,), r in fc.rows.items():
        sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
        u0, u1 = _units(model, sa, sb, 0.0, x, y, "eval"), _units(model, sa, sb, 1.0, x, y, "eval")
        us = _units(model, sa, sb, float(r["a_star"]), x, y, "eval")
        want = bool(2e-5 < r["a_star"] < 1 - 2e-5 and u0.mean() - us.mean() > z * _sd_se(u0 - us)
                    and u1.mean() - us.mean() > z * _sd_se(u1 - us))
        assert r["interior"] == want
        assert r["interior"] <= fa.rows[(i,)]["interior"]  # a margin only removes interior floors
        if z == 1e6:
            assert not r["interior"]


def test_bad_significance_is_one_error_line(archives, tmp_path):
    from trajectory.analysis.errors import AnalysisError

    with pytest.raises(AnalysisError, match="significance"):
        analyze(archives["plain"], tmp_path / "x.h5", metrics=["floor"], eval="subset:50", options={"significance": -1})


def test_stderr_helpers_closed_form():
    u = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_se(u) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert diff_se(u, u) == 0.0
    assert math.isnan(mean_se(np.array([1.0])))
    np.testing.assert_allclose(mean_se(np.stack([u, 2 * u])), [math.sqrt(5 / 3) / 2, math.sqrt(5 / 3)])
