"""A write error (disk full, file too large) while recording: one RecorderError, no phantom records, no crash.

Fault-injection seam: the child process lowers ``RLIMIT_FSIZE`` after the archive is created, so the kernel
fails HDF5's own writes (EFBIG, the same failure path as ENOSPC) through the real POSIX driver. It runs in CI
with nothing mounted. Before the fix, such a run claimed records that were never written and died with
SIGSEGV at interpreter exit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trajectory import Trajectory

_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from trajectory import Recorder
    from trajectory.errors import RecorderError
    path, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 50)
    def set_to(step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
    set_to(0)
    rec = Recorder(path, model, chunk_rows=8, flush_interval=0.0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    raised = []
    for s in range(1, 2000):
        set_to(s)
        try:
            rec.record(batch_indices=[s], loss=float(s))
        except RecorderError as err:
            raised.append(("record", str(err)))
            break
    try:
        rec.close()
    except RecorderError as err:
        raised.append(("close", str(err)))
    for where, msg in raised:
        print("RAISED", where, msg.splitlines()[0], flush=True)
    """
)


@pytest.mark.parametrize("limit", [20_000, 60_000, 170_000, 400_000])
def test_write_failure_raises_and_keeps_the_flushed_records(tmp_path: Path, limit: int) -> None:
    path = tmp_path / "full.h5"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(limit)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # no SIGSEGV (-11) at exit
    raised = [line for line in proc.stdout.splitlines() if line.startswith("RAISED")]
    assert raised, proc.stdout + proc.stderr[-2000:]
    assert all("failed" in line for line in raised)
    assert "Traceback" not in proc.stderr
    with Trajectory(path) as traj:
        assert not traj.closed_cleanly
        n = len(traj)
        print('records kept', n, raised)
        assert n >= 1  # the limits leave room for at least the first flush
        assert list(traj.steps) == list(range(n))  # no phantom records (steps 0 with all-zero params)
        for i in range(n):
            assert torch.all(traj.params(i) == float(i)), i
        assert os.path.getsize(path) <= limit
