"""Results(path).to_pandas(metric): long format that round-trips every built-in metric's rows exactly."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_mlp, sgd_run, toy_data
from torch.utils.data import TensorDataset

import trajectory
from trajectory import Recorder
from trajectory.analysis import ResultsFile, analyze, available_metrics
from trajectory.errors import SgdwalkError

pd = pytest.importorskip("pandas")

# every built-in but ``optimizer``, which needs a recorded optimizer state (its round trip: tests/test_optimizer_metric.py)
BUILTIN = [name for name, src in available_metrics().items() if src.startswith("trajectory.") and name != "optimizer"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frame")
    model = make_mlp()
    with Recorder(tmp / "run.h5", model) as rec:
        sgd_run(rec, model, steps=4)
    out = tmp / "run.results.h5"
    analyze(tmp / "run.h5", out, metrics=BUILTIN, model=make_mlp(), data=TensorDataset(*toy_data()), eval="subset:64",
            spans="1,2", options={"k": 2, "iters": 20, "esd_iters": 6, "esd_probes": 2, "esd_grid": 11, "probes": 6,
                                  "noise_draws": 2, "ascent_steps": 2})
    return out


def test_every_builtin_metric_round_trips(results):
    assert {"interpolation", "floor", "geometry", "barriers", "hessian_top", "hessian_esd"} <= set(BUILTIN)
    res = trajectory.Results(results)
    with ResultsFile(results) as f:
        for metric in BUILTIN:
            (table,) = f.by_metric(metric)
            arrays = [c for c in table.columns if table.columns[c][0]]
            groups = {}
            for c in arrays:
                groups.setdefault(int(np.prod(table.columns[c][0])), c)
            for pick in list(groups.values()) or [None]:
                df = res.to_pandas(metric, arrays=pick)
                assert df.attrs["config"] == table.config and df.attrs["config_hash"] == table.hash
                keys = list(table.keys)
                shown = [c for c in table.columns if c in df.columns]
                if pick is not None:
                    same = [c for c in arrays if int(np.prod(table.columns[c][0])) == int(np.prod(table.columns[pick][0]))]
                    assert set(same) <= set(shown) and not (set(arrays) - set(same)) & set(shown)
                else:
                    assert set(shown) == set(table.columns)
                for key, row in table.rows.items():
                    sel = df
                    for k, v in zip(keys, key):
                        sel = sel[sel[k] == v]
                    assert len(sel) == (int(np.prod(table.columns[pick][0])) if pick else 1)
                    meta = table.meta[key]
                    assert (sel["step_a"] == meta[0]).all() and (sel["step_b"] == meta[1]).all()
                    for c in shown:
                        want = np.asarray(row[c])
                        got = sel[c].to_numpy()
                        if want.ndim:
                            np.testing.assert_array_equal(got.reshape(want.shape), want.astype(got.dtype))
                        else:
                            np.testing.assert_array_equal(got, np.full(len(sel), want, dtype=got.dtype))


def test_named_axes(results):
    res = trajectory.Results(results)
    df = res.to_pandas("interpolation")
    alphas = df.attrs["config"]["options"]["alphas"]
    assert len(df) == 4 * len(alphas) and df["alpha"].tolist() == alphas * 4
    assert df.groupby("pair")["loss"].count().tolist() == [len(alphas)] * 4
    top = res.to_pandas("hessian_top")
    assert top["k"].tolist() == [1, 2] * 4
    esd = res.to_pandas("hessian_esd")
    first = esd[esd["pair"] == 0]
    assert first["x"].iloc[0] == pytest.approx(first["grid_lo"].iloc[0]) and first["x"].iloc[-1] == pytest.approx(first["grid_hi"].iloc[0])
    bar = res.to_pandas("barriers")
    assert sorted(set(bar["span"])) == [1, 2] and bar["point"].min() == 0.0 and bar["point"].max() == 1.0
    assert "archive" in df.attrs and df.attrs["metric"] == "interpolation"


def test_missing_metric_and_column_are_one_line(results):
    res = trajectory.Results(results)
    for call in (lambda: res.to_pandas("nope"), lambda: res.to_pandas("interpolation", arrays="nope"),
                 lambda: res.to_pandas("interpolation", config="zz")):
        with pytest.raises(SgdwalkError) as err:
            call()
        assert "\n" not in str(err.value)
