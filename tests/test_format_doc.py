"""docs/format.md promises that h5py + hdf5plugin alone read an archive; run its snippet to keep that true."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trajectory import Recorder, Trajectory

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def test_reading_snippet_in_format_doc(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with Recorder(tmp_path / "run.h5", model) as rec:
        for s in range(60):
            with torch.no_grad():
                model[0].weight.add_(0.01 * s)
            rec.record(batch_indices=[s, s + 7])
    snippet = DOC.read_text().split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(snippet, str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    with Trajectory(tmp_path / "run.h5") as traj:
        assert np.array_equal(ns["theta_i"], traj.params(42).numpy())
        assert np.array_equal(ns["w"], traj.state_dict(42)["0.weight"].numpy())
        assert list(ns["indices"]) == [42, 49]
