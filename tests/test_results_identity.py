"""Run identity: results files of another archive are never reused (issue 12, same-second runs), and results
files of the previous release are reused only under the documented legacy rule (docs/results.md)."""
from __future__ import annotations

import shutil
import uuid

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.identity import archive_identity, legacy_identity
from trajectory.archive.reader import Trajectory

try:
    from trajectory.cli.main import main
except ImportError:  # pragma: no cover - source checkout without the package mapping
    from cli.main import main

CREATED = "2026-01-01T00:00:00+00:00"
TRAIN = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--data", "synthetic", "--steps", "10",
         "--seed", "3", "--no-progress", "--device", "cpu"]


def _train(path, lr: float, *, uid: str | None) -> str:
    r = CliRunner().invoke(main, [*TRAIN, "--lr", str(lr), "--out", str(path)])
    assert r.exit_code == 0, r.output
    with h5py.File(path, "r+") as f:  # the same second: both runs carry the same 'created'
        f.attrs["created"] = CREATED
        if "archive_uuid" in f.attrs:
            del f.attrs["archive_uuid"]
        if uid is not None:
            f.attrs["archive_uuid"] = uid
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two same-seed `sgdwalk train` runs (lr 0.1 and 0.5) with equal 'created': without UUIDs (archives of the
    previous release) and with distinct UUIDs (as written now)."""
    d = tmp_path_factory.mktemp("same_second")
    a = _train(d / "a.h5", 0.1, uid=None)
    b = _train(d / "b.h5", 0.5, uid=None)
    au, bu = str(d / "au.h5"), str(d / "bu.h5")
    shutil.copy(a, au)
    shutil.copy(b, bu)
    for p in (au, bu):
        with h5py.File(p, "r+") as f:
            f.attrs["archive_uuid"] = str(uuid.uuid4())
    return {"a": a, "b": b, "au": au, "bu": bu}


def _ids(path):
    with Trajectory(path) as t:
        return archive_identity(t), legacy_identity(t)


def _step_lengths(path) -> np.ndarray:
    """Independent reference: float64 norm of each recorded update."""
    with Trajectory(path) as t:
        p = [t.params(i).double() for i in range(len(t))]
    return np.array([float((p[i + 1] - p[i]).norm()) for i in range(len(p) - 1)])


def _geometry(path, out):
    return analyze(path, out, metrics=["geometry"], device="cpu", progress=False)


def _cli(*args):
    r = CliRunner().invoke(main, list(args))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    return r.exit_code, lines


def test_same_second_runs_collide_only_under_the_legacy_id(runs):
    (ida, lega), (idb, legb) = _ids(runs["a"]), _ids(runs["b"])
    assert lega == legb  # the bug of the old identity: same layout, same initial params, same first step, same created
    assert ida != idb and ida.startswith("sha256:")
    (iau, _), (ibu, _) = _ids(runs["au"]), _ids(runs["bu"])
    assert iau.startswith("uuid:") and iau != ibu
    assert _ids(runs["au"])[0] == iau  # stable


@pytest.mark.parametrize("kind", ["hash", "uuid"])
def test_results_of_the_other_run_are_never_reused(runs, tmp_path, kind):
    a, b = (runs["a"], runs["b"]) if kind == "hash" else (runs["au"], runs["bu"])
    out = str(tmp_path / "shared.results.h5")
    rep = _geometry(a, out)
    assert rep.computed["geometry"] == 10
    code, lines = _cli("analyze", b, "--out", out, "--metric", "geometry", "--device", "cpu", "-q")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "different archive" in lines[0], lines
    (t,) = ResultsFile(out, "r").by_metric("geometry")  # untouched: still a's rows
    got = np.array([t.rows[(i,)]["step_length"] for i in range(10)])
    np.testing.assert_allclose(got, _step_lengths(a), rtol=1e-5)
    # b analysed on its own file gets its own step lengths (lr 0.5 vs 0.1: clearly different from a's)
    own = str(tmp_path / "b.results.h5")
    _geometry(b, own)
    (tb,) = ResultsFile(own, "r").by_metric("geometry")
    got_b = np.array([tb.rows[(i,)]["step_length"] for i in range(10)])
    np.testing.assert_allclose(got_b, _step_lengths(b), rtol=1e-5)
    assert np.all(np.abs(got_b - got) > 1e-3 * got)


def _legacy_file(archive, out) -> str:
    """A results file as the previous release wrote it: its archive_id is the legacy hash."""
    _geometry(archive, out)
    with Trajectory(archive) as t:
        legacy = legacy_identity(t)
    with h5py.File(out, "r+") as f:
        f.attrs["archive_id"] = legacy
    return legacy


def test_legacy_file_is_reused_for_its_own_archive_and_upgraded(runs, tmp_path):
    out = str(tmp_path / "old.results.h5")
    legacy = _legacy_file(runs["a"], out)
    rep = _geometry(runs["a"], out)
    assert rep.computed["geometry"] == 0 and rep.reused["geometry"] == 10
    f = ResultsFile(out, "r")
    assert f.attrs["archive_id"] == _ids(runs["a"])[0] and f.attrs["archive_id_legacy"] == legacy
    assert _geometry(runs["a"], out).computed["geometry"] == 0  # the upgraded id matches from now on


def test_legacy_file_of_the_same_second_run_is_refused(runs, tmp_path):
    out = str(tmp_path / "old.results.h5")
    _legacy_file(runs["a"], out)
    before = open(out, "rb").read()
    code, lines = _cli("analyze", runs["b"], "--out", out, "--metric", "geometry", "--device", "cpu", "-q")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "provenance differs" in lines[0]
    assert open(out, "rb").read() == before


@pytest.mark.parametrize("change", ["records", "uuid", "provenance", "steps"])
def test_legacy_rule_refuses_what_it_cannot_confirm(runs, tmp_path, change):
    arch = str(tmp_path / "a.h5")
    shutil.copy(runs["a"], arch)
    out = str(tmp_path / "old.results.h5")
    _legacy_file(arch, out)
    if change == "records":  # the file was written for another record count
        with h5py.File(out, "r+") as f:
            f.attrs["archive_records"] = 5
    elif change == "uuid":  # an archive with a UUID never matches a pre-UUID id
        with h5py.File(arch, "r+") as f:
            f.attrs["archive_uuid"] = str(uuid.uuid4())
    elif change == "provenance":  # no provenance to compare
        with h5py.File(out, "r+") as f:
            del f.attrs["archive_provenance"]
    else:  # a row's steps are not the archive's
        with h5py.File(out, "r+") as f:
            (g,) = [f["metrics/geometry"][k] for k in f["metrics/geometry"]]
            sa = g["step_a"][()]
            sa[3] += 1
            g["step_a"][...] = sa
    code, lines = _cli("analyze", arch, "--out", out, "--metric", "geometry", "--device", "cpu", "-q")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines


def test_new_archives_are_identified_by_the_writers_uuid(tmp_path):
    r = CliRunner().invoke(main, [*TRAIN, "--lr", "0.1", "--out", str(tmp_path / "n.h5")])
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "n.h5", "r") as f:
        uid = f.attrs["archive_uuid"]
    uid = uid.decode() if isinstance(uid, bytes) else str(uid)
    assert str(_ids(str(tmp_path / "n.h5"))[0]) == f"uuid:{uuid.UUID(uid)}"


def test_a_malformed_uuid_is_one_error_line(runs, tmp_path):
    arch = str(tmp_path / "bad.h5")
    shutil.copy(runs["a"], arch)
    with h5py.File(arch, "r+") as f:
        f.attrs["archive_uuid"] = "not-a-uuid\x1b[31m" + "x" * 5000
    code, lines = _cli("analyze", arch, "--out", str(tmp_path / "r.h5"), "--metric", "geometry", "--device", "cpu", "-q")
    assert code == 2 and len(lines) == 1 and "is not a UUID" in lines[0] and len(lines[0]) < 500, lines
    assert "\x1b" not in lines[0]
