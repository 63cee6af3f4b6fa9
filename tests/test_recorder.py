"""Recorder behaviour: schedules, index capture, attach form, safety rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from conftest import make_mlp, sgd_run
from trajectory import (
    ArchiveExistsError,
    Every,
    Pairs,
    Recorder,
    RecorderError,
    RecordingBatchSampler,
    Steps,
    Trajectory,
    Windows,
    parse_schedule,
    record_indices,
)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (Every(), list(range(31))),
        (Every(7), [0, 7, 14, 21, 28]),
        (Steps([0, 3, 29, 30]), [0, 3, 29, 30]),
        (Pairs([4, 20]), [4, 5, 20, 21]),
        (Pairs(period=10), [0, 1, 10, 11, 20, 21, 30]),
        (Pairs(period=10, offset=3), [3, 4, 13, 14, 23, 24]),
        (Windows([(0, 5, 1), (5, None, 10)]), [0, 1, 2, 3, 4, 5, 15, 25]),
        (Every(10) | Pairs([16]), [0, 10, 16, 17, 20, 30]),
        ("window:0-3:1,3-:9", [0, 1, 2, 3, 12, 21, 30]),
        ("pairs-every:12@2", [2, 3, 14, 15, 26, 27]),
    ],
)
def test_each_schedule_records_exactly_the_promised_steps(tmp_path, schedule, expected):
    path = tmp_path / "s.h5"
    model = make_mlp()
    with Recorder(path, model, schedule=schedule) as rec:
        sgd_run(rec, model, 30)
    sched = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    assert sched.steps_until(30) == expected
    with Trajectory(path) as traj:
        assert list(traj.steps) == expected
        # indices are stored for every update that leaves a recorded state
        for i, s in enumerate(traj.steps):
            assert len(traj.batch_indices(i)) == (16 if s < 30 else 0)


def test_sparse_pairs_are_single_consecutive_steps(tmp_path):
    path = tmp_path / "p.h5"
    model = make_mlp()
    with Recorder(path, model, schedule=Pairs(period=8)) as rec:
        sgd_run(rec, model, 40)
    with Trajectory(path) as traj:
        single = list(traj.pairs(single_steps=True))
        assert [p.step_a for p in single] == [0, 8, 16, 24, 32, 40][: len(single)]
        assert all(p.span == 1 and len(p.batch_indices) == 16 for p in single)
        assert len(list(traj.pairs())) == len(traj) - 1


def test_parse_schedule_rejects_nonsense():
    with pytest.raises(ValueError, match="bad schedule"):
        parse_schedule("sometimes")
    with pytest.raises(ValueError, match="bad schedule"):
        parse_schedule("every:x")


class _IndexDataset(Dataset):
    """x carries its own index, so a test can see which samples a batch really held."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.tensor([float(i)] * 8), i % 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sampler_wrapper_captures_the_batches_the_loop_consumed(tmp_path, num_workers):
    ds = _IndexDataset()
    tracker = RecordingBatchSampler.from_sampler(RandomSampler(ds, generator=torch.Generator().manual_seed(0)), 7)
    loader = DataLoader(ds, batch_sampler=tracker, num_workers=num_workers)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    with Recorder(tmp_path / "w.h5", model, optimizer=opt, indices=tracker) as rec:
        for epoch in range(2):
            for k, (x, y) in enumerate(loader):
                seen.append(x[:, 0].long().numpy())
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.record(loss=loss)
                if epoch == 0 and k == 5:
                    break  # leaves prefetched batches behind: the next epoch must not see them
    with Trajectory(tmp_path / "w.h5") as traj:
        assert len(traj) == len(seen) + 1
        for i, batch in enumerate(seen):
            assert np.array_equal(traj.batch_indices(i), batch)


def test_record_indices_rebuilds_a_loader(tmp_path):
    ds = _IndexDataset()
    loader, tracker = record_indices(DataLoader(ds, batch_size=10, shuffle=True))
    x, _ = next(iter(loader))
    assert np.array_equal(tracker.pop(), x[:, 0].long().numpy())


def test_attach_records_from_the_optimizer_hook(tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "a.h5", model, schedule=Every(2)).attach(opt)
    x = torch.randn(16, 8)
    y = torch.randint(0, 3, (16,))
    for s in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        rec.stage(batch_indices=list(range(s, s + 4)), loss=loss)
        opt.step()
    rec.close()
    with Trajectory(tmp_path / "a.h5") as traj:
        assert list(traj.steps) == [0, 2, 4, 6, 8]
        assert list(traj.batch_indices(1)) == [2, 3, 4, 5]
        assert traj.attrs["optimizer"]["class"].endswith("SGD")
        assert set(traj.scalar_names) == {"loss", "lr"}
        assert torch.equal(traj.params(4), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_exception_inside_with_block_leaves_a_valid_archive(archive_path):
    model = make_mlp()
    with pytest.raises(ZeroDivisionError):
        with Recorder(archive_path, model) as rec:
            sgd_run(rec, model, 11)
            1 / 0
    with Trajectory(archive_path) as traj:
        assert len(traj) == 12 and traj.closed_cleanly


def test_existing_path_is_refused_unless_asked(archive_path):
    model = make_mlp()
    with Recorder(archive_path, model) as rec:
        sgd_run(rec, model, 3)
    with pytest.raises(ArchiveExistsError, match="already exists") as err:
        Recorder(archive_path, model)
    assert "\n" not in str(err.value)
    with Trajectory(archive_path) as traj:  # the refusal did not touch the file
        assert len(traj) == 4
    with Recorder(archive_path, model, mode="w") as rec:
        sgd_run(rec, model, 1)
    with Trajectory(archive_path) as traj:
        assert len(traj) == 2


def test_changing_the_parameter_set_mid_run_is_an_error(archive_path):
    model = make_mlp()
    rec = Recorder(archive_path, model)
    sgd_run(rec, model, 2)
    model[2] = torch.nn.Linear(16, 5)  # a different head: the archive's layout no longer fits
    with pytest.raises(RecorderError, match="parameters changed") as err:
        rec.record()
    assert "\n" not in str(err.value)
    rec.close()
    with Trajectory(archive_path) as traj:
        assert len(traj) == 3


def test_replacing_a_tensor_with_the_same_shape_is_fine(archive_path):
    model = make_mlp()
    with Recorder(archive_path, model) as rec:
        model[0].weight = torch.nn.Parameter(torch.zeros(16, 8))
        rec.record()
    with Trajectory(archive_path) as traj:
        assert torch.equal(traj.state_dict(1)["0.weight"], torch.zeros(16, 8))


def test_nan_parameters_are_recorded_as_they_are_and_flagged(archive_path):
    model = make_mlp()
    with Recorder(archive_path, model) as rec:
        rec.record()
        with torch.no_grad():
            model[0].weight[0, :3] = float("nan")
            model[0].bias[1] = float("inf")
        rec.record()
    with Trajectory(archive_path) as traj:
        assert list(traj.nonfinite) == [0, 0, 4]
        w = traj.state_dict(2)["0.weight"]
        assert torch.isnan(w[0, :3]).all() and torch.isinf(traj.state_dict(2)["0.bias"][1])


def test_a_failing_writer_surfaces_in_the_training_loop(archive_path):
    model = make_mlp()
    rec = Recorder(archive_path, model)
    rec.record(**{"x" * 100: 1.0})  # too long a scalar name: the writer thread fails on it
    with pytest.raises(RecorderError, match="failed"):
        for _ in range(50):
            rec.record()
            rec.flush()
    with pytest.raises(RecorderError):
        rec.close()
    with Trajectory(archive_path) as traj:  # what was flushed before the failure is still readable
        assert len(traj) >= 1 and not traj.closed_cleanly
