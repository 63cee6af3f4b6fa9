"""Benchmark: sgdwalk's batched replay against the naive point-by-point loop, on the same work, in one process.

Work: interpolation curves of consecutive records of an MNIST-1D MLP archive (default 12 pairs, 21 points,
the 4,000 training samples), float32, CPU unless --device says otherwise.

* naive: the loss-landscape / authors' way: for every point, interpolate the state dict, load_state_dict,
  and loop a DataLoader (batch 100, as the authors) over the evaluation set.
* sgdwalk (engine): ``Evaluator.evaluate`` on the stacked state vectors (all points of all pairs per pass).
* sgdwalk (end to end): ``analyze(..., metrics=["interpolation"])``: archive reads, prefetch, evaluation and
  the results file.

It checks that the numbers agree, prints the speed-up and the achieved FLOP/s (2·N·Σ(Linear weights) per
point: the forward matmuls) next to the machine's dense float32 matmul rate (torch.matmul, 2048²).

    PYTHONPATH=. python benchmarks/bench_analyze.py [--pairs 12] [--samples 4000] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trajectory import Recorder, Trajectory
from trajectory.analysis import analyze
from trajectory.analysis.data import subset_indices
from trajectory.analysis.evaluator import Evaluator
from trajectory.specs import Spec


def matmul_rate(device: torch.device, n: int = 2048, repeat: int = 5, clock=None) -> float:
    """Dense float32 matmul FLOP/s, best of ``repeat``; ``clock`` (default wall time) as the caller times its work."""
    clock = clock or time.perf_counter
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t)
    return 2 * n**3 / best


def make_archive(path: str, pairs: int, hidden: list[int], seed: int = 0) -> None:
    torch.manual_seed(seed)
    ms = Spec("trajectory.zoo.models:mlp", {"hidden": hidden})
    ds = Spec("trajectory.zoo.data:mnist1d", {})
    model = ms.build()
    x, y = ds.build(split="train").tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    with Recorder(path, model, optimizer=opt, model_spec=ms, data_spec=ds) as rec:
        for _ in range(pairs):
            idx = torch.randint(0, len(x), (100,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(batch_indices=idx)


def naive(traj: Trajectory, alphas, x, y, batch: int) -> np.ndarray:
    model = traj.build_model()
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    out = []
    for i in range(len(traj) - 1):
        sa, sb = traj.state_dict(i), traj.state_dict(i + 1)
        curve = []
        for a in alphas:
            model.load_state_dict({k: (sa[k] + a * (sb[k] - sa[k])) if sa[k].is_floating_point() else sa[k] for k in sa})
            total, correct, n = 0.0, 0, 0
            with torch.no_grad():  # loss and accuracy, the same work as the engine
                for xb, yb in loader:
                    logits = model(xb)
                    total += F.cross_entropy(logits, yb, reduction="sum").item()
                    correct += int((logits.argmax(1) == yb).sum())
                    n += len(yb)
            curve.append(total / n)
        out.append(curve)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--points", type=int, default=21)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--hidden", default="100,100")
    ap.add_argument("--naive-batch", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the fast paths")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    hidden = [int(h) for h in args.hidden.split(",")]
    alphas = [float(a) for a in np.linspace(0, 1, args.points)]
    tmp = tempfile.mkdtemp(prefix="sgdwalk-bench-")
    path = os.path.join(tmp, "bench.h5")
    make_archive(path, args.pairs, hidden)
    traj = Trajectory(path)
    xa, ya = traj.build_dataset("train").tensors
    idx = torch.as_tensor(subset_indices(len(xa), args.samples, 0))
    x, y = xa[idx], ya[idx]
    n_points = args.pairs * args.points
    flops_point = 2 * len(x) * sum(e.numel for e in traj.layout.entries if e.name.endswith("weight"))
    total_flops = flops_point * n_points
    peak = matmul_rate(dev)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}")
    print(f"dense float32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    print(f"work: {args.pairs} pairs x {args.points} points x {len(x)} samples, MLP 40-{'-'.join(map(str, hidden))}-10 "
          f"({traj.n_params} params), {total_flops / 1e9:.1f} GFLOP")

    t = time.perf_counter()
    ref = naive(traj, alphas, x, y, args.naive_batch)
    t_naive = time.perf_counter() - t
    print(f"naive loop (load_state_dict + DataLoader batch {args.naive_batch}): {t_naive:8.3f} s  {total_flops / t_naive / 1e9:6.2f} GFLOP/s")

    ev = Evaluator(traj.build_model(), traj.layout, device=dev)
    rec = [torch.cat([traj.params(i), traj.buffers(i)]).to(dev) for i in range(args.pairs + 1)]
    A, B = torch.stack(rec[:-1]), torch.stack(rec[1:])
    t_all = torch.tensor(alphas).repeat(args.pairs)
    owner = torch.arange(args.pairs).repeat_interleave(len(alphas))
    xd, yd = x.to(dev), y.to(dev)
    best = float("inf")
    for _ in range(args.repeat + 1):
        t = time.perf_counter()
        states = torch.lerp(A[owner], B[owner], t_all.to(dev).view(-1, 1))
        loss, _ = ev.evaluate(states, xd, yd, lines=(A, B, owner, t_all))
        best = min(best, time.perf_counter() - t)
    t_engine = best
    err_engine = float(np.max(np.abs(loss.reshape(args.pairs, -1) - ref) / np.abs(ref)))
    print(f"sgdwalk engine (batched, {'bmm MLP path' if ev._plan else 'vmap'}):   {t_engine:8.3f} s  {total_flops / t_engine / 1e9:6.2f} GFLOP/s "
          f"= {100 * total_flops / t_engine / peak:.0f}% of matmul   speed-up {t_naive / t_engine:6.1f}x   max rel diff {err_engine:.1e}")

    best = float("inf")
    for r in range(args.repeat + 1):
        out = os.path.join(tmp, f"bench.{r}.results.h5")
        t = time.perf_counter()
        rep = analyze(path, out, metrics=["interpolation"], eval=f"subset:{args.samples}", alphas=alphas, device=dev, bn="eval")
        best = min(best, time.perf_counter() - t)
    t_e2e = best
    (table,) = rep.tables.values()
    got = np.stack([table.rows[(i,)]["loss"] for i in range(args.pairs)])
    err_e2e = float(np.max(np.abs(got - ref) / np.abs(ref)))
    print(f"sgdwalk analyze() end to end:             {t_e2e:8.3f} s  {total_flops / t_e2e / 1e9:6.2f} GFLOP/s "
          f"= {100 * total_flops / t_e2e / peak:.0f}% of matmul   speed-up {t_naive / t_e2e:6.1f}x   max rel diff {err_e2e:.1e}")
    ok = err_engine < 1e-4 and err_e2e < 1e-4
    print("numbers agree (max relative difference < 1e-4):", "yes" if ok else "NO")
    traj.close()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
