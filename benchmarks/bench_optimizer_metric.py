"""Cost of metric ``optimizer`` (issue 14 item 5) per pair on a small MLP, for SGD with momentum and for Adam.

Prints one table: seconds per pair and the ratio to one ``interpolation`` pair at the default 21 points (so the
figures transfer between machines), plus ``hessian_top`` k=1 for comparison and ``optimizer`` + ``hessian_top`` in
one run (SGD's λ_max is shared through the run's eigenpair cache, so the pair costs about one Lanczos run, not
two). Timings on a shared machine are indicative only (the lead re-measures).
Run: python benchmarks/bench_optimizer_metric.py [--steps 8] [--eval subset:400]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def record(path: str, make_opt, steps: int, seed: int = 0) -> str:
    """The test suite's zoo MLP (40-16-10, MNIST-1D) trained by ``make_opt``, optimizer state recorded."""
    from test_analysis_support import record_mlp

    return record_mlp(path, steps, seed=seed, make_opt=make_opt, optimizer_state=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval", default="subset:400")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from trajectory.analysis import analyze

    with tempfile.TemporaryDirectory() as d:
        sgd = record(os.path.join(d, "sgd.h5"), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), args.steps)
        adam = record(os.path.join(d, "adam.h5"), lambda ps: torch.optim.Adam(ps, lr=1e-3), args.steps)
        cases = [("interpolation (SGD run)", sgd, ["interpolation"], {}),
                 ("optimizer, SGD momentum", sgd, ["optimizer"], {}),
                 ("optimizer, SGD, noise=batch(32)", sgd, ["optimizer"], {"noise": "batch"}),
                 ("hessian_top k=1 (SGD run)", sgd, ["hessian_top"], {}),
                 ("optimizer + hessian_top (SGD)", sgd, ["optimizer", "hessian_top"], {}),
                 ("optimizer, Adam", adam, ["optimizer"], {})]
        rows = []
        for label, arch, metrics, opts in cases:
            out = os.path.join(d, f"{len(rows)}.h5")
            t0 = time.perf_counter()
            analyze(arch, out, metrics=metrics, eval=args.eval, dtype=args.dtype, options=opts)
            rows.append((label, (time.perf_counter() - t0) / args.steps))
    base = rows[0][1]
    print(f"{'unit':34} {'s/pair':>10} {'x interpolation':>16}")
    for label, s in rows:
        print(f"{label:34} {s:10.4f} {s / base:16.1f}")
    print(f"(MLP 40-16-10, eval {args.eval}, {args.dtype}, {args.steps} pairs, 1 thread; hessian_top also computes the "
          "floor it requires; the first rows include calibration)")


if __name__ == "__main__":
    main()
