"""A third-party metric registered through the 'sgdwalk.metrics' entry point group runs without touching
sgdwalk's code. The plug-in is 'installed' by writing a NAME.dist-info/ (METADATA + entry_points.txt) next
to its module in a temporary directory on PYTHONPATH, which importlib.metadata discovers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_analysis_support import install_metric_plugin, record_mlp
from trajectory.analysis import ResultsFile, analyze

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = textwrap.dedent('''
    """A tiny sgdwalk metric plug-in: the loss at one interior point of each update."""
    from trajectory.analysis import Metric


    class MidLoss(Metric):
        name = "midloss"
        defaults = {"at": 0.5}

        def compute(self, ctx, units):
            curves = ctx.evaluate_segments([(u[0], [self.options["at"]]) for u in units])
            return [{"loss": float(l[0]), "acc": float(a[0])} for l, a in curves]

        def summarize(self, rows):
            return {"mean_mid_loss": float(rows["loss"].mean())}
''')


@pytest.fixture()
def plugin_dir(tmp_path):
    return install_metric_plugin(tmp_path / "site", "sgdwalk_midloss", PLUGIN, "midloss", "MidLoss")


def _env(plugin_dir):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), ROOT])}


def test_entry_point_plugin_runs_from_the_cli(plugin_dir, tmp_path):
    archive = record_mlp(tmp_path / "run.h5", steps=5, seed=6)
    out = tmp_path / "run.results.h5"
    cmd = [sys.executable, "-m", "cli.analyze", archive, "--metric", "midloss", "--eval", "subset:150", "--out", str(out), "-q", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(plugin_dir), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    (entry,) = summary["tables"]
    assert entry["metric"] == "midloss" and entry["rows"] == 5
    assert entry["config"]["options"] == {"at": 0.5}
    # same numbers as the built-in interpolation curve at a = 0.5 under the same settings
    analyze(archive, out, metrics=["interpolation"], eval="subset:150")
    f = ResultsFile(out, "r")
    (mid,) = f.by_metric("midloss")
    (interp,) = f.by_metric("interpolation")
    for (i,), row in mid.rows.items():
        np.testing.assert_allclose(row["loss"], interp.rows[(i,)]["loss"][10], rtol=1e-6)
    assert entry["summary"]["mean_mid_loss"] == pytest.approx(np.mean([r["loss"] for r in mid.rows.values()]))
    # `show` without the plug-in installed still lists its rows
    res = subprocess.run([sys.executable, "-c", "from cli.analyze import show; show()", str(out)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "midloss" in res.stdout and "not installed here" in res.stdout


def test_entry_point_discovery_in_process(plugin_dir, monkeypatch):
    from trajectory.analysis import available_metrics, get_metric

    monkeypatch.syspath_prepend(str(plugin_dir))
    assert "midloss" in available_metrics()
    cls = get_metric("midloss")
    assert cls.__name__ == "MidLoss" and cls.name == "midloss"
