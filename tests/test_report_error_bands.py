"""The report's interpolation figure draws ±1 standard-error bands from the ``loss_se`` column (issue 13)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from trajectory.analysis import ResultsFile, analyze  # noqa: E402
from trajectory.report.fig_interpolation import interpolation_figure  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data", "mnist1d_mlp.h5")


def test_interpolation_figure_has_a_band_of_loss_plus_minus_se(tmp_path):
    out = tmp_path / "r.h5"
    analyze(SAMPLE, out, metrics=["interpolation"], steps="0:3", eval="subset:200", alphas="0:1:5", device="cpu")
    t = ResultsFile(out, "r").by_metric("interpolation")[0]
    fig = interpolation_figure(str(out))
    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert bands, "no error band drawn"
    ys = np.concatenate([p.vertices[:, 1] for b in bands for p in b.get_paths()])
    rows = [t.rows[k] for k in sorted(t.rows)]
    lo = min(float(np.min(r["loss"] - r["loss_se"])) for r in rows)
    hi = max(float(np.max(r["loss"] + r["loss_se"])) for r in rows)
    assert np.isclose(ys.min(), lo, rtol=1e-6) and np.isclose(ys.max(), hi, rtol=1e-6)
    assert all(np.all(r["loss_se"] > 0) for r in rows)
