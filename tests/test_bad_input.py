"""Bad input gets one clear line naming the problem, never a traceback from deep inside h5py."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import make_mlp, sgd_run
from trajectory import (
    ArchiveError,
    ArchiveFormatError,
    ArchiveVersionError,
    LayoutMismatchError,
    Recorder,
    Trajectory,
)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.h5"
    model = make_mlp()
    with Recorder(path, model) as rec:
        sgd_run(rec, model, 30)
    return path


def _one_line(err):
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(ArchiveError) as err:
        Trajectory(tmp_path / "nope.h5")
    assert "no such archive" in _one_line(err)


def test_truncated_file(good, tmp_path):
    bad = tmp_path / "trunc.h5"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArchiveFormatError) as err:
        Trajectory(bad)
    assert "truncated" in _one_line(err) or "not a readable" in _one_line(err)


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(ArchiveFormatError) as err:
        Trajectory(bad)
    assert "not a readable HDF5 file" in _one_line(err)


def test_foreign_hdf5(tmp_path):
    bad = tmp_path / "foreign.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ArchiveFormatError) as err:
        Trajectory(bad)
    assert "not an sgdwalk trajectory archive" in _one_line(err)


def test_newer_format_version(good):
    with h5py.File(good, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ArchiveVersionError) as err:
        Trajectory(good)
    assert "v99" in _one_line(err) and "upgrade" in _one_line(err)


@pytest.mark.parametrize("name", ["steps", "params", "layout", "batches/indices"])
def test_missing_dataset(good, tmp_path, name):
    bad = tmp_path / "missing.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        del f[name]
    with pytest.raises(ArchiveFormatError) as err:
        Trajectory(bad)
    assert f"'{name}'" in _one_line(err)


def test_wrong_model(good):
    with Trajectory(good) as traj:
        with pytest.raises(LayoutMismatchError) as err:
            traj.load_into(make_mlp(batchnorm=True), 0)
        assert "does not match" in _one_line(err)
        wide = torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))
        with pytest.raises(LayoutMismatchError) as err:
            traj.load_into(wide, 0)
        assert "shape" in _one_line(err)
        with pytest.raises(LayoutMismatchError) as err:
            traj.load_into(make_mlp(dtype=torch.float64), 0)
        assert "float64" in _one_line(err)


def test_index_out_of_range(good):
    with Trajectory(good) as traj:
        with pytest.raises(IndexError, match="holds 31 records"):
            traj.params(31)
        assert torch.equal(traj.params(-1), traj.params(30))


def test_missing_spec_is_named(good):
    with Trajectory(good) as traj:
        with pytest.raises(ArchiveFormatError, match="records no model spec"):
            traj.build_model()
