"""Bad input: untrusted or unimportable specs, a model that does not match the layout, a single-record
archive, NaN losses, a results file from another archive, bad options. Errors are one line, exit 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_analysis_support import mlp_spec, record_mlp
from trajectory import Recorder
from trajectory.analysis import ResultsFile, analyze

try:
    from trajectory.cli.analyze import analyze as analyze_cmd, show as show_cmd
except ImportError:  # source checkout without an installed package: cli/ is a top-level package
    from cli.analyze import analyze as analyze_cmd, show as show_cmd


def _run(args):
    res = CliRunner().invoke(analyze_cmd, [str(a) for a in args] + ["-q"])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("bad") / "good.h5", steps=4, seed=5)


def _one_error_line(out):
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_untrusted_spec_is_refused_without_importing(tmp_path, monkeypatch):
    path = record_mlp(tmp_path / "evil.h5", steps=2, model_spec="os:system")
    import os

    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    code, out = _run([path, "--out", tmp_path / "r.h5"])
    assert code == 2
    line = _one_error_line(out)
    assert "os:system" in line and "--trust-specs" in line
    assert not called
    assert not (tmp_path / "r.h5").exists()
    # the user may override the spec instead of trusting it
    code, out = _run([path, "--out", tmp_path / "r.h5", "--model", 'mlp {"in_features": 40, "hidden": [16], "num_classes": 10}',
                      "--eval", "subset:50", "--metric", "interpolation"])
    assert code == 0, out


def test_unimportable_spec_with_trust(tmp_path):
    path = record_mlp(tmp_path / "gone.h5", steps=2, model_spec="sgdwalk_no_such_module_xyz:factory")
    code, out = _run([path, "--trust-specs"])
    assert code == 2
    assert "sgdwalk_no_such_module_xyz" in _one_error_line(out)


def test_model_that_does_not_match_the_layout(good, tmp_path):
    code, out = _run([good, "--out", tmp_path / "r.h5", "--model", 'mlp {"in_features": 40, "hidden": [8]}'])
    assert code == 2
    assert "does not match the archive" in _one_error_line(out)


def test_single_record_archive(tmp_path):
    torch.manual_seed(0)
    spec = mlp_spec()
    with Recorder(tmp_path / "one.h5", spec.build(), model_spec=spec):
        pass
    code, out = _run([tmp_path / "one.h5"])
    assert code == 2
    assert "at least two" in _one_error_line(out)


def test_nan_losses_are_reported_not_fatal(tmp_path):
    path = record_mlp(tmp_path / "nan.h5", steps=6, nan_at=3)
    out = tmp_path / "nan.results.h5"
    rep = analyze(path, out, eval="subset:100", spans="1,2")
    (floor,) = ResultsFile(out, "r").by_metric("floor")
    bad = sorted(k[0] for k, r in floor.rows.items() if r["nonfinite"])
    assert bad == [3, 4, 5]  # every pair touching a NaN record (record 4 onwards is NaN)
    assert np.isnan(floor.rows[(3,)]["floor_loss"]) and not floor.rows[(3,)]["convex_interior"]
    assert not floor.rows[(0,)]["nonfinite"] and np.isfinite(floor.rows[(0,)]["floor_loss"])
    (ft,) = [t for t in rep.summary["tables"] if t["metric"] == "floor"]
    assert ft["summary"]["nonfinite_pairs"] == 3
    (bars,) = ResultsFile(out, "r").by_metric("barriers")
    assert bars.rows[(2, 1)]["nonfinite"] and not bars.rows[(0, 1)]["nonfinite"]
    code, text = _run([path, "--out", out, "--eval", "subset:100", "--spans", "1,2"])
    assert code == 0 and "nonfinite 3" in text


def test_results_from_another_archive_are_refused(good, tmp_path):
    other = record_mlp(tmp_path / "other.h5", steps=3, seed=9)
    out = tmp_path / "r.h5"
    analyze(good, out, eval="subset:50", metrics=["geometry"])
    code, text = _run([other, "--out", out, "--metric", "geometry"])
    assert code == 2
    assert "different archive" in _one_error_line(text)
    # an archive is not a results file either, and is never written
    before = open(good, "rb").read()
    code, text = _run([other, "--out", good])
    assert code == 2 and _one_error_line(text)
    assert open(good, "rb").read() == before
    res = CliRunner().invoke(show_cmd, [good])
    assert res.exit_code == 2 and _one_error_line(res.output)


@pytest.mark.parametrize("args,needle", [
    (["--eval", "everything"], "--eval"),
    (["--alphas", "1:0:5"], "--alphas"),
    (["--steps", "999"], "no recorded pair"),
    (["--metric", "no_such_metric"], "unknown metric"),
    (["--spans", "0"], "--spans"),
    (["--device", "cuda:7"], "--device"),
    (["--alphas", "0.2,0.5"], "include 0 and 1"),
])
def test_bad_options(good, tmp_path, args, needle):
    code, out = _run([good, "--out", tmp_path / "r.h5"] + args)
    assert code == 2
    assert needle in _one_error_line(out)


def test_missing_archive(tmp_path):
    code, out = _run([tmp_path / "nope.h5"])
    assert code == 2 and "no such archive" in _one_error_line(out)


def test_unknown_metric_option(good, tmp_path):
    code, out = _run([good, "--out", tmp_path / "r.h5", "--option", "heigth=max"])
    assert code == 2 and "heigth" in _one_error_line(out)
