"""Results files are validated on read: each problem is one `error:` line (exit 2), never a traceback, and a row
is reused only when it is complete (docs/results.md, "Validation")."""
from __future__ import annotations

import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from test_analysis_support import record_mlp
from trajectory.analysis import ResultsError, ResultsFile, analyze
from trajectory.archive.reader import Trajectory

try:
    from trajectory.cli.main import main
except ImportError:  # pragma: no cover
    from cli.main import main

STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("validation")
    arch = record_mlp(d / "run.h5", steps=STEPS, lr=0.3, seed=2)
    out = str(d / "run.results.h5")
    analyze(arch, out, metrics=["geometry"], device="cpu", progress=False)
    return arch, out


def _copy(base, tmp_path):
    arch, out = base
    dst = str(tmp_path / "r.results.h5")
    shutil.copy(out, dst)
    return arch, dst


def _group(f: h5py.File) -> h5py.Group:
    (name,) = list(f["metrics/geometry"])
    return f["metrics/geometry"][name]


def _cli(*args):
    r = CliRunner().invoke(main, list(args))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    return r, lines


def _assert_one_error(r, lines, needle: str):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) < 800, lines
    assert "Traceback" not in r.output
    assert needle in errors[0], errors[0]


def _mutate_shorter_column(f):
    g = _group(f)
    v = g["step_length"][()]
    del g["step_length"]
    g["step_length"] = v[:-1]


def _mutate_negative_pair(f):
    g = _group(f)
    p = g["pair"][()]
    p[0] = -1
    g["pair"][...] = p


def _mutate_duplicate_key(f):
    g = _group(f)
    p = g["pair"][()]
    p[1] = p[0]
    g["pair"][...] = p


def _mutate_float_pair(f):
    g = _group(f)
    p = g["pair"][()]
    del g["pair"]
    g["pair"] = p.astype(np.float64)


def _mutate_string_version(f):
    f.attrs["format_version"] = "one"


def _mutate_no_config(f):
    del _group(f).attrs["config"]


def _mutate_deep_config(f):
    _group(f).attrs["config"] = "[" * 100000 + "]" * 100000


def _mutate_external_link(f):
    f["metrics/geometry/leak"] = h5py.ExternalLink("/etc/passwd", "/")


def _mutate_soft_link(f):
    f["metrics/alias"] = h5py.SoftLink("/metrics/geometry")


def _mutate_external_storage(f):
    _group(f).create_dataset("ext", shape=(4,), dtype="f8", external=[("/etc/passwd", 0, 32)])


def _mutate_virtual(f):
    layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
    layout[:] = h5py.VirtualSource("/etc/passwd", "x", shape=(4,))
    _group(f).create_virtual_dataset("vds", layout)


FILE_DAMAGE = {
    "shorter column": (_mutate_shorter_column, "rows but 'pair' has"),
    "negative pair": (_mutate_negative_pair, "negative pair index"),
    "duplicate key": (_mutate_duplicate_key, "a key appears twice"),
    "float pair": (_mutate_float_pair, "1-D integer dataset"),
    "string format_version": (_mutate_string_version, "format_version"),
    "no config": (_mutate_no_config, "'config' attribute"),
    "deep config": (_mutate_deep_config, "nests 100000 levels"),
    "external link": (_mutate_external_link, "external link"),
    "soft link": (_mutate_soft_link, "soft link"),
    "external storage": (_mutate_external_storage, "external raw storage"),
    "virtual dataset": (_mutate_virtual, "virtual dataset"),
}


@pytest.mark.parametrize("case", sorted(FILE_DAMAGE))
def test_damaged_results_file_is_one_error_line(base, tmp_path, case):
    arch, out = _copy(base, tmp_path)
    mutate, needle = FILE_DAMAGE[case]
    with h5py.File(out, "r+") as f:
        mutate(f)
    with pytest.raises(ResultsError, match=needle):
        ResultsFile(out, "r")
    before = open(out, "rb").read()
    r, lines = _cli("show", out)
    _assert_one_error(r, lines, needle)
    r, lines = _cli("analyze", arch, "--out", out, "--metric", "geometry", "--device", "cpu", "-q")
    _assert_one_error(r, lines, needle)
    assert open(out, "rb").read() == before  # refused files are never rewritten


def test_rows_beyond_the_archive_are_refused(base, tmp_path):
    arch, out = _copy(base, tmp_path)
    with h5py.File(out, "r+") as f:
        g = _group(f)
        p = g["pair"][()]
        p[-1] = STEPS + 3  # a pair the archive does not have
        g["pair"][...] = p
    ResultsFile(out, "r")  # without the archive nothing is wrong with it
    r, lines = _cli("analyze", arch, "--out", out, "--metric", "geometry", "--device", "cpu", "-q")
    _assert_one_error(r, lines, f"the archive has {STEPS + 1} records")


def test_fifo_results_path_is_refused_at_once(base, tmp_path):
    arch, _ = base
    fifo = str(tmp_path / "fifo.results.h5")
    os.mkfifo(fifo)
    r, lines = _cli("show", fifo)
    _assert_one_error(r, lines, "not a regular file")
    r, lines = _cli("analyze", arch, "--out", fifo, "--metric", "geometry", "--device", "cpu", "-q")
    _assert_one_error(r, lines, "not a regular file")


def _reference_step_lengths(arch) -> np.ndarray:
    with Trajectory(arch) as t:
        p = [t.params(i).double() for i in range(len(t))]
    return np.array([float((p[i + 1] - p[i]).norm()) for i in range(len(p) - 1)])


@pytest.mark.parametrize("damage", ["missing", "string"])
def test_incomplete_rows_are_recomputed_not_reused(base, tmp_path, damage):
    arch, out = _copy(base, tmp_path)
    with h5py.File(out, "r+") as f:
        g = _group(f)
        del g["step_length"]
        if damage == "string":
            g["step_length"] = np.array([b"x"] * STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (t,) = ResultsFile(out, "r").by_metric("geometry")
    assert len(t) == 0 and any("incomplete" in str(w.message) for w in caught)
    rep = analyze(arch, out, metrics=["geometry"], device="cpu", progress=False)
    assert rep.computed["geometry"] == STEPS and rep.reused["geometry"] == 0
    (t,) = ResultsFile(out, "r").by_metric("geometry")
    got = np.array([t.rows[(i,)]["step_length"] for i in range(STEPS)])
    np.testing.assert_allclose(got, _reference_step_lengths(arch), rtol=1e-5)
    assert t.rows_computed == STEPS  # the dropped rows are not counted as computed twice


def test_complete_rows_with_nan_are_reused(base, tmp_path):
    """Complete means every column present with the right shape; NaN values are legitimate results."""
    arch, out = _copy(base, tmp_path)
    with h5py.File(out, "r+") as f:
        g = _group(f)
        v = g["cos_prev"][()]
        assert np.isnan(v[0])  # the first pair has no previous update
    rep = analyze(arch, out, metrics=["geometry"], device="cpu", progress=False)
    assert rep.computed["geometry"] == 0 and rep.reused["geometry"] == STEPS
