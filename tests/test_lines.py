"""``analyze_line`` / ``sgdwalk line``: the parabola of a quadratic loss between two records, a float64 loop on
the line between two archives (two seeds), the paired batch-means standard errors, identities, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from issue14_support import linear_data, linear_model, record_linear, splits
from test_analysis_support import brute_force, data_spec, mlp_spec, record_mlp
from trajectory.analysis.errors import AnalysisError
from trajectory.analysis.identity import archive_identity
from trajectory.analysis.line import analyze_line, line_curve_stats, parse_endpoint
from trajectory.archive.reader import Trajectory


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("lines")
    return record_mlp(d / "a.h5", steps=5, lr=0.3, seed=1), record_mlp(d / "b.h5", steps=5, lr=0.3, seed=2)


def test_line_between_two_records_is_the_parabola(tmp_path):
    d = 3
    x, y, w_star = linear_data(200, d, 0.5, seed=1)
    xt, yt, _ = linear_data(500, d, 0.5, seed=2, w_star=w_star)
    arch = record_linear(tmp_path / "lin.h5", x, y, steps=6, lr=0.1)
    t = np.linspace(-0.5, 1.5, 9)
    res = analyze_line(f"{arch}:0", f"{arch}:last", alphas=list(t), model=linear_model(d), data=splits(x, y, xt, yt),
                       loss="mse", se_chunks=0)
    with Trajectory(arch) as traj:
        wa, wb = traj.params(0).double(), traj.params(len(traj) - 1).double()
    X, Y = xt.double(), yt.double()[:, 0]
    r0 = X @ wa - Y
    dr = X @ (wb - wa)
    # L(t) = mean((r0 + t·dr)²) = c + b·t + a·t²
    a, b, c = float((dr * dr).mean()), float(2 * (r0 * dr).mean()), float((r0 * r0).mean())
    np.testing.assert_allclose(res.loss, c + b * t + a * t * t, rtol=1e-10)
    t_min = -b / (2 * a)
    assert abs(res.floor_t - t[np.argmin(np.abs(t - t_min))]) < 0.26  # the grid point nearest the vertex
    assert res.barrier == pytest.approx(max(res.loss) - max(res.loss[0], res.loss[-1]))
    assert np.isnan(res.loss_se).all() and np.isnan(res.barrier_se)


def test_two_archive_line_matches_a_float64_loop(seeds):
    a, b = seeds
    t = [0.0, 0.3, 0.5, 0.8, 1.0]
    res = analyze_line(f"{a}:last", f"{b}:last", alphas=t, eval="test", se_chunks=4)
    xt, yt = data_spec().build(split="test").tensors
    with Trajectory(a) as ta, Trajectory(b) as tb:
        sa, sb = ta.state_dict(len(ta) - 1), tb.state_dict(len(tb) - 1)
        ids = [str(archive_identity(ta)), str(archive_identity(tb))]
    ref_l, ref_a = brute_force(mlp_spec().build(), sa, sb, t, xt, yt)
    np.testing.assert_allclose(res.loss, ref_l, rtol=1e-10)
    np.testing.assert_allclose(res.acc, ref_a)
    assert [e["identity"] for e in res.ends] == ids and ids[0] != ids[1]
    # paired batch-means SE: the curve on 4 disjoint chunks, sd over chunks / 2
    parts = torch.tensor_split(torch.arange(len(xt)), 4)
    per = np.stack([brute_force(mlp_spec().build(), sa, sb, t, xt[p], yt[p])[0] for p in parts])
    np.testing.assert_allclose(res.loss_se, per.std(axis=0, ddof=1) / 2, rtol=1e-8)
    k = int(np.argmax(ref_l))
    bar = per[:, k] - np.maximum(per[:, 0], per[:, -1])
    np.testing.assert_allclose(res.barrier_se, bar.std(ddof=1) / 2, rtol=1e-8)
    stats = line_curve_stats(np.array(t), ref_l)
    assert res.monotonic == stats["monotonic"] and res.barrier == pytest.approx(stats["barrier"])
    # largest rise: brute force over every ordered pair of grid points, its SE paired over the same chunks
    rises = [(ref_l[j] - ref_l[i], i, j) for i in range(len(t)) for j in range(i + 1, len(t))]
    r, i, j = max(rises)
    assert r > 0  # two seeds' ends: the line rises between them
    assert res.max_rise == pytest.approx(r, rel=1e-9) and res.max_rise_t == [t[i], t[j]]
    np.testing.assert_allclose(res.max_rise_se, (per[:, j] - per[:, i]).std(ddof=1) / 2, rtol=1e-8)


def test_curve_stats_closed_forms():
    t = np.linspace(0, 1, 5)
    s = line_curve_stats(t, np.array([1.0, 1.5, 2.0, 1.2, 0.5]))
    assert s["barrier"] == 1.0 and s["barrier_t"] == 0.5 and s["floor_t"] == 1.0 and not s["monotonic"]
    assert line_curve_stats(t, np.array([3.0, 2.0, 2.0, 1.0, 0.0]))["monotonic"]
    assert line_curve_stats(t, np.array([3.0, 2.0, 2.0, 1.0, 0.0]))["max_rise"] == 0.0
    s = line_curve_stats(t, np.array([2.0, 1.0, 1.6, 0.2, 0.9]))  # rises 0.6 then 0.7: the later, larger one
    assert s["max_rise"] == pytest.approx(0.7) and s["max_rise_t"] == [0.75, 1.0]


def test_endpoints_and_bad_input(seeds, tmp_path):
    a, _ = seeds
    assert parse_endpoint("x.h5:12").step == 12 and parse_endpoint("x.h5").step == "last"
    with pytest.raises(AnalysisError, match="integer"):
        parse_endpoint("x.h5:abc")
    with pytest.raises(AnalysisError, match="no record at step 99"):
        analyze_line(f"{a}:0", f"{a}:99")
    with pytest.raises(AnalysisError, match="minibatch"):
        analyze_line(f"{a}:0", f"{a}:1", eval="minibatch")
    other = record_mlp(tmp_path / "wide.h5", steps=2, seed=0, batchnorm=True)
    with pytest.raises(AnalysisError, match="different layouts"):
        analyze_line(f"{a}:0", f"{other}:0")


def test_cli_line_prints_the_table_and_writes_json(seeds, tmp_path):
    a, b = seeds
    out = tmp_path / "line.json"
    p = subprocess.run([sys.executable, "-m", "cli", "line", f"{a}:0", f"{b}:last", "--alphas", "0:1:3", "--eval",
                        "subset:100", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "barrier" in p.stdout and "monotonic" in p.stdout
    saved = json.loads(out.read_text())
    assert len(saved["loss"]) == 3 and len(saved["ends"]) == 2
    bad = subprocess.run([sys.executable, "-m", "cli", "line", f"{a}:0", f"{a}:77"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
