#!/usr/bin/env python
"""Claim 4 revisited (issue 13, item 6): are the paper's barriers real or evaluation noise?

Trains BatchNorm conv nets with plain SGD (batch 64) at lr 0.1 and 0.5, records a dense window of
consecutive updates, and analyses each window's barriers (spans 1, 2, 4, 8) twice with train-mode
BatchNorm at `--bn-batch 100`:

* `--noise crn` (common random numbers: the same samples and BatchNorm groups at every point, so a
  barrier has a paired standard error), and
* `--noise resample` (the authors' protocol: a fresh BatchNorm grouping at every evaluated point).

It then counts, per model, lr and mode: barrier units above 0, above 1e-3 nats and above Z = 2 paired
standard errors (`barrier_se`); dips likewise; and peaks of the floor-loss sequence with their
prominence (above 1e-3 nats, above 2 SE = 2·hypot(floor_se of peak, of its higher base), the rule of
`tol_kind=se`). All counts are study-side arithmetic on the columns `sgdwalk analyze` wrote; the peak
search is sgdwalk's own `floor_peaks`.

    OMP_NUM_THREADS=1 python benchmarks/claim4_barriers.py --out claim4_out          # ~12 min, 1 thread (shared)
    OMP_NUM_THREADS=1 python benchmarks/claim4_barriers.py --quick --out /tmp/c4q    # smoke run, ~3 min

Resumable: a command whose output file exists in OUT is skipped (delete the file to recompute it).
Every command is printed and appended to OUT/commands.sh; OUT/summary.json and OUT/summary.md hold
the counts. Results are discussed in docs/reproduction.md ("Claim 4 revisited").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# model name, model kwargs, data name, data kwargs, steps per epoch (batch 64)
SETUPS = {
    "cnn_bn-1d": ("cnn_bn", {"width": 8}, "mnist1d", {}),
    "cnn_bn-2d": ("cnn_bn", {"width": 8, "input_dim": 2},
                  "synthetic", {"num_samples": 2000, "input_shape": [1, 8, 8], "separation": 0.5}),
}
FULL = dict(lrs=(0.1, 0.5), seeds=(0, 1), start=186, pairs=24, spans="1,2,4,8", eval="subset:1000")
QUICK = dict(lrs=(0.5,), seeds=(0,), start=62, pairs=8, spans="1,2,4", eval="subset:1000")
MODES = ("crn", "resample")
TOL = 1e-3   # nats, sgdwalk's default barrier_tol
Z = 2.0      # standard errors


def run(cmd: list[str], out: Path, product: str) -> float:
    """Run one sgdwalk command in OUT unless its product exists (resumable); log it either way."""
    shown = "OMP_NUM_THREADS=1 sgdwalk " + " ".join(shlex.quote(c) for c in cmd)
    print(shown, flush=True)
    with (out / "commands.sh").open("a") as f:
        f.write(shown + "\n")
    if (out / product).exists():
        print(f"  ({product} exists: skipped; remove it to recompute)", flush=True)
        return math.nan
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "trajectory.cli", *cmd], cwd=out, env=env, check=True)
    return time.perf_counter() - t0


def table(path: Path, metric: str) -> dict[str, np.ndarray]:
    import h5py
    with h5py.File(path, "r", locking=False) as f:
        groups = list(f["metrics"][metric].values())
        if len(groups) != 1:
            raise SystemExit(f"{path}: expected one {metric} table, found {len(groups)}")
        g = groups[0]
        return {k: g[k][()] for k in g.keys()}


def count(res: Path) -> dict:
    """Counts for one results file: per span and for the floor-loss sequence."""
    from trajectory.analysis.metrics.barriers import Barriers, floor_peaks
    ba, fl = table(res, "barriers"), table(res, "floor")
    ok = ~ba["nonfinite"].astype(bool)
    out: dict = {"spans": {}}
    for k in np.unique(ba["span"]):
        m = ok & (ba["span"] == k)
        b, bse, d, dse = ba["barrier"][m], ba["barrier_se"][m], ba["dip"][m], ba["dip_se"][m]
        out["spans"][int(k)] = {
            "units": int(m.sum()),
            "barrier>0": int((b > 0).sum()),
            f"barrier>{TOL:g}": int((b > TOL).sum()),
            "barrier>2se": int((b > Z * bse).sum()),
            "barrier>1e-3&2se": int(((b > TOL) & (b > Z * bse)).sum()),
            "max_barrier": float(b.max()) if b.size else math.nan,
            # SE of the barriers that exist (a zero barrier has its maximum at an end: SE 0)
            "median_barrier_se": float(np.median(bse[b > 0])) if (b > 0).any() else math.nan,
            "median_dip_se": float(np.median(dse)) if d.size else math.nan,
            f"dip>{TOL:g}": int((d > TOL).sum()),
            "dip>2se": int((d > Z * dse).sum()),
            "median_dip": float(np.median(d)) if d.size else math.nan,
        }
    _, floors, _, ses = Barriers.floor_sequence(ba)
    idx, prom, lb, rb = floor_peaks(floors)
    se = np.array([math.hypot(ses[i], ses[l if floors[l] >= floors[r] else r]) for i, l, r in zip(idx, lb, rb)])
    out["floor_peaks"] = int(len(idx))
    out[f"peaks>{TOL:g}"] = int((prom > TOL).sum())
    out["peaks>2se"] = int((prom > Z * se).sum()) if len(idx) else 0
    out["max_prominence"] = float(prom.max()) if len(prom) else math.nan
    out["median_floor_se"] = float(np.nanmedian(ses))
    out["median_height"] = float(np.nanmedian(fl["height"]))
    out["median_height_se"] = float(np.nanmedian(fl["height_se"]))
    out["convex_interior"] = float(np.mean(fl["convex_interior"]))
    out["median_loss_a"] = float(np.nanmedian(fl["loss_a"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("claim4_out"))
    ap.add_argument("--quick", action="store_true", help="one lr, 8 pairs, subset:1000: a smoke run")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.sh").write_text("")
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
    t_all = time.perf_counter()
    results: dict = {"code_version": version, "config": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in cfg.items()}, "runs": {}}
    a, n = cfg["start"], cfg["pairs"]
    for setup, (model, mkw, data, dkw) in SETUPS.items():
        for lr in cfg["lrs"]:
            for seed in cfg["seeds"]:
                name = f"{setup}_lr{lr:g}_s{seed}"
                arch = f"{name}.h5"
                timings = {"train": run(["train", "--model", model, "--model-kwargs", json.dumps(mkw), "--data", data,
                                         "--data-kwargs", json.dumps(dkw), "--lr", f"{lr:g}", "--batch-size", "64",
                                         "--steps", str(a + n + 1), "--seed", str(seed),
                                         "--record", f"window:{a}-{a + n + 1}:1", "--device", "cpu",
                                         "--no-progress", "--overwrite", "--out", arch], out, arch)}
                entry: dict = {}
                for mode in MODES:
                    res = f"{name}.{mode}.results.h5"
                    timings[mode] = run(["analyze", arch, "--steps", f"{a}:{a + n}", "--eval", cfg["eval"],
                                         "--bn", "train", "--bn-batch", "100", "--noise", mode,
                                         "--spans", cfg["spans"], "--device", "cpu", "-q", "-o", res], out, res)
                    entry[mode] = count(out / res)
                entry["seconds"] = timings
                results["runs"][name] = entry
    results["seconds_total"] = time.perf_counter() - t_all
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    md = render(results)
    (out / "summary.md").write_text(md)
    print(md)


def render(results: dict) -> str:
    lines = [f"code version {results['code_version']}, {results['seconds_total']:.0f} s", "",
             "| run | noise | span | units | barrier > 0 | > 1e-3 | > 2 SE | > 1e-3 and 2 SE | max barrier | "
             "median SE of barriers > 0 | dip > 1e-3 | dip > 2 SE | median dip | median dip SE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["runs"].items():
        for mode in MODES:
            for k, s in e[mode]["spans"].items():
                lines.append(f"| {name} | {mode} | {k} | {s['units']} | {s['barrier>0']} | {s[f'barrier>{TOL:g}']} | "
                             f"{s['barrier>2se']} | {s['barrier>1e-3&2se']} | {s['max_barrier']:.2e} | "
                             f"{s['median_barrier_se']:.1e} | {s[f'dip>{TOL:g}']} | {s['dip>2se']} | "
                             f"{s['median_dip']:.1e} | {s['median_dip_se']:.1e} |")
    lines += ["", "| run | noise | L(θ_t) | convex+interior | median height | median height SE | median floor SE | "
              "floor peaks | > 1e-3 | > 2 SE | max prominence |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["runs"].items():
        for mode in MODES:
            s = e[mode]
            lines.append(f"| {name} | {mode} | {s['median_loss_a']:.3f} | {s['convex_interior']:.2f} | "
                         f"{s['median_height']:.2e} | {s['median_height_se']:.1e} | {s['median_floor_se']:.1e} | "
                         f"{s['floor_peaks']} | {s[f'peaks>{TOL:g}']} | {s['peaks>2se']} | {s['max_prominence']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
