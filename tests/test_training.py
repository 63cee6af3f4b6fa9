"""The built-in trainer (trajectory.training.train): what it records, and that every update replays exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trajectory import Trajectory
from trajectory.archive.info import archive_info
from trajectory.errors import ArchiveExistsError, DataNotFoundError, SgdwalkError
from trajectory.specs import Spec
from trajectory.training import StepBatches, TrainingInterrupted, parse_lr_drops, train

# A small MNIST-1D (generated in well under a second, cached per process) keeps every run fast.
DATA_KW = {"num_samples": 1000}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and most predictably on a busy 2-core machine) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train(tmp_path, name="run.h5", **kw):
    args = dict(data_kwargs=DATA_KW, steps=12, batch_size=32, progress=False, device="cpu", out=tmp_path / name)
    args.update(kw)
    return train(**args)


def test_train_records_every_step_with_batches_scalars_and_specs(tmp_path):
    summary = _train(tmp_path, model="mlp", model_kwargs={"hidden": [16]}, seed=3)
    assert summary["final_step"] == 12 and summary["steps_run"] == 12
    assert summary["records"] == 13 and summary["recorded"] == 13
    assert summary["interrupted"] is False and summary["first_nonfinite_step"] is None
    with Trajectory(tmp_path / "run.h5") as traj:
        assert traj.steps.tolist() == list(range(13))
        assert traj.closed_cleanly
        for i in range(12):
            idx = traj.batch_indices(i)
            assert len(idx) == 32 and len(set(idx.tolist())) == 32
            assert idx.min() >= 0 and idx.max() < 800  # the training split of 1000 samples
        assert len(traj.batch_indices(12)) == 0  # no update left the final state
        assert set(traj.scalar_names) == {"loss", "accuracy", "lr"}
        steps, loss = traj.scalar_history("loss")
        assert steps.tolist() == list(range(12)) and np.isfinite(loss).all()
        _, acc = traj.scalar_history("accuracy")
        assert ((acc >= 0) & (acc <= 1)).all()
        # the recorded spec is the exact model, with the sizes taken from the data
        assert traj.model_spec == Spec("trajectory.zoo.models:mlp", {"hidden": [16], "in_features": 40, "num_classes": 10})
        assert traj.data_spec == Spec("trajectory.zoo.data:mnist1d", DATA_KW)
        attrs = traj.attrs
        assert attrs["seed"] == 3
        assert attrs["metadata"]["batch_size"] == 32 and attrs["metadata"]["lr"] == 0.1
        assert attrs["optimizer"]["class"] == "torch.optim.sgd.SGD"
        # the initial state is the one torch.manual_seed(seed) + the spec builds in another process
        torch.manual_seed(3)
        fresh = traj.build_model()
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, traj.state_dict(0)[name])


def _replay_one(model, opt_lr, x, y, weight_decay):
    opt = torch.optim.SGD(model.parameters(), lr=opt_lr, momentum=0.0, weight_decay=weight_decay)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("model, weight_decay", [("mlp", 0.0), ("mlp_bn", 1e-3)])
def test_replay_every_recorded_update_bit_exactly(tmp_path, model, weight_decay):
    """Rebuild record t, run one SGD step on its recorded minibatch with its lr: that is record t+1, bit for bit."""
    _train(tmp_path, model=model, model_kwargs={"hidden": [24, 24]}, steps=8, lr=0.2, weight_decay=weight_decay)
    with Trajectory(tmp_path / "run.h5") as traj:
        net = traj.build_model()
        net.train()
        data = traj.build_dataset("train")
        lrs = traj.scalars["lr"]
        losses = traj.scalars["loss"]
        has_buffers = traj.n_buffers > 0
        assert has_buffers == (model == "mlp_bn")
        for t in range(len(traj) - 1):
            traj.load_into(net, t)
            idx = traj.batch_indices(t)
            x = torch.stack([data[int(i)][0] for i in idx])
            y = torch.as_tensor([int(data[int(i)][1]) for i in idx])
            loss = _replay_one(net, float(lrs[t]), x, y, weight_decay)
            assert loss == pytest.approx(losses[t], rel=1e-6)
            expected = traj.state_dict(t + 1)
            for name, value in net.state_dict().items():
                assert torch.equal(value, expected[name]), f"step {t}->{t + 1}: {name} differs"

        # the check has teeth: the next step's minibatch does not reproduce the update
        traj.load_into(net, 0)
        idx = traj.batch_indices(1)
        x, y = data.tensors[0][idx], data.tensors[1][idx]
        _replay_one(net, float(lrs[0]), x, y, weight_decay)
        assert not torch.equal(net.state_dict()[traj.layout.names("params")[0]], traj.state_dict(1)[traj.layout.names("params")[0]])


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    _train(tmp_path, "a.h5", model_kwargs={"hidden": [8]}, steps=5, seed=1)
    _train(tmp_path, "b.h5", model_kwargs={"hidden": [8]}, steps=5, seed=1)
    _train(tmp_path, "c.h5", model_kwargs={"hidden": [8]}, steps=5, seed=2)
    with Trajectory(tmp_path / "a.h5") as a, Trajectory(tmp_path / "b.h5") as b, Trajectory(tmp_path / "c.h5") as c:
        assert torch.equal(a.params_block(0, 6), b.params_block(0, 6))
        assert np.array_equal(a.batch_indices(3), b.batch_indices(3))
        assert not torch.equal(a.params(0), c.params(0))
        assert not np.array_equal(a.batch_indices(0), c.batch_indices(0))


def test_append_resumes_the_same_run_exactly(tmp_path):
    kw = dict(model_kwargs={"hidden": [8]}, seed=4, batch_size=100)  # 8 batches per epoch: resuming crosses an epoch
    _train(tmp_path, "full.h5", steps=14, **kw)
    _train(tmp_path, "split.h5", steps=6, **kw)
    summary = _train(tmp_path, "split.h5", steps=14, mode="a", **kw)
    assert summary["start_step"] == 6 and summary["final_step"] == 14 and summary["records"] == 15
    with Trajectory(tmp_path / "full.h5") as full, Trajectory(tmp_path / "split.h5") as split:
        assert split.steps.tolist() == full.steps.tolist()
        assert torch.equal(split.params_block(0, 15), full.params_block(0, 15))
        for i in range(14):
            assert np.array_equal(split.batch_indices(i), full.batch_indices(i))
    with pytest.raises(ValueError, match="already reaches step 14"):
        _train(tmp_path, "split.h5", steps=14, mode="a", **kw)
    with pytest.raises(SgdwalkError, match="model spec"):
        _train(tmp_path, "split.h5", steps=20, mode="a", model_kwargs={"hidden": [9]}, seed=4, batch_size=100)
    with pytest.raises(SgdwalkError, match="seed 4"):
        _train(tmp_path, "split.h5", steps=20, mode="a", model_kwargs={"hidden": [8]}, seed=5, batch_size=100)
    with pytest.raises(SgdwalkError, match="batch size 100"):
        _train(tmp_path, "split.h5", steps=20, mode="a", model_kwargs={"hidden": [8]}, seed=4, batch_size=50)
    with Trajectory(tmp_path / "split.h5") as split:
        assert len(split) == 15  # refused appends leave the archive as it was


def test_existing_out_is_refused_unless_overwrite(tmp_path):
    _train(tmp_path, steps=2, model_kwargs={"hidden": [4]})
    with pytest.raises(ArchiveExistsError, match="already exists"):
        _train(tmp_path, steps=2, model_kwargs={"hidden": [4]})
    assert _train(tmp_path, steps=3, model_kwargs={"hidden": [4]}, mode="w")["records"] == 4


def test_keyboard_interrupt_leaves_a_closed_readable_archive(tmp_path):
    def stop_at_5(state):
        if state["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path, model_kwargs={"hidden": [8]}, steps=50, callback=stop_at_5)
    summary = info.value.summary
    assert isinstance(info.value, KeyboardInterrupt)
    assert summary["interrupted"] and summary["final_step"] == 5 and summary["records"] == 6
    with Trajectory(tmp_path / "run.h5") as traj:
        assert traj.closed_cleanly
        assert traj.steps.tolist() == [0, 1, 2, 3, 4, 5]
        assert len(traj.batch_indices(4)) == 32
        traj.params(5)


def test_callback_returning_true_stops_early(tmp_path):
    summary = _train(tmp_path, model_kwargs={"hidden": [8]}, steps=50, callback=lambda s: s["step"] >= 3)
    assert summary["stopped_early"] and summary["final_step"] == 3 and summary["records"] == 4


def test_lr_drop_is_applied_and_recorded(tmp_path):
    assert parse_lr_drops("4:0.5,2:0.1") == [(2, 0.1), (4, 0.5)]
    assert parse_lr_drops({3: 0.5}) == [(3, 0.5)]
    with pytest.raises(ValueError, match="STEP:FACTOR"):
        parse_lr_drops("oops")
    _train(tmp_path, model_kwargs={"hidden": [8]}, steps=6, lr=0.4, lr_drop=["2:0.5", "4:0.5"])
    with Trajectory(tmp_path / "run.h5") as traj:
        _, lrs = traj.scalar_history("lr")
        assert lrs.tolist() == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1, 0.1])


def test_nan_run_is_reported(tmp_path):
    summary = _train(tmp_path, model_kwargs={"hidden": [8]}, steps=6, lr=1e30)
    assert summary["first_nonfinite_step"] is not None
    info = archive_info(tmp_path / "run.h5")
    assert info["nonfinite"]["records"] >= 1
    assert info["nonfinite"]["first_step"] >= 1  # the initial state is finite


def test_cifar10_standin_directory(tmp_path, monkeypatch):
    from trajectory.zoo.data import write_cifar10_standin

    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    write_cifar10_standin(tmp_path / "data", n_train=40, n_test=10)
    summary = train("cnn", "cifar10", model_kwargs={"width": 4}, data_dir=tmp_path / "data", steps=3, batch_size=8,
                    augment=True, progress=False, device="cpu", out=tmp_path / "c.h5")
    assert summary["records"] == 4
    with Trajectory(tmp_path / "c.h5") as traj:
        spec = traj.model_spec
        assert spec.kwargs["in_channels"] == 3 and spec.kwargs["input_dim"] == 2 and spec.kwargs["num_classes"] == 10
        assert traj.data_spec.kwargs["root"] == str((tmp_path / "data").resolve())
        assert traj.attrs["metadata"]["augment"] is True
        assert traj.batch_indices(2).max() < 40


def test_cifar10_without_data_dir_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as info:
        train("cnn", "cifar10", steps=1, progress=False, out=tmp_path / "c.h5")
    assert "--data-dir" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        train("cnn", "cifar10", steps=1, progress=False, data_dir=tmp_path / "nowhere", out=tmp_path / "c.h5")
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found"):
        train("cnn", "cifar10", steps=1, progress=False, data_dir=tmp_path, out=tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0}, "lr must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"steps": 0}, "steps must be"),
        ({"momentum": -1}, "momentum must be"),
        ({"batch_size": 5000}, "larger than the training set"),
        ({"schedule": "nope"}, "bad schedule"),
        ({"codec": "nope"}, "unknown codec"),
        ({"data_dir": "."}, "takes no 'root' argument"),
        ({"device": "cuda:99" if torch.cuda.is_available() else "cuda"}, "CUDA"),
        ({"model": "nosuchnet"}, "unknown model"),
    ],
)
def test_bad_arguments_raise_one_line_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _train(tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run.h5").exists()


def test_step_batches_is_a_resumable_epoch_stream():
    whole = list(StepBatches(10, 3, seed=0, start=0, stop=7))
    assert len(whole) == 7 and all(len(b) == 3 for b in whole)
    for epoch in (whole[0:3], whole[3:6]):  # 3 batches per epoch (drop_last), no repeats inside an epoch
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9
    assert list(StepBatches(10, 3, seed=0, start=4, stop=7)) == whole[4:]
    assert list(StepBatches(10, 3, seed=1, start=0, stop=7)) != whole


def test_dataloader_workers_give_the_same_run(tmp_path):
    """Batch indices come from the main process even with workers, so the run and its record are identical."""
    _train(tmp_path, "w0.h5", model_kwargs={"hidden": [8]}, steps=10)
    _train(tmp_path, "w2.h5", model_kwargs={"hidden": [8]}, steps=10, num_workers=2)
    with Trajectory(tmp_path / "w0.h5") as a, Trajectory(tmp_path / "w2.h5") as b:
        assert torch.equal(a.params_block(0, 11), b.params_block(0, 11))
        for i in range(10):
            assert np.array_equal(a.batch_indices(i), b.batch_indices(i))
