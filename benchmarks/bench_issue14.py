"""Cost of the issue-14 metrics (gradients, eigen_split, per_layer) and of ``analyze_line`` per unit, on a small MLP.

Prints one table: seconds per pair (per line) and the ratio to one ``interpolation`` pair at the default 21 points,
so the figures transfer between machines. Timings on a shared machine are indicative only (the lead re-measures).
Run: python benchmarks/bench_issue14.py [--steps 8] [--eval subset:400]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval", default="subset:400")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from test_analysis_support import record_mlp
    from trajectory.analysis import analyze
    from trajectory.analysis.line import analyze_line

    with tempfile.TemporaryDirectory() as d:
        arch = record_mlp(os.path.join(d, "run.h5"), steps=args.steps, seed=0)
        cases = [("interpolation", ["interpolation"], {}), ("gradients noise=sample", ["gradients"], {}),
                 ("gradients noise=batch(32)", ["gradients"], {"noise": "batch"}),
                 ("eigen_split k=5", ["eigen_split"], {"k": 5}), ("per_layer", ["per_layer"], {})]
        rows = []
        for label, metrics, opts in cases:
            out = os.path.join(d, f"{len(rows)}.h5")
            t0 = time.perf_counter()
            analyze(arch, out, metrics=metrics, eval=args.eval, dtype=args.dtype, options=opts)
            rows.append((label, (time.perf_counter() - t0) / args.steps))
        t0 = time.perf_counter()
        analyze_line(f"{arch}:0", f"{arch}:last", eval=args.eval, dtype=args.dtype)
        rows.append(("line (21 points, 10 SE chunks)", time.perf_counter() - t0))
    base = rows[0][1]
    print(f"{'unit':34} {'s/unit':>10} {'x interpolation':>16}")
    for label, s in rows:
        print(f"{label:34} {s:10.4f} {s / base:16.1f}")
    print(f"(MLP 40-16-10, eval {args.eval}, {args.dtype}, {args.steps} pairs, 1 thread; the first rows include calibration)")


if __name__ == "__main__":
    main()
