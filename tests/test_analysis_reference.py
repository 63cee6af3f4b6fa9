"""Every metric against a plain float64 brute-force loop (load_state_dict, model(x), per point).

Tolerances: the engine in float64 must agree with the float64 reference to 1e-9 (relative, plus
1e-12 absolute); float32 to 2e-5 relative. Floors are checked against scipy's bounded minimiser
run on the brute-force loss.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from test_analysis_support import brute_force, data_spec, mlp_spec, record_mlp
from trajectory import Trajectory
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.data import subset_indices
from trajectory.analysis.evaluator import Evaluator

ALPHAS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return {
        "plain": record_mlp(d / "plain.h5", steps=6, lr=0.5, seed=1),
        "bn": record_mlp(d / "bn.h5", steps=5, lr=0.3, seed=2, batchnorm=True),
    }


def _table(path, metric):
    with_tables = ResultsFile(path, "r").by_metric(metric)
    assert len(with_tables) == 1
    return with_tables[0]


def _eval_data(n=256):
    x, y = data_spec().build(split="train").tensors
    idx = torch.as_tensor(subset_indices(len(x), n, 0))
    return x[idx], y[idx]


@pytest.mark.parametrize("bn_kind,bn", [("plain", "eval"), ("bn", "eval"), ("bn", "train")])
def test_interpolation_floor_barriers_match_float64_loop(archives, tmp_path, bn_kind, bn):
    path = archives[bn_kind]
    out = tmp_path / "r.h5"
    rep = analyze(path, out, eval="subset:256", bn=bn, dtype="float64", alphas=ALPHAS, spans="1,2",
                  options={"xtol": 1e-7}, bn_batch=64)
    assert rep.computed["interpolation"] == len(Trajectory(path)) - 1 > 0
    x, y = _eval_data()
    traj = Trajectory(path)
    model = traj.build_model()
    interp = _table(out, "interpolation")
    floor = _table(out, "floor")
    for (i,), row in interp.rows.items():
        sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
        ref_l, ref_a = brute_force(model, sa, sb, ALPHAS, x, y, bn=bn, bn_batch=64)
        np.testing.assert_allclose(row["loss"], ref_l, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row["acc"], ref_a, rtol=0, atol=1e-12)
        # valley floor: scipy's bounded minimiser on the brute-force loss over the same bracket
        fl = floor.rows[(i,)]
        f = lambda a: brute_force(model, sa, sb, [a], x, y, bn=bn, bn_batch=64)[0][0]  # noqa: E731
        j = int(np.argmin(ref_l))
        lo, hi = (ALPHAS[max(0, j - 1)], ALPHAS[min(len(ALPHAS) - 1, j + 1)]) if 0 < j < len(ALPHAS) - 1 else (
            (ALPHAS[0], ALPHAS[1]) if j == 0 else (ALPHAS[-2], ALPHAS[-1]))
        res = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
        best = min(res.fun, ref_l[j])
        assert fl["floor_loss"] == pytest.approx(best, rel=1e-8, abs=1e-12)
        assert fl["floor_loss"] <= ref_l.min() + 1e-12
        assert fl["height_start"] == pytest.approx(ref_l[0] - fl["floor_loss"], rel=1e-8, abs=1e-12)
        assert fl["height_max"] == pytest.approx(max(ref_l[0], ref_l[-1]) - fl["floor_loss"], rel=1e-8, abs=1e-12)
        assert f(float(fl["a_star"])) == pytest.approx(fl["floor_loss"], rel=1e-9, abs=1e-12)
    # barriers: brute-force path between floor points
    bar = _table(out, "barriers")
    assert {k[1] for k in bar.rows} == {1, 2}
    for (t, k), row in list(bar.rows.items())[:3]:
        a1, a2 = floor.rows[(t,)]["a_star"], floor.rows[(t + k,)]["a_star"]
        def phi(i, a):
            sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
            return {n: (sa[n].double() + a * (sb[n].double() - sa[n].double())) if sa[n].is_floating_point() else sa[n] for n in sa}
        pa, pb = phi(t, a1), phi(t + k, a2)
        betas = np.linspace(0, 1, 11)
        ref_l, _ = brute_force(model, pa, pb, betas, x, y, bn=bn, bn_batch=64)
        np.testing.assert_allclose(row["path_loss"], ref_l, rtol=1e-9, atol=1e-12)
        assert row["barrier"] == pytest.approx(ref_l.max() - max(ref_l[0], ref_l[-1]), abs=1e-12)
    traj.close()


def test_float32_close_to_float64_reference_and_minibatch(archives, tmp_path):
    path = archives["plain"]
    out = tmp_path / "r.h5"
    analyze(path, out, eval="minibatch", metrics=["interpolation"], alphas=ALPHAS)
    traj = Trajectory(path)
    model = traj.build_model()
    x, y = data_spec().build(split="train").tensors
    for (i,), row in _table(out, "interpolation").rows.items():
        idx = torch.as_tensor(traj.batch_indices(i))
        ref_l, ref_a = brute_force(model, traj.state_dict(i), traj.state_dict(i + 1), ALPHAS, x[idx], y[idx])
        np.testing.assert_allclose(row["loss"], ref_l, rtol=2e-5)
        np.testing.assert_allclose(row["acc"], ref_a, atol=1e-9)
    traj.close()


def test_recompute_policy_matches_reference(archives, tmp_path):
    path = archives["bn"]
    out = tmp_path / "r.h5"
    analyze(path, out, eval="subset:128", bn="recompute", dtype="float64", metrics=["interpolation"], alphas=[0.0, 0.5, 1.0],
            bn_batch=50, bn_batches=3, steps="0:2")
    traj = Trajectory(path)
    model = traj.build_model().double()
    x, y = _eval_data(128)
    xt, _ = data_spec().build(split="train").tensors
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(xt), generator=g)
    batches = [xt[perm[j * 50:(j + 1) * 50]].double() for j in range(3)]
    for (i,), row in _table(out, "interpolation").rows.items():
        sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
        for a, got in zip([0.0, 0.5, 1.0], row["loss"]):
            sd = {n: (sa[n].double() + a * (sb[n].double() - sa[n].double())) if sa[n].is_floating_point() else sa[n] for n in sa}
            model.load_state_dict(sd)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average
            model.train()
            with torch.no_grad():
                for b in batches:
                    model(b)
            model.eval()
            with torch.no_grad():
                ref = torch.nn.functional.cross_entropy(model(x.double()), y).item()
            assert got == pytest.approx(ref, rel=1e-9)
    traj.close()


def test_geometry_matches_numpy(archives, tmp_path):
    path = archives["plain"]
    out = tmp_path / "g.h5"
    analyze(path, out, metrics=["geometry"])
    traj = Trajectory(path)
    P = [traj.params(i).double().numpy() for i in range(len(traj))]
    lr = traj.scalars["lr"]
    for (i,), row in _table(out, "geometry").rows.items():
        d = P[i + 1] - P[i]
        assert row["step_length"] == pytest.approx(np.linalg.norm(d), rel=1e-12)
        assert row["dist_init"] == pytest.approx(np.linalg.norm(P[i] - P[0]), rel=1e-12, abs=1e-15)
        if i > 0:
            prev = P[i] - P[i - 1]
            assert row["cos_prev"] == pytest.approx(d @ prev / np.linalg.norm(d) / np.linalg.norm(prev), rel=1e-10)
        else:
            assert np.isnan(row["cos_prev"])
        assert row["lr"] == pytest.approx(lr[i])
    traj.close()


def test_mlp_fast_path_matches_generic_vmap(archives):
    traj = Trajectory(archives["plain"])
    model = traj.build_model()
    x, y = _eval_data(300)
    states = torch.stack([torch.cat([traj.params(i), traj.buffers(i)]) for i in range(4)]).double()
    fast = Evaluator(model, traj.layout, dtype=torch.float64, bn="eval")
    slow = Evaluator(model, traj.layout, dtype=torch.float64, bn="eval", fast_path=False)
    assert fast._plan is not None and slow._plan is None
    lf, af = fast.evaluate(states, x.double(), y)
    ls, as_ = slow.evaluate(states, x.double(), y)
    np.testing.assert_allclose(lf, ls, rtol=1e-12)
    np.testing.assert_allclose(af, as_)
    traj.close()


def test_minibatch_replay_reproduces_the_recorded_training_loss(archives, tmp_path):
    """--eval minibatch --bn train at a = 0 is exactly the forward pass training did on that minibatch."""
    path = archives["bn"]
    out = tmp_path / "mb.h5"
    analyze(path, out, eval="minibatch", bn="train", metrics=["interpolation"], alphas=[0.0, 1.0])
    traj = Trajectory(path)
    recorded = traj.scalars["loss"]
    rows = _table(out, "interpolation").rows
    for (i,), row in rows.items():
        assert row["loss"][0] == pytest.approx(recorded[i], rel=1e-5)
    traj.close()


@pytest.mark.parametrize("max_points", [None, 7, 10, 64])
def test_first_layer_line_sharing_matches_plain_states(archives, max_points):
    """Points given as lines (first layer computed once per line) = the same points given as plain states."""
    traj = Trajectory(archives["plain"])
    x, y = _eval_data(300)
    rec = [torch.cat([traj.params(i), traj.buffers(i)]).double() for i in range(4)]
    A, B = torch.stack(rec[:-1]), torch.stack(rec[1:])
    t = torch.tensor(ALPHAS, dtype=torch.float64).repeat(3)
    owner = torch.arange(3).repeat_interleave(len(ALPHAS))
    states = torch.lerp(A[owner], B[owner], t.view(-1, 1))
    ev = Evaluator(traj.build_model(), traj.layout, dtype=torch.float64, bn="eval", max_points=max_points)
    l1, a1 = ev.evaluate(states, x.double(), y, lines=(A, B, owner, t))
    l2, a2 = ev.evaluate(states, x.double(), y)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    np.testing.assert_allclose(a1, a2)
    traj.close()
