"""Progress counts model evaluations (one state over the evaluation set = 1), moves within blocks, starts with an
up-front estimate, and the evaluation strategy is recorded outside the configuration hash.

References: the number of model evaluations of interpolation is len(pairs) x len(alphas) (closed form); the floor's
is the sum of its ``evals`` column (Brent's own count); barriers' is units x barrier_points.
"""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from test_analysis_support import record_mlp
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.run import Progress, format_estimate

try:
    from trajectory.cli.analyze import analyze as analyze_cmd
except ImportError:  # pragma: no cover - source checkout without the package mapping
    from cli.analyze import analyze as analyze_cmd


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("progress") / "run.h5", steps=11, lr=1.5, seed=5)  # interior floors: Brent works


def test_bar_counts_model_evaluations_of_interpolation_exactly(archive, tmp_path):
    calls: list[tuple[float, float]] = []
    rep = analyze(archive, tmp_path / "r.h5", metrics=["interpolation"], steps="0:4", alphas="0:1:5", eval="subset:50",
                  device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert rep.computed == {"interpolation": 4}
    assert calls, "the progress callback was never called"
    assert calls[-1][0] == pytest.approx(4 * 5)  # 4 pairs x 5 points, each over the whole evaluation set
    assert calls[0][1] == pytest.approx(4 * 5)  # the estimate is exact for interpolation
    assert rep.estimate["evaluations"] == pytest.approx(20)
    done = [d for d, _ in calls]
    assert done == sorted(done)


def test_bar_moves_within_a_block_and_matches_brents_count(archive, tmp_path):
    calls: list[tuple[float, float]] = []
    out = tmp_path / "r.h5"
    rep = analyze(archive, out, metrics=["floor", "barriers"], alphas="0:1:5", eval="subset:50", device="cpu",
                  block_pairs=64, progress=lambda d, t: calls.append((d, t)))  # all 11 pairs in one block
    floor = rep.tables["floor"].arrays()
    bar = rep.tables["barriers"].arrays()
    assert len(floor["pair"]) == 11 and len(bar["pair"]) == 10 and floor["interior"].sum() >= 5
    expected = 11 * 5 + int(floor["evals"].sum()) + 11 * 3 + 10 * 11  # + a = 0, a*, 1 per pair for floor's standard errors
    assert calls[-1][0] == pytest.approx(expected)
    # one block, yet the count grows in many steps (points, not pairs): every Brent round reports
    assert len({round(d, 6) for d, _ in calls if 0 < d < expected}) >= 5
    # the total follows the work: it ends where the count ends
    assert calls[-1][1] == pytest.approx(expected)


def test_quiet_and_reused_runs_print_nothing(archive, tmp_path, capfd):
    out = tmp_path / "r.h5"
    analyze(archive, out, metrics=["interpolation"], steps="0:2", alphas="0:1:3", eval="subset:20", device="cpu", progress=False)
    again = analyze(archive, out, metrics=["interpolation"], steps="0:2", alphas="0:1:3", eval="subset:20", device="cpu",
                    progress=True)
    assert sum(again.computed.values()) == 0 and again.estimate == {} and again.strategy == {}
    err = capfd.readouterr().err
    assert "model evaluations" not in err and "eval/s" not in err


def test_estimate_line_format():
    est = {"evaluations": 1240.4, "rate": 2.0e5, "seconds": 210.0, "unknown": [], "world": 1, "strategy": "vmap"}
    assert format_estimate(est) == "~1,240 model evaluations, about 3.5 min at the calibrated rate (vmap, 2e+05 samples/s)"
    est = {"evaluations": 12.0, "rate": None, "seconds": None, "unknown": ["midloss"], "world": 1}
    line = format_estimate(est)
    assert line.startswith("~12 model evaluations (no calibrated rate") and "midloss unknown" in line


def test_progress_is_thread_safe():
    import threading

    seen = []
    p = Progress(lambda d, t: seen.append(d), eval_size=10)
    threads = [threading.Thread(target=lambda: [p.add(1.0) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.samples == 4000.0 and max(seen) == pytest.approx(400.0)


def test_curvature_cli_shows_estimate_and_a_moving_bar_with_eta(archive, tmp_path, monkeypatch):
    """The issue's acceptance: 10 pairs of hessian_top show an up-front estimate and a bar that moves with an ETA."""
    # print every update: no dependence on how fast this machine is, and no adaptive skipping of small updates after
    # a large one (tqdm reads TQDM_* environment defaults only when it is first imported, so patch the class instead)
    import functools

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))
    res = CliRunner().invoke(analyze_cmd, [archive, "--steps", "0:10", "--metric", "hessian_top", "--eval", "subset:50",
                                           "--device", "cpu", "--option", "iters=8", "--alphas", "0:1:3",
                                           "--progress", "--out", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.output
    err = res.stderr.replace("\r", "\n")
    assert re.search(r"^analyze: ~[\d,.]+ model evaluations", err, re.M), err[:500]
    bars = re.findall(r"(\d+)/(\d+) \[(\d\d:\d\d)<([\d:?]+)", err)
    assert bars, err[:500]
    moving = {int(n) for n, total, _e, _r in bars if 0 < int(n) < int(total)}
    assert len(moving) >= 3, f"the bar did not move: {sorted(moving)}"
    assert any(re.fullmatch(r"\d\d:\d\d", eta) for *_x, eta in bars), "no ETA shown"
    assert "rows computed" in res.stdout  # the final summary line stays


def test_quiet_cli_prints_no_bar(archive, tmp_path):
    res = CliRunner().invoke(analyze_cmd, [archive, "--steps", "0:2", "--metric", "interpolation", "--eval", "subset:20",
                                           "--device", "cpu", "--progress", "-q", "--out", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert "2 rows computed, 0 reused" in res.stdout


def test_strategy_is_recorded_outside_the_configuration_hash(archive, tmp_path):
    out = tmp_path / "r.h5"
    kw = dict(metrics=["interpolation", "geometry"], steps="0:3", alphas="0:1:3", eval="subset:20", device="cpu")
    rep = analyze(archive, out, **kw)
    assert rep.strategy.get("name") and rep.strategy.get("device") == "cpu"
    with h5py.File(out, "r") as f:
        (h,) = f["metrics/interpolation"].keys()
        g = f[f"metrics/interpolation/{h}"]
        replay = json.loads(g.attrs["replay"])
        assert replay == {"1": rep.strategy}  # keyed by the run that computed the rows
        assert "strategy" not in g.attrs["config"] and "replay" not in g.attrs["config"]
        (hg,) = f["metrics/geometry"].keys()
        assert "replay" not in f[f"metrics/geometry/{hg}"].attrs  # evaluates nothing
    # another strategy request selects the same table: nothing recomputed, same hash
    again = analyze(archive, out, strategy="auto", **{**kw, "steps": "0:4"})
    assert again.computed == {"interpolation": 1, "geometry": 1} and again.reused == {"interpolation": 3, "geometry": 3}
    t = ResultsFile(out, "r").by_metric("interpolation")
    assert len(t) == 1 and set(t[0].replay) == {"1", "2"}
    np.testing.assert_array_equal(t[0].arrays()["run"], [1, 1, 1, 2])


def test_bad_strategy_is_one_error_line(archive, tmp_path):
    res = CliRunner().invoke(analyze_cmd, [archive, "--strategy", "fast", "--out", str(tmp_path / "r.h5")])
    assert res.exit_code == 2
    assert "fast" in res.output
    from trajectory.analysis import AnalysisError

    with pytest.raises(AnalysisError, match="--strategy"):
        analyze(archive, tmp_path / "r2.h5", strategy="fast")
