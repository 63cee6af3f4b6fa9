"""Archives that mix dense windows with sparse records (the paper's protocol): pairs that span several optimizer
steps are chords, not SGD updates. They are never evaluated on the minibatch of their first update, ``--steps
updates`` selects the single updates, a mixed selection warns, and cos_prev never compares an update with a chord."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from trajectory import Trajectory
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.options import parse_steps, select_pairs


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from trajectory.training import train

    out = tmp_path_factory.mktemp("sparse") / "mixed.h5"
    train("mlp", "mnist1d", model_kwargs={"hidden": [16]}, data_kwargs={"num_samples": 600}, lr=0.2, batch_size=32,
          steps=24, seed=3, schedule="window:0-7:1+every:8", out=out, progress=False)
    with Trajectory(out) as t:
        assert t.steps.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 16, 24]
    return str(out)


def _rows(path, metric):
    t = ResultsFile(path, "r").by_metric(metric)[0]
    return t.arrays()


def test_steps_updates_selects_single_updates_only():
    steps = np.array([0, 1, 2, 3, 4, 5, 6, 8, 16, 24])
    assert select_pairs(steps, parse_steps("updates")) == [0, 1, 2, 3, 4, 5]
    assert select_pairs(steps, parse_steps("3:100,updates")) == [3, 4, 5]
    assert select_pairs(steps, parse_steps("3:100")) == [3, 4, 5, 6, 7, 8]


def test_minibatch_rows_of_multi_step_pairs_are_nan_not_their_first_updates(mixed, tmp_path):
    out = tmp_path / "mb.h5"
    with pytest.warns(UserWarning, match="3 of the 9 selected pairs span more than one optimizer step"):
        analyze(mixed, out, eval="minibatch", metrics=["floor"], alphas="0:1:5")
    rows = _rows(out, "floor")
    assert rows["pair"].tolist() == list(range(9))
    assert np.isfinite(rows["floor_loss"][:6]).all()
    assert np.isnan(rows["floor_loss"][6:]).all()  # (6,8), (8,16), (16,24): no minibatch of their own
    # an independent reference for a single update: the loss of record 2 on the recorded minibatch of step 2
    with Trajectory(mixed) as t:
        model = t.build_model()
        t.load_into(model, 2)
        x, y = t.build_dataset(split="train").tensors
        idx = torch.as_tensor(t.batch_indices(2))
        model.train()
        with torch.no_grad():
            ref = float(torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
    assert rows["loss_a"][2] == pytest.approx(ref, rel=1e-5)


def test_updates_selection_does_not_warn_and_cos_prev_never_mixes_spans(mixed, tmp_path):
    out = tmp_path / "u.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = analyze(mixed, out, steps="updates", metrics=["geometry"])
    assert rep.computed == {"geometry": 6}
    out2 = tmp_path / "all.h5"
    with pytest.warns(UserWarning, match="span more than one"):
        analyze(mixed, out2, metrics=["geometry"])
    cos = _rows(out2, "geometry")["cos_prev"]
    assert np.isnan(cos[0])  # first record
    assert np.isfinite(cos[1:6]).all()  # single updates after single updates
    assert np.isnan(cos[6]) and np.isnan(cos[7])  # (6,8) after (5,6); (8,16) after (6,8): spans differ
    with Trajectory(mixed) as t:  # (16,24) after (8,16): equal spans, an ordinary cosine of consecutive chords
        p8, p16, p24 = (t.params(i).double() for i in (7, 8, 9))
    a, b = p24 - p16, p16 - p8
    assert cos[8] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)
