"""`sgdwalk analyze` / `sgdwalk show` through click's CliRunner (the commands work without the main group)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from test_analysis_support import record_mlp
from trajectory.analysis import ResultsFile

try:
    from trajectory.cli.analyze import analyze, show
except ImportError:
    from cli.analyze import analyze, show


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("cli") / "run.h5", steps=8, lr=0.4, seed=7)


def test_analyze_then_show(archive, tmp_path):
    out = tmp_path / "r.h5"
    r = CliRunner().invoke(analyze, [archive, "--out", str(out), "--eval", "subset:100", "--spans", "1,2", "-q"])
    assert r.exit_code == 0, r.output
    for word in ("interpolation", "floor", "geometry", "barriers", "convex+interior", "median height", "span 2"):
        assert word in r.output
    assert "0 reused" in r.output
    again = CliRunner().invoke(analyze, [archive, "--out", str(out), "--eval", "subset:100", "--spans", "1,2", "-q"])
    assert again.exit_code == 0 and "0 rows computed" in again.output
    shown = CliRunner().invoke(show, [str(out), "--json"])
    assert shown.exit_code == 0
    data = json.loads(shown.output)
    metrics = sorted(t["metric"] for t in data["tables"])
    assert metrics == ["barriers", "floor", "geometry", "interpolation"]
    floor = [t for t in data["tables"] if t["metric"] == "floor"][0]
    assert floor["rows"] == 8 and floor["step_min"] == 0 and floor["step_max"] == 8
    assert 0 <= floor["summary"]["convex_interior_fraction"] <= 1
    text = CliRunner().invoke(show, [str(out), "--metric", "floor"])
    assert text.exit_code == 0 and "floor" in text.output and "barriers" not in text.output


def test_default_results_path_and_options(archive, tmp_path):
    import shutil

    local = tmp_path / "copy.h5"
    shutil.copy(archive, local)
    r = CliRunner().invoke(analyze, [str(local), "--eval", "minibatch", "--steps", "0:8:2", "--alphas", "-0.5:1.5:9",
                                     "--metric", "floor", "--option", "height=max", "--dtype", "float64", "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "copy.results.h5").exists()
    (floor,) = ResultsFile(tmp_path / "copy.results.h5", "r").by_metric("floor")
    (interp,) = ResultsFile(tmp_path / "copy.results.h5", "r").by_metric("interpolation")
    assert sorted(k[0] for k in floor.rows) == [0, 2, 4, 6]
    assert interp.config["options"]["alphas"] == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    for row in floor.rows.values():
        assert row["height"] == row["height_max"]
        assert 0.0 <= row["a_star"] <= 1.0
    assert floor.config["shared"]["eval"] == {"kind": "minibatch"}
    json.loads(r.output)
