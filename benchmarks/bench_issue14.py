"""Cost of the issue-14 metrics (gradients, eigen_split, per_layer, optimizer) and of ``analyze_line`` per unit.

Prints one table: seconds per pair (per line) and the ratio to one ``interpolation`` pair at the default 21 points,
so the figures transfer between machines. Runs on the test suite's zoo MLP (40-16-10, MNIST-1D): plain SGD for
gradients, eigen_split, per_layer and the line; SGD with momentum 0.9 and Adam, optimizer state recorded, for metric
``optimizer`` (beside ``hessian_top`` k=1, and both in one run: SGD's λ_max is shared through the run's eigenpair
cache, so the pair costs about one Lanczos run, not two). Timed in wall time; on a shared machine indicative only.
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
        sgd = record_mlp(os.path.join(d, "sgd.h5"), args.steps, make_opt=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                         optimizer_state=True)
        adam = record_mlp(os.path.join(d, "adam.h5"), args.steps, make_opt=lambda ps: torch.optim.Adam(ps, lr=1e-3),
                          optimizer_state=True)
        cases = [("interpolation", arch, ["interpolation"], {}), ("gradients noise=sample", arch, ["gradients"], {}),
                 ("gradients noise=batch(32)", arch, ["gradients"], {"noise": "batch"}),
                 ("eigen_split k=5", arch, ["eigen_split"], {"k": 5}), ("per_layer", arch, ["per_layer"], {}),
                 ("optimizer, SGD momentum", sgd, ["optimizer"], {}),
                 ("optimizer, SGD, noise=batch(32)", sgd, ["optimizer"], {"noise": "batch"}),
                 ("hessian_top k=1 (SGD momentum run)", sgd, ["hessian_top"], {}),
                 ("optimizer + hessian_top (SGD)", sgd, ["optimizer", "hessian_top"], {}),
                 ("optimizer, Adam", adam, ["optimizer"], {})]
        rows = []
        for label, path, metrics, opts in cases:
            out = os.path.join(d, f"{len(rows)}.h5")
            t0 = time.perf_counter()
            analyze(path, out, metrics=metrics, eval=args.eval, dtype=args.dtype, options=opts)
            rows.append((label, (time.perf_counter() - t0) / args.steps))
        t0 = time.perf_counter()
        analyze_line(f"{arch}:0", f"{arch}:last", eval=args.eval, dtype=args.dtype)
        rows.append(("line (21 points, 10 SE chunks)", time.perf_counter() - t0))
    base = rows[0][1]
    print(f"{'unit':36} {'s/unit':>10} {'x interpolation':>16}")
    for label, s in rows:
        print(f"{label:36} {s:10.4f} {s / base:16.1f}")
    print(f"(MLP 40-16-10, eval {args.eval}, {args.dtype}, {args.steps} pairs, 1 thread; hessian_top also computes the "
          "floor it requires; every row includes its run's calibration)")


if __name__ == "__main__":
    main()
