"""The issue-14 dynamics study (benchmarks/dynamics_study.py): its study-side arithmetic against brute-force
references, and a --quick smoke run whose summary.json must hold every field the docs section reads."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "dynamics_study.py"


def _load():
    spec = importlib.util.spec_from_file_location("dynamics_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    sys.modules["dynamics_study"] = mod          # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_max_rise_matches_brute_force():
    ds = _load()
    rng = np.random.default_rng(0)
    for _ in range(50):
        loss = np.cumsum(rng.normal(-0.1, 0.3, size=21))
        se = rng.uniform(0.01, 0.1, size=21)
        best, bse = 0.0, 0.0
        for i in range(21):                      # every pair t_i < t_j
            for j in range(i + 1, 21):
                if loss[j] - loss[i] > best:
                    best, bse = loss[j] - loss[i], math.sqrt(se[i] ** 2 + se[j] ** 2)
        got, got_se = ds.max_rise(loss, se)
        assert got == pytest.approx(best, abs=1e-12)
        assert got_se == pytest.approx(bse, abs=1e-12)
    assert ds.max_rise(np.array([3.0, 2.0, 2.0, 1.0]), np.ones(4)) == (0.0, 0.0)   # monotonic: no rise


def test_steps_to_target_interpolates_linearly():
    ds = _load()
    steps = np.array([0, 10, 20, 30])
    loss = np.array([2.0, 1.5, 1.0, 0.9])
    assert ds.steps_to(steps, loss, 1.25) == pytest.approx(15.0)
    assert ds.steps_to(steps, loss, 2.5) == 0.0
    assert math.isnan(ds.steps_to(steps, loss, 0.5))


def test_critical_batch_fit_recovers_known_b_crit():
    ds = _load()
    s_min, b_crit = 300.0, 90.0
    agg = {f"b{b}": {"batch": b, "lr": 0.1, "groups": ["batch"],
                     "steps_to_target": {"1": {"mean": s_min * (1 + b_crit / b)}}} for b in (16, 64, 256)}
    fit = ds.critical_batch(agg, {"targets": (1.0,)})["1"]
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
    assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
    assert fit["epochs"][0] == pytest.approx(s_min * (1 + b_crit / 16) * 16 / 4000)


@pytest.mark.slow
def test_quick_study_summary_has_every_field(tmp_path):
    """14 sgdwalk commands (2 runs of 186 steps): about 60 s of CPU, mostly process start-up."""
    out = tmp_path / "dyn"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "$ OMP_NUM_THREADS=1 sgdwalk line" in proc.stdout          # the commands are printed
    s = json.loads((out / "summary.json").read_text())
    for key in ("design", "machine", "seconds", "configs", "seed_lines", "critical_batch", "runs", "figures"):
        assert key in s, key
    (c,) = s["configs"].values()
    for lab, w in c["windows"].items():
        for k in ("b_simple", "batch_over_b_simple", "grad_norm", "trace_sigma", "cos_update", "actual_over_pred",
                  "share_top", "top_fraction", "interaction_rel", "height_floor", "floor_share_top", "lambda_max"):
            assert w[k]["n"] == 2 and all(np.isfinite(w[k]["values"])), (lab, k, w[k])
        assert w["b_simple"]["mean"] > 0 and 0 <= w["top_fraction"]["mean"] <= 1
    for key in ("line_subset", "line_test"):
        for k in ("max_rise", "max_rise_over_se", "barrier", "loss_start", "loss_end", "acc_end", "distance"):
            assert c[key][k]["n"] == 2, (key, k)
        assert c[key]["monotonic_runs"] in (0, 1, 2)
    assert set(s["critical_batch"]) == {"2", "1.5"}
    (sl,) = s["seed_lines"].values()
    for key in ("subset", "test"):
        for k in ("barrier", "barrier_se", "barrier_over_se", "connected", "acc_mid", "distance"):
            assert k in sl[key], (key, k)
        assert sl[key]["distance"] > 0
    for r in s["runs"]:
        assert set(r["windows"]) == {"e1", "e2", "end"}
        assert r["windows"]["e1"]["grad_records"] == 1 and r["windows"]["e1"]["split_pairs"] == 2
    assert {Path(f).name for f in s["figures"]} == {"b_simple.png", "top5_share.png", "lines.png"}
    assert (out / "commands.sh").read_text().count("sgdwalk ") == 14
    assert (out / "commands_used.sh").read_text().count("sgdwalk ") == 14
