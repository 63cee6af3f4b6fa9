"""A killed writer leaves a readable archive; a reader follows a live writer (HDF5 SWMR)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trajectory import Recorder, Trajectory

# The child sets every parameter to its step number, so the parent knows each record's exact value.
_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from trajectory import Recorder
    path, flush_at, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 5))
    def set_to(step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
            model[1].running_mean.fill_(-float(step))
    set_to(0)
    rec = Recorder(path, model, chunk_rows=8, flush_interval=3600, mode=mode)
    start = rec.step
    for s in range(start + 1, start + 10_000):
        set_to(s)
        rec.record(batch_indices=[s, s + 1], loss=float(s))
        if s == start + flush_at:
            rec.flush()
            print("FLUSHED", s, flush=True)
        if s > start + flush_at:
            time.sleep(0.002)  # keep writing unflushed records until killed
    """
)


def _start_writer(path: Path, flush_at: int, mode: str = "x") -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(flush_at), mode], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("FLUSHED"), line
    return proc, int(line.split()[1])


def _check_records(traj: Trajectory, upto: int) -> None:
    assert traj.steps[0] == 0
    assert list(traj.steps) == list(range(len(traj)))
    for i in range(len(traj)):
        sd = traj.state_dict(i)
        assert torch.all(sd["0.weight"] == float(i)) and torch.all(sd["1.running_mean"] == -float(i))
        if i < len(traj) - 1:
            assert list(traj.batch_indices(i)) == [i + 1, i + 2]
    assert len(traj) >= upto + 1


def test_sigkill_leaves_every_flushed_record_readable(tmp_path):
    path = tmp_path / "killed.h5"
    proc, flushed = _start_writer(path, flush_at=21)  # 22 records flushed: 2 full chunks + a partial one
    time.sleep(0.3)  # let it write unflushed records (and whole chunks) after the flush
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Trajectory(path) as traj:
        assert not traj.closed_cleanly
        _check_records(traj, flushed)
        steps, values = traj.scalar_history("loss")
        assert np.array_equal(values, steps + 1.0)

    # appending after the crash continues from the last complete record
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 5))
    with Trajectory(path) as traj:
        n = len(traj)
        traj.load_into(model, n - 1)
    with Recorder(path, model, mode="a", chunk_rows=8) as rec:
        assert rec.step == n - 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(n))
            model[1].running_mean.fill_(-float(n))
        rec.record(batch_indices=[n, n + 1])
    with Trajectory(path) as traj:
        assert traj.closed_cleanly and len(traj) == n + 1
        assert torch.all(traj.state_dict(n)["0.weight"] == float(n))


def test_reader_follows_a_live_writer(tmp_path):
    path = tmp_path / "live.h5"
    proc, flushed = _start_writer(path, flush_at=5)
    try:
        with Trajectory(path) as traj:
            first = len(traj)
            assert first >= flushed + 1
            _check_records(traj, flushed)
            deadline = time.time() + 20
            while traj.refresh() <= first + 8 and time.time() < deadline:  # a full chunk more gets written
                time.sleep(0.1)
            assert len(traj) > first
            _check_records(traj, first)
    finally:
        proc.kill()
        proc.wait()
