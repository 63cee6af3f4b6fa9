"""DistributedRecorder: two gloo processes on CPU record one archive; the global batch replays the update."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from conftest import make_mlp, toy_data
from trajectory import ArchiveExistsError, Every, RecorderError, Steps, Trajectory, record_indices
from trajectory.integrations import DistributedRecorder, make_recorder, unwrap_model

WORLD = 2
LR = 0.1
PER_RANK = 8


class _Indexed(Dataset):
    """toy_data with each sample's index as a third field, so a rank can log what it consumed."""

    def __init__(self):
        self.x, self.y = toy_data(n=64)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _save(obj, out: str, name: str) -> None:
    with open(os.path.join(out, name + ".pkl"), "wb") as f:
        pickle.dump(obj, f)


def _load(out: str, name: str):
    with open(os.path.join(out, name + ".pkl"), "rb") as f:
        return pickle.load(f)


def _replay_run(rank: int, out: str) -> None:
    """DDP over a DistributedSampler, indices from a RecordingBatchSampler; rank 1 must not touch HDF5."""
    if rank != 0:
        import h5py

        def _refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} opened an HDF5 file")

        h5py.File = _refuse
    ds = _Indexed()
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=3, drop_last=True)
    loader, tracker = record_indices(DataLoader(ds, batch_size=PER_RANK, sampler=sampler))
    ddp = torch.nn.parallel.DistributedDataParallel(make_mlp(seed=rank))  # DDP broadcasts rank 0's weights
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    seen, losses = [], []
    with DistributedRecorder(os.path.join(out, "replay.h5"), ddp, optimizer=opt, indices=tracker) as rec:
        assert rec.is_writer == (rank == 0)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for x, y, i in loader:
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                assert rec.record(loss=loss)
                seen.append(i.numpy())
                losses.append(loss.item())
        assert rec.n_recorded == len(seen) + 1 and rec.step == len(seen)
    _save({"seen": seen, "losses": losses}, out, f"replay_rank{rank}")


def _attach_run(rank: int, out: str) -> None:
    """attach() + stage(), unequal per-rank batch sizes, a sparse schedule and averaged scalars."""
    x, y = toy_data(n=64)
    ddp = torch.nn.parallel.DistributedDataParallel(make_mlp(seed=0))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    rec = DistributedRecorder(os.path.join(out, "attach.h5"), ddp, schedule=Every(2) | Steps([1]), scalars="mean").attach(opt)
    g = torch.Generator().manual_seed(10 + rank)
    batches = []
    for _ in range(6):
        idx = torch.randperm(64, generator=g)[: 3 + 2 * rank]  # rank 0 takes 3 samples, rank 1 takes 5
        loss = torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        rec.stage(batch_indices=idx, loss=float(rank + 1))
        opt.step()
        batches.append(idx.numpy())
    assert rec.step == 6 and rec.n_recorded == 5
    rec.close()
    _save({"batches": batches}, out, f"attach_rank{rank}")
    dist.barrier()
    # a second archive at the same path: rank 0's refusal must reach every rank instead of hanging
    with pytest.raises(ArchiveExistsError if rank == 0 else RecorderError):
        DistributedRecorder(os.path.join(out, "attach.h5"), ddp)


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _replay_run(rank, out)
        dist.barrier()
        _attach_run(rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    # a fresh server process imports torch (and DDP's torch._dynamo) once and forks both ranks from
    # it: as clean as "spawn", without each rank importing everything again on a 2-core machine
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", "h5py", "trajectory"])
    mp.start_processes(_worker, args=(out,), nprocs=WORLD, join=True, start_method="forkserver")
    return out


def _flat_grad_step(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    return torch.cat([(p - LR * p.grad).detach().reshape(-1) for p in model.parameters()])


def test_archive_holds_the_global_batch_in_rank_order(ddp_runs):
    ranks = [_load(ddp_runs, f"replay_rank{r}") for r in range(WORLD)]
    n = len(ranks[0]["seen"])
    assert n == 8  # 64 samples / (2 ranks x 8) x 2 epochs
    with Trajectory(os.path.join(ddp_runs, "replay.h5")) as traj:
        assert list(traj.steps) == list(range(n + 1))
        for t in range(n):
            expected = np.concatenate([ranks[r]["seen"][t] for r in range(WORLD)])
            assert np.array_equal(traj.batch_indices(t), expected)
            assert len(set(expected.tolist())) == WORLD * PER_RANK  # DistributedSampler: disjoint shards
        # scalars are rank 0's by default; lr comes from the optimizer
        assert np.allclose(traj.scalars["loss"][:n], ranks[0]["losses"])
        assert np.allclose(traj.scalars["lr"][:n], LR)
        assert traj.attrs["metadata"]["distributed"]["world_size"] == WORLD


def test_state_dict_names_are_the_plain_models(ddp_runs):
    with Trajectory(os.path.join(ddp_runs, "replay.h5")) as traj:
        plain = make_mlp()
        traj.check_model(plain)
        assert [e.name for e in traj.layout.entries] == list(plain.state_dict())
        traj.load_into(plain, 0)
        # DDP broadcast rank 0's initial weights: record 0 is make_mlp(seed=0)
        assert torch.equal(traj.params(0), torch.cat([p.detach().reshape(-1) for p in make_mlp(seed=0).parameters()]))


def test_one_process_replays_each_ddp_step_from_the_global_batch(ddp_runs):
    x, y = _Indexed().x, _Indexed().y
    model = make_mlp()
    with Trajectory(os.path.join(ddp_runs, "replay.h5")) as traj:
        for t in range(len(traj) - 1):
            traj.load_into(model, t)
            idx = torch.from_numpy(traj.batch_indices(t))
            predicted = _flat_grad_step(model, x[idx], y[idx])  # mean loss over the global batch
            torch.testing.assert_close(predicted, traj.params(t + 1), rtol=1e-5, atol=1e-6)


def test_attach_with_unequal_batches_and_mean_scalars(ddp_runs):
    ranks = [_load(ddp_runs, f"attach_rank{r}") for r in range(WORLD)]
    with Trajectory(os.path.join(ddp_runs, "attach.h5")) as traj:
        assert list(traj.steps) == [0, 1, 2, 4, 6]
        assert traj.attrs["optimizer"]["class"].endswith("SGD")
        for i, s in enumerate(traj.steps[:-1]):
            expected = np.concatenate([ranks[r]["batches"][s] for r in range(WORLD)])
            assert np.array_equal(traj.batch_indices(i), expected)
        assert list(traj.batch_steps) == [0, 1, 2, 4]  # only updates leaving a recorded state
        steps, loss = traj.scalar_history("loss")
        assert list(steps) == list(range(6)) and np.allclose(loss, 1.5)  # mean of 1.0 and 2.0
        steps, sizes = traj.scalar_history("batch_size/rank1")
        assert list(steps) == [0, 1, 2, 4] and np.all(sizes == 5)
        # DDP averaged the two ranks' mean gradients: the replay weighs each rank's mean equally
        x, y = toy_data(n=64)
        model = make_mlp()
        traj.load_into(model, 0)
        losses = []
        for part in np.split(traj.batch_indices(0), [3]):
            idx = torch.from_numpy(part)
            losses.append(torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))
        model.zero_grad()
        (sum(losses) / WORLD).backward()
        one_step = torch.cat([(p - LR * p.grad).detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(one_step, traj.params(1), rtol=1e-5, atol=1e-6)


def test_without_a_process_group_it_is_a_plain_recorder(tmp_path):
    assert not dist.is_initialized()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = toy_data()
    with DistributedRecorder(tmp_path / "single.h5", model, optimizer=opt) as rec:
        assert rec.is_writer and rec.world_size == 1
        for s in range(3):
            loss = torch.nn.functional.cross_entropy(model(x[s : s + 4]), y[s : s + 4])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(batch_indices=range(s, s + 4), loss=loss)
    with Trajectory(tmp_path / "single.h5") as traj:
        assert len(traj) == 4 and list(traj.batch_indices(2)) == [2, 3, 4, 5]
    assert type(make_recorder(tmp_path / "m.h5", model, scalars="mean")).__name__ == "Recorder"


def test_unwrap_model_strips_wrappers():
    model = make_mlp()
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model
    with pytest.raises(ValueError, match="scalars"):
        DistributedRecorder("unused.h5", model, scalars="sum")


def test_importing_trajectory_imports_no_trainer_package():
    code = (
        "import sys, trajectory, trajectory.integrations, trajectory.integrations.ddp\n"
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
