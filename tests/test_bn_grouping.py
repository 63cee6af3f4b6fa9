"""BatchNorm made explicit (issue 13 items 2-3): true batches of a seeded permutation, --bn-batch/--bn-batches on
the CLI, data order irrelevant beyond sampling error, and --noise resample against the default common random numbers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from test_analysis_support import data_spec, record_mlp
from trajectory import Trajectory
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.bn_groups import bn_grouping
from trajectory.analysis.data import subset_indices
from trajectory.analysis.evaluator import Evaluator


@pytest.fixture(scope="module")
def bn_archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("bng") / "bn.h5", steps=3, lr=0.3, seed=2, batchnorm=True)


def _subset(n):
    x, y = data_spec().build(split="train").tensors
    idx = torch.as_tensor(subset_indices(len(x), n, 0))
    return x[idx], y[idx]


def test_grouping_is_true_batches_of_a_seeded_permutation_remainder_dropped():
    order, sizes = bn_grouping(26, 8, seed=5)
    assert sizes == [8, 8, 8] and len(order) == 24  # 2 samples dropped
    full = torch.randperm(26, generator=torch.Generator().manual_seed(5))
    assert order.tolist() == full[:24].tolist()  # the dropped ones are the permutation's last: a random choice
    assert bn_grouping(26, 8, seed=5)[0].tolist() == order.tolist()  # same seed, same groups
    assert bn_grouping(26, 8, seed=6)[0].tolist() != order.tolist()
    o, s = bn_grouping(5, 8, seed=0)
    assert s == [5] and sorted(o.tolist()) == list(range(5))  # fewer samples than a batch: one group of all
    assert bn_grouping(200, 100, seed=0)[1] == [100, 100]


def _naive(model, sa, sb, alphas, x, y, bn_batch, seed):
    """Float64 loop over the same seeded groups: one train-mode forward per group of bn_batch samples."""
    m = model.double()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out = []
    for a in alphas:
        m.load_state_dict({k: (sa[k].double() + a * (sb[k].double() - sa[k].double())) if sa[k].is_floating_point() else sa[k]
                           for k in sa})
        m.eval()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for j in range(len(x) // bn_batch):
                idx = perm[j * bn_batch : (j + 1) * bn_batch]
                tot += float(F.cross_entropy(m(x[idx].double()), y[idx], reduction="sum"))
                cnt += len(idx)
        out.append(tot / cnt)
    return np.array(out)


def test_cli_bn_batch_100_matches_a_naive_loop_over_the_same_seeded_groups(bn_archive, tmp_path):
    from cli.main import main

    out = tmp_path / "r.h5"
    r = CliRunner().invoke(main, ["analyze", bn_archive, "-o", str(out), "-m", "interpolation", "--eval", "subset:250",
                                  "--bn-batch", "100", "--dtype", "float64", "--alphas", "0,0.5,1", "-q"])
    assert r.exit_code == 0, r.output
    assert "bn_batch=100" in r.output  # shown in the summary
    t = ResultsFile(out, "r").by_metric("interpolation")[0]
    assert t.config["shared"]["bn_batch"] == 100 and "noise" not in t.config["shared"]
    x, y = _subset(250)  # 2 groups of 100, 50 samples dropped
    traj = Trajectory(bn_archive)
    model = traj.build_model()
    for (i,), row in t.rows.items():
        ref = _naive(model, traj.state_dict(i), traj.state_dict(i + 1), [0.0, 0.5, 1.0], x, y, 100, seed=2)
        np.testing.assert_allclose(row["loss"], ref, rtol=1e-12)


def test_cli_rejects_bad_bn_sizes_with_one_line(bn_archive, tmp_path):
    from cli.main import main

    for args in (["--bn-batch", "1"], ["--bn-batches", "0"]):
        r = CliRunner().invoke(main, ["analyze", bn_archive, "-o", str(tmp_path / "x.h5"), "-q", *args])
        assert r.exit_code != 0 and r.output.count("\n") == 1 and r.output.startswith("error: --bn-batch"), r.output


def test_bn_batches_is_stored_in_the_recompute_configuration(bn_archive, tmp_path):
    out = tmp_path / "r.h5"
    analyze(bn_archive, out, metrics=["interpolation"], eval="subset:64", bn="recompute", bn_batch=16, bn_batches=3,
            alphas="0,1")
    shared = ResultsFile(out, "r").by_metric("interpolation")[0].config["shared"]
    assert shared["bn_batch"] == 16 and shared["bn_batches"] == 3


@pytest.fixture(scope="module")
def trained_bn_archive(tmp_path_factory):
    """60 updates at lr 0.5 (loss 2.37 -> 1.55): the classes matter to the model, so class-pure groups would show."""
    return record_mlp(tmp_path_factory.mktemp("bngt") / "bn.h5", steps=60, lr=0.5, seed=2, batchnorm=True, every=20)


def test_class_sorted_copy_agrees_within_4_standard_errors(trained_bn_archive):
    """Grouping by stored order would put one or two classes in each BatchNorm group of a class-sorted copy (a
    different function); the seeded permutation makes the order irrelevant beyond sampling error."""
    x, y = _subset(480)  # the whole training split: 15 groups of 32
    x = x.double()
    order = torch.argsort(y, stable=True)
    xs, ys = x[order], y[order]
    traj = Trajectory(trained_bn_archive)
    model = traj.build_model()
    states = torch.stack([torch.cat([traj.params(i), traj.buffers(i)]) for i in range(len(traj))]).double()
    ev = Evaluator(model, traj.layout, dtype=torch.float64, bn="train", bn_batch=32, bn_seed=2)
    l1, _, u1 = ev.evaluate(states, x, y, units=True)
    l2, _, u2 = ev.evaluate(states, xs, ys, units=True)
    se = np.sqrt(u1.std(1, ddof=1) ** 2 / u1.shape[1] + u2.std(1, ddof=1) ** 2 / u2.shape[1])
    assert np.all(np.abs(l1 - l2) < 4 * se), (l1, l2, se)  # grouping by stored order: |diff| 0.5-1.1 nats, ~10 se


def _repeat_states(traj, k):
    s = torch.cat([traj.params(1), traj.buffers(1)]).double()
    return s.unsqueeze(0).expand(k, -1).contiguous()


def test_noise_resample_changes_values_from_point_to_point_and_crn_does_not(bn_archive, tmp_path):
    x, y = _subset(256)
    x = x.double()
    traj = Trajectory(bn_archive)
    model = traj.build_model()
    states = _repeat_states(traj, 4)  # the same point four times
    crn = Evaluator(model, traj.layout, dtype=torch.float64, bn="train", bn_batch=32, bn_seed=2)
    res = Evaluator(model, traj.layout, dtype=torch.float64, bn="train", bn_batch=32, bn_seed=2, noise="resample")
    lc, _ = crn.evaluate(states, x, y)
    lr, _ = res.evaluate(states, x, y)
    assert np.ptp(lc) == 0.0  # common random numbers: the same groups at every point
    assert len(set(lr.tolist())) == 4  # a fresh grouping at every point
    assert abs(lr.mean() - lc[0]) < 0.2  # the same quantity, noisier
    # through analyze: recorded in the configuration only when not the default
    analyze(bn_archive, tmp_path / "a.h5", metrics=["interpolation"], eval="subset:128", alphas="0,1", bn_batch=32)
    analyze(bn_archive, tmp_path / "b.h5", metrics=["interpolation"], eval="subset:128", alphas="0,1", bn_batch=32,
            noise="resample")
    ca = ResultsFile(tmp_path / "a.h5", "r").by_metric("interpolation")[0].config["shared"]
    cb = ResultsFile(tmp_path / "b.h5", "r").by_metric("interpolation")[0].config["shared"]
    assert "noise" not in ca and cb["noise"] == "resample"
    assert {k: v for k, v in cb.items() if k != "noise"} == ca
