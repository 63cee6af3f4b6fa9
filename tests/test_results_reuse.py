"""Results files written by an earlier release are reused by the current analyzer: 0 rows computed, values unchanged.

The fixtures in tests/data/ were written by the analyzer at commit 178cb86, before the engine was split into
plan/replay/run modules and before the evaluation strategy was recorded (see tests/data/README.md). If this test
fails because the configuration hash of a metric changed, existing users' results would be recomputed: that is a
behaviour change to make deliberately (bump the metric's ``version``) and to announce, not to absorb by editing the
fixtures.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from trajectory.analysis import ResultsFile, analyze, get_metric
from trajectory.analysis.errors import ResultsMismatchError

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data")
SAMPLE = os.path.join(DATA, "mnist1d_mlp_release0.h5")  # the sample archive as shipped by that release

#: Metrics whose ``version`` was deliberately bumped after the fixtures were written (their computation changed),
#: with the reason. Their old rows, and those of metrics that require them, are rightly not reused. An entry here
#: is a decision to recompute that metric for every existing results file; nothing else may stop being reused.
DELIBERATE_BUMPS: dict[str, str] = {
    "interpolation": "v2 (issue 13 item 1-2): loss_se column; --bn train groups are true batches of a seeded permutation",
    "floor": "v2 (issue 13 item 1): floor_se, loss_a_se, loss_b_se, height_se, height_start_se, height_max_se columns",
    "barriers": "v2 (issue 13 item 4): dip, beta_min, has_dip, barrier_se/dip_se, floor_a/b, height_a/b, floor_*_se columns",
    "hessian_top": "v2 (issue 13 item 5): eos_ratio momentum-aware, lambda_max*lr/(2 + 2*beta); momentum, eos_threshold columns",
    "sharpness": "v2 (issue 13 item 5): eos_ratio momentum-aware, lambda_max*lr/(2 + 2*beta); momentum, eos_threshold columns",
}


def _stale(before: dict) -> set[str]:
    """Metrics of the fixture whose stored version differs from the installed class, plus their dependents."""
    bumped = {key[0] for key, (cfg, _a) in before.items() if json.loads(cfg)["version"] != get_metric(key[0]).version}
    unexplained = bumped - set(DELIBERATE_BUMPS)
    assert not unexplained, (
        f"metric version changed since the fixtures were written: {sorted(unexplained)}; every existing results file "
        "will recompute them. If that is deliberate, add them to DELIBERATE_BUMPS in this test with the reason")
    stale, grew = set(bumped), True
    while grew:
        names = {key[0] for key in before}
        new = {n for n in names if set(get_metric(n).requires) & stale} - stale
        stale |= new
        grew = bool(new)
    return stale


def _snapshot(path: str) -> dict:
    f = ResultsFile(path, "r")
    return {key: (t.config_json, t.arrays()) for key, t in f.tables.items()}


def _same(before: dict, after: dict, stale: set[str] = frozenset()) -> None:
    assert set(before) <= set(after), f"tables lost: {set(before) - set(after)}"
    for key, (cfg, arrays) in before.items():
        if key[0] in stale:
            continue
        cfg2, arrays2 = after[key]
        assert cfg2 == cfg, f"{key}: stored configuration changed"
        assert set(arrays2) == set(arrays), key
        for col, arr in arrays.items():
            np.testing.assert_array_equal(arrays2[col], arr, err_msg=f"{key} column {col}")


def _analyze(archive: str, out: str, **kw):
    try:
        return analyze(archive, out, device="cpu", **kw)
    except ResultsMismatchError as err:  # pragma: no cover - only if archive_identity() is redefined
        pytest.fail(f"the fixture results no longer match their archive ({err}); a changed archive identity makes "
                    "every existing results file unusable: migrate old identities or regenerate the fixtures deliberately")


def _check_all_reused(rep, expected_units: dict[str, int], stale: set[str] = frozenset()) -> None:
    recomputed = {n: c for n, c in rep.computed.items() if c and n not in stale}
    assert not recomputed, f"recomputed rows: {recomputed}"
    for name, n in expected_units.items():
        if name in stale:
            assert rep.computed[name] == n, (name, rep.computed)  # a deliberate bump really recomputes
        else:
            assert rep.reused[name] == n, (name, rep.reused)


def test_default_metrics_of_the_sample_archive_are_reused(tmp_path):
    out = tmp_path / "old.results.h5"
    shutil.copy(os.path.join(DATA, "mnist1d_mlp_0-6.results.h5"), out)
    before = _snapshot(str(out))
    stale = _stale(before)
    rep = _analyze(SAMPLE, str(out), steps="0:6", eval="subset:200", alphas="0:1:11", progress=False)
    _check_all_reused(rep, {"interpolation": 6, "floor": 6, "geometry": 6, "barriers": 5}, stale)
    _same(before, _snapshot(str(out)), stale)


def test_batchnorm_archive_default_and_curvature_metrics_are_reused(tmp_path):
    arch = tmp_path / "cnn_bn_tiny.h5"
    out = tmp_path / "cnn_bn_tiny.results.h5"
    shutil.copy(os.path.join(DATA, "cnn_bn_tiny.h5"), arch)
    shutil.copy(os.path.join(DATA, "cnn_bn_tiny.results.h5"), out)
    before = _snapshot(str(out))
    stale = _stale(before)
    kw = dict(eval="subset:100", alphas="0:1:11", progress=False)
    rep = _analyze(str(arch), str(out), **kw)
    _check_all_reused(rep, {"interpolation": 6, "floor": 6, "geometry": 6, "barriers": 5}, stale)
    rep = _analyze(str(arch), str(out), metrics=["hessian_top", "sharpness"],
                   options={"k": 2, "iters": 20, "ascent_steps": 2, "noise_draws": 2}, **kw)
    _check_all_reused(rep, {"hessian_top": 6, "sharpness": 6}, stale)
    _same(before, _snapshot(str(out)), stale)
