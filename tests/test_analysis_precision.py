"""Curves flatter than float32 can resolve: the floor metric says so (once) instead of reporting rounding noise."""
from __future__ import annotations

import warnings

import pytest

from test_analysis_support import record_mlp
from trajectory.analysis import analyze
from trajectory.analysis.metrics.floor import FLAT_CURVE_NATS


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    # lr 1e-9: every update moves the loss by far less than FLAT_CURVE_NATS
    return record_mlp(tmp_path_factory.mktemp("flat") / "flat.h5", steps=3, lr=1e-9, seed=2)


def test_float32_warns_on_unresolvable_curves(frozen, tmp_path):
    with pytest.warns(UserWarning, match="below float32 resolution"):
        rep = analyze(frozen, tmp_path / "f32.h5", eval="subset:200", metrics=["floor"])
    assert rep.computed["floor"] == 3


def test_float64_and_resolvable_curves_do_not_warn(frozen, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze(frozen, tmp_path / "f64.h5", eval="subset:200", metrics=["floor"], dtype="float64")
        lively = record_mlp(tmp_path / "lively.h5", steps=3, lr=0.3, seed=2)
        analyze(lively, tmp_path / "l32.h5", eval="subset:200", metrics=["floor"])
    assert FLAT_CURVE_NATS == 1e-6
