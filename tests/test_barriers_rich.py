"""Barriers made richer (issue 13 item 4): dip, floor-sequence peaks with prominence, threshold kinds.

Closed forms: a bowl whose straight floor-to-floor path dips by exactly 0.5 below both floors; the two-basin
function whose floors sit in different basins (barrier 1, dip 0). Peaks and prominences against a float64
brute-force loop written from the definition. Float64 throughout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.errors import AnalysisError
from trajectory.analysis.metrics.barriers import Barriers, floor_peaks, path_barrier_dip, threshold

from test_analysis_closed_form import _Landscape, _record, _rows

try:
    import trajectory.analysis.stderr  # noqa: F401 - issue 13 item 1
    HAVE_SE = True
except ImportError:  # pragma: no cover
    HAVE_SE = False


class _Bowl(nn.Module):
    """MSE against zero targets of sqrt(w0² + w1²): the loss is the bowl w0² + w1²."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x):
        return torch.sqrt(self.w[0] ** 2 + self.w[1] ** 2) * torch.ones_like(x[:, :1])


DATA = {"train": TensorDataset(torch.zeros(8, 1, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64))}


def _run(tmp_path, model_cls, ws, **options):
    thetas = [torch.tensor(w, dtype=torch.float64) for w in ws]
    path = _record(tmp_path / "r.h5", model_cls(), thetas)
    out = tmp_path / "r.results.h5"
    rep = analyze(path, out, model=model_cls(), data=DATA, loss="mse", eval="train", dtype="float64", spans="1,2",
                  options={"xtol": 1e-9, **options})
    return _rows(out, "floor"), _rows(out, "barriers"), rep


def test_bowl_path_between_floors_dips_by_exactly_one_half(tmp_path):
    # segments (-1,1)->(1,1) and (1,1)->(1,-1): floors (0,1) and (1,0), both loss 1, interior;
    # the path (β, 1−β) has loss β² + (1−β)², minimum 0.5 at β = 0.5 (a grid point of the 11-point path)
    floor, bars, rep = _run(tmp_path, _Bowl, [(-1.0, 1.0), (1.0, 1.0), (1.0, -1.0), (1.0, -3.0)])
    assert floor[(0,)]["floor_loss"] == pytest.approx(1.0, rel=1e-9) and floor[(1,)]["floor_loss"] == pytest.approx(1.0, rel=1e-9)
    b = bars[(0, 1)]
    assert b["dip"] == pytest.approx(0.5, rel=1e-8)
    assert b["beta_min"] == pytest.approx(0.5)
    assert b["has_dip"]  # 0.5 > 1e-3 nats
    assert b["barrier"] == pytest.approx(0.0, abs=1e-8) and not b["has_barrier"]
    beta = np.linspace(0, 1, 11)
    np.testing.assert_allclose(b["path_loss"], beta ** 2 + (1 - beta) ** 2, rtol=1e-8)
    assert b["floor_a"] == pytest.approx(1.0, rel=1e-9) and b["height_a"] == pytest.approx(2.0 - 1.0, rel=1e-8)
    if HAVE_SE:  # every sample has the same loss here: the paired errors are exactly 0
        assert b["barrier_se"] == 0.0 and b["dip_se"] == 0.0
    else:  # no per-unit losses in this build's evaluation
        assert math.isnan(b["barrier_se"]) and math.isnan(b["dip_se"])
    (bt,) = [t for t in rep.summary["tables"] if t["metric"] == "barriers"]
    # unit (1, 1): (1, 0) -> pair 2's floor at its start (1, −1) climbs monotonically: no dip
    assert bars[(1, 1)]["dip"] == pytest.approx(0.0, abs=1e-12) and not bars[(1, 1)]["has_dip"]
    assert bt["summary"]["span1"]["dip_fraction"] == pytest.approx(0.5)
    assert bt["summary"]["span1"]["median_dip"] == pytest.approx(0.25, rel=1e-8)


def test_two_basin_floors_have_a_barrier_and_no_dip_and_thresholds_decide(tmp_path):
    ws = [(-1.2, 0.0), (-0.8, 0.0), (0.8, 0.0), (1.2, 0.0)]
    floor, bars, _ = _run(tmp_path, lambda: _Landscape(True), ws)
    b = bars[(0, 2)]  # (-1, 0) -> (1, 0): barrier exactly 1 at β = 0.5, the ends are the minima
    assert b["barrier"] == pytest.approx(1.0, rel=1e-9) and b["dip"] == pytest.approx(0.0, abs=1e-12)
    assert b["has_barrier"] and not b["has_dip"]
    h0 = (1.44 - 1) ** 2  # height of pair 0: L(θ0) − floor = h(−1.2) − 0
    assert b["height_a"] == pytest.approx(h0, rel=1e-8)
    # absolute thresholds either side of 1
    _, bars, _ = _run(tmp_path / "a", lambda: _Landscape(True), ws, barrier_tol=0.99)
    assert bars[(0, 2)]["has_barrier"]
    _, bars, _ = _run(tmp_path / "b", lambda: _Landscape(True), ws, barrier_tol=1.01)
    assert not bars[(0, 2)]["has_barrier"]
    # relative thresholds: τ·height_a either side of 1 (1/h0 = 5.17)
    _, bars, _ = _run(tmp_path / "c", lambda: _Landscape(True), ws, barrier_tol=5.0, tol_kind="rel")
    assert bars[(0, 2)]["has_barrier"]
    _, bars, _ = _run(tmp_path / "d", lambda: _Landscape(True), ws, barrier_tol=5.3, tol_kind="rel")
    assert not bars[(0, 2)]["has_barrier"]
    if HAVE_SE:  # identical per-sample losses: SE 0, so any positive barrier is τ standard errors above 0
        _, bars, _ = _run(tmp_path / "e", lambda: _Landscape(True), ws, barrier_tol=3.0, tol_kind="se")
        assert bars[(0, 2)]["has_barrier"] and not bars[(0, 1)]["has_barrier"]


@pytest.fixture
def tmp_path(tmp_path):  # noqa: F811 - subdirectories for the repeated runs
    for sub in "abcde":
        (tmp_path / sub).mkdir()
    return tmp_path


def test_se_thresholds_without_the_se_api_and_bad_options_are_one_line_errors():
    class OldCtx(_FakeCtx):
        def evaluate_lines(self, lines):  # an evaluation without per-unit losses
            return super().evaluate_lines(lines)

    with pytest.raises(AnalysisError, match="tol_kind=se needs paired standard errors"):
        Barriers(barrier_points=5, tol_kind="se").compute(OldCtx({0: np.ones(5)}), [(0, 1)])
    assert Barriers(barrier_points=5).compute(OldCtx({0: np.ones(5)}), [(0, 1)])[0]["barrier"] == 0.0
    with pytest.raises(AnalysisError, match="tol_kind 'sd'"):
        Barriers(tol_kind="sd")
    with pytest.raises(AnalysisError, match="barrier_tol"):
        Barriers(barrier_tol=-1)


class _FakeCtx:
    """Just enough of a replay context for Barriers.compute: floors at records, fixed paths, per-unit losses whose
    means are the paths (the evaluation's ``units=True`` API of issue 13 item 1)."""

    def __init__(self, paths, units=40):
        rng = np.random.default_rng(0)
        self.paths = paths
        self.per = {}
        for t, loss in paths.items():
            z = rng.standard_normal((len(loss), units)) * 0.3
            self.per[t] = loss[:, None] + z - z.mean(axis=1, keepdims=True)

    def rows(self, metric, pairs):
        n = len(pairs)
        return {"a_star": np.zeros(n), "floor_loss": np.arange(n, dtype=float), "height": np.full(n, 0.5),
                "floor_se": np.full(n, 0.01)}

    def state(self, i):
        return torch.tensor([float(i)])

    def line(self, a, b, ts):
        return [a]

    def evaluate_lines(self, lines, units=False):
        return [(self.paths[int(l[3])], None, self.per[int(l[3])]) if units else (self.paths[int(l[3])], None)
                for l in lines]


def _paired_se_brute(u1, u2):
    d = [float(a) - float(b) for a, b in zip(u1, u2)]
    m = sum(d) / len(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))


def test_se_thresholds_use_the_paired_se_of_the_right_points():
    up = np.array([1.0, 1.3, 1.05, 1.0, 1.2])  # barrier 0.1 above the higher end (1.2, index 4) at index 1; dip 0
    down = np.array([1.0, 0.5, 0.7, 0.95, 0.9])  # dip 0.4 below the lower end (0.9, index 4) at index 1; barrier 0
    ctx = _FakeCtx({0: up, 1: down})
    pytest.importorskip("trajectory.analysis.stderr")
    se_b = _paired_se_brute(ctx.per[0][1], ctx.per[0][4])  # barrier: path maximum vs the higher end
    se_d = _paired_se_brute(ctx.per[1][4], ctx.per[1][1])  # dip: the lower end vs the path minimum
    for tau, has_b, has_d in [(0.9 * 0.1 / se_b, True, None), (1.1 * 0.1 / se_b, False, None)]:
        r_up, r_down = Barriers(barrier_points=5, tol_kind="se", barrier_tol=tau).compute(ctx, [(0, 1), (1, 1)])
        assert r_up["barrier"] == pytest.approx(0.1) and r_up["has_barrier"] is has_b
    assert r_up["barrier_se"] == pytest.approx(se_b, rel=1e-12)
    assert r_down["dip"] == pytest.approx(0.4) and r_down["dip_se"] == pytest.approx(se_d, rel=1e-12)
    r_down = Barriers(barrier_points=5, tol_kind="se", barrier_tol=0.99 * 0.4 / se_d).compute(ctx, [(1, 1)])[0]
    assert r_down["has_dip"]
    r_down = Barriers(barrier_points=5, tol_kind="se", barrier_tol=1.01 * 0.4 / se_d).compute(ctx, [(1, 1)])[0]
    assert not r_down["has_dip"]
    assert r_up["dip_se"] == pytest.approx(0.0, abs=1e-15)  # zero dip: its minimum is an end, paired with itself
    assert r_up["floor_a_se"] == 0.01


def _peaks_brute(f):
    """Strict local maxima (no plateaus in the inputs) and their prominence from the definition: for each
    side, walk until a higher point or the end, keep the side minimum; prominence = peak − max(side minima)."""
    idx, prom = [], []
    for i in range(1, len(f) - 1):
        if not (f[i] > f[i - 1] and f[i] > f[i + 1]):
            continue
        lo_l = f[i]
        j = i - 1
        while j >= 0 and f[j] <= f[i]:
            lo_l = min(lo_l, f[j])
            j -= 1
        lo_r = f[i]
        j = i + 1
        while j < len(f) and f[j] <= f[i]:
            lo_r = min(lo_r, f[j])
            j += 1
        idx.append(i)
        prom.append(f[i] - max(lo_l, lo_r))
    return np.array(idx, dtype=int), np.array(prom)


def test_floor_peaks_closed_form_and_brute_force():
    f = [3.0, 1.0, 2.0, 0.5, 4.0, 3.5, 3.7, 0.0]
    idx, prom, lb, rb = floor_peaks(f)
    # peaks at 2 (2.0: bases 1.0 and 0.5 -> 1.0), 4 (4.0: left min 0.5 down to the start since 3.0 < 4, right 0 -> 4 - 0.5),
    # 6 (3.7: left base 3.5 before the higher 4.0, right 0.0 -> 0.2)
    np.testing.assert_array_equal(idx, [2, 4, 6])
    np.testing.assert_allclose(prom, [1.0, 3.5, 0.2])
    rng = np.random.default_rng(3)
    for _ in range(50):
        g = rng.standard_normal(int(rng.integers(3, 40)))
        i1, p1, _, _ = floor_peaks(g)
        i2, p2 = _peaks_brute(g)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(p1, p2, rtol=0, atol=1e-15)
    # a NaN splits the sequence instead of creating or hiding a peak
    idx, prom, _, _ = floor_peaks([0.0, 2.0, 1.0, np.nan, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(idx, [1, 5])
    np.testing.assert_allclose(prom, [1.0, 1.0])


def test_summary_counts_floor_peaks_above_each_threshold_kind():
    # span-1 units over pairs 0..4 with floors 0, 2, 1, 1.5, 0 -> peaks at pairs 1 (prominence 2) and 3 (0.5)
    floors = np.array([0.0, 2.0, 1.0, 1.5, 0.0])
    rows = {"pair": np.arange(4), "span": np.ones(4, dtype=int), "floor_a": floors[:-1], "floor_b": floors[1:],
            "height_a": np.full(4, 4.0), "height_b": np.full(4, 4.0), "floor_a_se": np.full(4, 0.1),
            "floor_b_se": np.full(4, 0.1), "barrier": np.zeros(4), "has_barrier": np.zeros(4, bool),
            "dip": np.zeros(4), "has_dip": np.zeros(4, bool), "nonfinite": np.zeros(4, bool)}
    s = Barriers(barrier_tol=0.7).summarize(rows)
    assert s["floor_peaks"] == 2 and s["floor_peaks_above_tol"] == 1 and s["max_prominence"] == pytest.approx(2.0)
    assert Barriers(barrier_tol=0.1, tol_kind="rel").summarize(rows)["floor_peaks_above_tol"] == 2  # 0.4 nats
    assert Barriers(barrier_tol=0.2, tol_kind="rel").summarize(rows)["floor_peaks_above_tol"] == 1  # 0.8 nats
    # se: sqrt(0.1² + 0.1²) = 0.1414; 4 SE = 0.566 keeps only the prominence-2 peak, 3 SE = 0.424 both
    assert Barriers(barrier_tol=4, tol_kind="se").summarize(rows)["floor_peaks_above_tol"] == 1
    assert Barriers(barrier_tol=3, tol_kind="se").summarize(rows)["floor_peaks_above_tol"] == 2


def test_path_barrier_dip_and_threshold_closed_forms():
    assert path_barrier_dip(np.array([1.0, 3.0, 2.0])) == (1.0, 1, 0.0, 0)
    assert path_barrier_dip(np.array([1.0, 0.25, 2.0])) == (0.0, 2, 0.75, 1)
    assert threshold("abs", 0.5) == 0.5 and threshold("rel", 0.5, height=4.0) == 2.0 and threshold("se", 3.0, se=0.5) == 1.5
