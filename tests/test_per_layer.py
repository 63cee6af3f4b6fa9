"""``per_layer`` against float64 loops: per-group geometry from the flat records, and the one-group interpolation
by load_state_dict with only that group moved (every other group and the buffers at θ_i); the report draws it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_analysis_support import data_spec, mlp_spec, record_mlp
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.errors import AnalysisError
from trajectory.archive.reader import Trajectory

ALPHAS = [0.0, 0.5, 1.0, 2.0]


def _rows(path, metric):
    f = ResultsFile(path, "r")
    (t,) = [t for (m, _), t in f.tables.items() if m == metric]
    return t.arrays()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer")
    arch = record_mlp(d / "run.h5", steps=4, lr=0.3, seed=7)
    out = d / "r.h5"
    analyze(arch, out, metrics=["per_layer", "gradients", "eigen_split"], eval="test", dtype="float64",
            options={"layer_alphas": ALPHAS, "k": 2})
    return arch, out


def test_per_layer_matches_float64_loops(run):
    arch, out = run
    got = _rows(out, "per_layer")
    xt, yt = data_spec().build(split="test").tensors
    model = mlp_spec().build().double()
    names = [n for n, _ in model.named_parameters()]
    with Trajectory(arch) as traj:
        s0 = traj.state_dict(0)
        for r, i in enumerate(got["pair"]):
            i = int(i)
            sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
            sp = traj.state_dict(i - 1) if i > 0 else None
            assert got["layer_loss"][r].shape == (len(names) * len(ALPHAS),)
            curves = got["layer_loss"][r].reshape(len(names), len(ALPHAS))
            for j, n in enumerate(names):
                d = (sb[n].double() - sa[n].double()).reshape(-1)
                np.testing.assert_allclose(got["step_length"][r][j], float(d.norm()), rtol=1e-12)
                np.testing.assert_allclose(got["dist_init"][r][j], float((sa[n].double() - s0[n].double()).norm()), rtol=1e-12, atol=1e-15)
                if sp is None:
                    assert np.isnan(got["cos_prev"][r][j])
                else:
                    prev = (sa[n].double() - sp[n].double()).reshape(-1)
                    np.testing.assert_allclose(got["cos_prev"][r][j], float(d @ prev / (d.norm() * prev.norm())), rtol=1e-10)
                for k, a in enumerate(ALPHAS):
                    sd = {m: v.double() for m, v in sa.items()}
                    sd[n] = sa[n].double() + a * (sb[n].double() - sa[n].double())
                    model.load_state_dict(sd)
                    with torch.no_grad():
                        ref = float(F.cross_entropy(model(xt.double()), yt))
                    np.testing.assert_allclose(curves[j, k], ref, rtol=1e-10, err_msg=f"{n} a={a}")
            np.testing.assert_allclose(got["layer_height"][r], curves[:, ALPHAS.index(1.0)] - curves[:, 0], rtol=1e-12)


def test_bad_layer_alphas_is_one_error():
    from trajectory.analysis.metrics.per_layer import PerLayer

    with pytest.raises(AnalysisError, match="0 and 1"):
        PerLayer(layer_alphas=[0.0, 0.5])


def test_report_draws_the_issue14_figures(run, tmp_path):
    from trajectory.report import build_report

    _, out = run
    res = build_report([str(out)], tmp_path / "rep")
    for name in ("gradients", "eigen_split", "per_layer"):
        assert name in res.figures and name not in res.omitted
    html = (tmp_path / "rep" / "report.html").read_text()
    for title in ("Gradient dynamics", "Eigen-direction split", "Per-layer views"):
        assert title in html
