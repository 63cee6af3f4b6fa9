"""Recorder.attach under gradient accumulation and mixed precision: one record per real optimizer step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_mlp, toy_data
from trajectory import Recorder, Trajectory

LR = 0.1



def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_accumulation_records_once_per_optimizer_step_and_replays(tmp_path):
    x, y = toy_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = Recorder(tmp_path / "acc.h5", model).attach(opt)
    g = torch.Generator().manual_seed(1)
    accumulate, micro, steps = 3, 4, 4
    windows = []
    for _ in range(steps):
        opt.zero_grad()
        parts = []
        for _ in range(accumulate):
            idx = torch.randperm(len(x), generator=g)[:micro]
            (torch.nn.functional.cross_entropy(model(x[idx]), y[idx]) / accumulate).backward()
            parts.append(idx)
        windows.append(torch.cat(parts))
        rec.stage(batch_indices=windows[-1])
        opt.step()  # the hook records here, once per optimizer step
    rec.close()
    with Trajectory(tmp_path / "acc.h5") as traj:
        assert list(traj.steps) == list(range(steps + 1))
        replay = make_mlp()
        for t in range(steps):
            assert np.array_equal(traj.batch_indices(t), windows[t].numpy())
            # equal micro-batches: the mean of the micro-batch means is the mean over the whole window
            traj.load_into(replay, t)
            idx = torch.from_numpy(traj.batch_indices(t))
            replay.zero_grad()
            torch.nn.functional.cross_entropy(replay(x[idx]), y[idx]).backward()
            predicted = torch.cat([(p - LR * p.grad).detach().reshape(-1) for p in replay.parameters()])
            torch.testing.assert_close(predicted, traj.params(t + 1), rtol=1e-5, atol=1e-6)


def test_a_step_skipped_by_the_grad_scaler_is_not_recorded(tmp_path):
    x, y = toy_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu")
    rec = Recorder(tmp_path / "amp.h5", model).attach(opt)
    states, used, scales = [_flat(model)], [], []
    for attempt in range(6):
        idx = torch.arange(attempt * 8, attempt * 8 + 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if attempt == 2:
            loss = loss * float("inf")  # overflowing gradients: the scaler must skip this step
        opt.zero_grad()
        scaler.scale(loss).backward()
        rec.stage(batch_indices=idx, loss=loss.detach().float())
        before = rec.step
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if rec.step > before:  # the optimizer really stepped
            states.append(_flat(model))
            used.append(idx.numpy())
    rec.close()
    assert scales[2] < scales[1] and len(used) == 5  # exactly one skipped step
    with Trajectory(tmp_path / "amp.h5") as traj:
        assert list(traj.steps) == list(range(6))  # 5 real updates: steps 0..5, no gap, no duplicate
        for i in range(len(traj)):
            assert torch.equal(traj.params(i), states[i])
        for i in range(5):
            assert np.array_equal(traj.batch_indices(i), used[i])  # attempt 2's batch appears nowhere
        assert np.all(np.isfinite(traj.scalars["loss"][:5]))
        assert int(traj.nonfinite.sum()) == 0


def test_bf16_autocast_records_the_fp32_parameters_after_the_step(tmp_path):
    x, y = toy_data()
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = Recorder(tmp_path / "bf16.h5", model).attach(opt)
    states = [_flat(model)]
    for s in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[s * 8 : s * 8 + 8]), y[s * 8 : s * 8 + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(_flat(model))
    rec.close()
    with Trajectory(tmp_path / "bf16.h5") as traj:
        assert {e.dtype for e in traj.layout.entries} == {"float32"}
        assert len(traj) == 5
        for i in range(5):
            assert torch.equal(traj.params(i), states[i])
