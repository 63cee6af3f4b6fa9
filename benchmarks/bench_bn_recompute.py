"""How many training batches --bn recompute needs: spread of the loss over the choice of batches, per M.

For M recompute batches of --bn-batch samples, the running statistics are the average of M batches' statistics,
so the loss at a fixed point depends on which batches were drawn. This script evaluates one trained BatchNorm
point (a zoo mlp with BatchNorm on MNIST-1D after 60 SGD updates) on 480 samples under M = 1..64 batches of 100,
for 8 seeds of the batch draw, and prints the sd over seeds and the mean shift from M = 128 (the reference).
Used to choose DEFAULT_BN_BATCHES (docs/analysis.md). Run: python benchmarks/bench_bn_recompute.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_analysis_support import data_spec, record_mlp  # noqa: E402

from trajectory import Trajectory  # noqa: E402
from trajectory.analysis.evaluator import Evaluator  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    d = tempfile.mkdtemp()
    path = record_mlp(os.path.join(d, "bn.h5"), steps=60, lr=0.5, seed=2, batchnorm=True, every=20)
    traj = Trajectory(path)
    x, y = data_spec().build(split="train").tensors
    x = x.double()
    state = torch.cat([traj.params(len(traj) - 1), traj.buffers(len(traj) - 1)]).double().unsqueeze(0)
    model = traj.build_model()

    def loss(m: int, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        batches = [x[torch.randperm(len(x), generator=g)[:100]] for _ in range(m)]
        ev = Evaluator(model, traj.layout, dtype=torch.float64, bn="recompute", recompute_batches=batches)
        return float(ev.evaluate(state, x, y)[0][0])

    ref = np.mean([loss(128, s) for s in range(4)])
    print(f"reference (M=128, 4 draws): {ref:.5f}")
    print(f"{'M':>4} {'sd over 8 draws':>16} {'mean - ref':>12}")
    for m in (1, 4, 8, 16, 32, 64):
        v = np.array([loss(m, 100 + s) for s in range(8)])
        print(f"{m:>4} {v.std(ddof=1):>16.2e} {v.mean() - ref:>12.2e}")


if __name__ == "__main__":
    main()
