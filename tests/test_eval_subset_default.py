"""The default evaluation subset on a split smaller than it records the number of samples actually used (issue 11)."""
from __future__ import annotations

import json
import os
import shutil

import h5py

from trajectory.analysis import analyze

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_default_subset_on_a_small_split_records_the_real_n(tmp_path):
    archive = tmp_path / "tiny.h5"
    shutil.copy(os.path.join(DATA, "cnn_bn_tiny.h5"), archive)  # MNIST-1D with num_samples=500: 400 training samples
    rep = analyze(archive, tmp_path / "r.h5", metrics=["interpolation"], steps="0:1", alphas="0:1:3", device="cpu")
    cfg = rep.tables["interpolation"].config
    assert cfg["shared"]["eval"] == {"kind": "subset", "n": 400, "seed": 0}, cfg["shared"]["eval"]
    with h5py.File(rep.results_path, "r") as f:
        stored = [json.loads(g.attrs["config"]) for g in f["metrics/interpolation"].values()]
    assert stored[0]["shared"]["eval"]["n"] == 400
