"""Benchmark: the cost of one Hessian-vector product relative to one gradient, and the time to the top eigenvalue.

Models: the MNIST-1D MLP (zoo ``mlp()``, 40-100-100-10) and a CNN of ~1.5 M parameters
(zoo ``cnn(in_channels=3, input_dim=2, width=128)``) on CIFAR-shaped synthetic data (zoo ``synthetic``).
All on the same evaluation data, in one process, on ``--device`` (default: CUDA when available):

* gradient:      ``Objective.loss_grad`` (one forward + backward per data batch, size-weighted sum).
* hvp fwd:       ``Objective.hvp`` forward-over-reverse (torch.func jvp of grad), per data batch.
* hvp rev:       ``Objective.hvp`` with ``hvp="rev"`` (double backprop inside sgdwalk's batching).
* hvp fwd x8:    8 vectors in one vmap pass (``Objective.hvp_many``), per vector.
* naive:         double backprop with ``torch.autograd.grad(create_graph=True)`` on the nn.Module itself,
                 per batch in a Python loop (what PyHessian-style code does).
* top λ:         ``top_eigen`` (Lanczos, full reorthogonalisation, k=1, tol 1e-3 relative residual).

It checks that sgdwalk's HVP equals the naive one and prints the ratios.

    PYTHONPATH=. python benchmarks/bench_curvature.py [--device cpu] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from trajectory.analysis.curvature import Objective, top_eigen
from trajectory.zoo.data import mnist1d, synthetic
from trajectory.zoo.models import cnn, mlp


def timeit(fn, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def naive_hvp(model, x, y, v_list, batch: int):
    """Double backprop per batch in a Python loop on the module's own parameters."""
    params = [p for p in model.parameters()]
    out = [torch.zeros_like(p) for p in params]
    n = len(x)
    for s in range(0, n, batch):
        xb, yb = x[s : s + batch], y[s : s + batch]
        loss = F.cross_entropy(model(xb), yb)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=v_list)
        for o, h in zip(out, hv):
            o.add_(h, alpha=len(xb) / n)
    return torch.cat([o.reshape(-1) for o in out])


def bench(name, model, x, y, batch, device, reps, lanczos_iters):
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    obj, p = Objective.from_model(model, x, y, chunk=batch, hvp="fwd")
    obj_rev, _ = Objective.from_model(model, x, y, chunk=batch, hvp="rev")
    n = p.numel()
    g = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=g).to(device, p.dtype)
    V8 = torch.randn(8, n, generator=g).to(device, p.dtype)
    v_list, pos = [], 0
    for q in model.parameters():
        v_list.append(v[pos : pos + q.numel()].view_as(q))
        pos += q.numel()
    ref = naive_hvp(model, x, y, v_list, batch)
    mine = obj.hvp(p, v)
    err = float((mine - ref).norm() / ref.norm())
    t_grad = timeit(lambda: obj.loss_grad(p), reps, sync)
    t_fwd = timeit(lambda: obj.hvp(p, v), reps, sync)
    t_rev = timeit(lambda: obj_rev.hvp(p, v), reps, sync)
    t_fwd8 = timeit(lambda: obj.hvp_many(p, V8), max(1, reps // 2), sync) / 8
    t_naive = timeit(lambda: naive_hvp(model, x, y, v_list, batch), reps, sync)
    best = min(t_fwd, t_rev, t_fwd8)
    t0 = time.perf_counter()
    mode = "fwd" if min(t_fwd, t_fwd8) <= t_rev else "rev"
    o = obj if mode == "fwd" else obj_rev
    r = top_eigen(o.matmat(p), n, 1, iters=lanczos_iters, tol=1e-3, gen=torch.Generator().manual_seed(0), like=p)
    sync()
    t_top = time.perf_counter() - t0
    print(f"\n{name}: {n:,} parameters, {len(x)} samples in batches of {batch}, {p.dtype}, {device}")
    print(f"  sgdwalk HVP vs naive double backprop: relative difference {err:.1e}")
    print(f"  gradient           {t_grad * 1e3:9.2f} ms")
    for label, t in (("hvp fwd (jvp∘grad)", t_fwd), ("hvp rev (2x backprop)", t_rev), ("hvp fwd x8, per vec", t_fwd8),
                     ("naive loop", t_naive)):
        print(f"  {label:21s}{t * 1e3:9.2f} ms  = {t / t_grad:5.2f} gradients")
    print(f"  naive / best sgdwalk HVP: {t_naive / best:.2f}x")
    print(f"  top eigenvalue ({mode}): λ_max={r.values[0]:.5g}, residual {r.residuals[0]:.1e}, {r.iters} Lanczos steps,"
          f" {r.matvecs} HVPs, {t_top:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer repetitions")
    ap.add_argument("--skip-cnn", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}")
    reps = 2 if args.quick else 5
    torch.manual_seed(0)
    x, y = mnist1d(split="train", num_samples=5000).tensors
    n_mlp = 1000 if args.quick else 4000
    bench("MNIST-1D MLP 40-100-100-10", mlp(), x[:n_mlp].float(), y[:n_mlp], 500, device, reps, 60)
    if not args.skip_cnn:
        big = device.type == "cuda"
        ds = synthetic(split="train", num_samples=1024 if big else (64 if args.quick else 128))
        xc, yc = ds.tensors
        bench("CNN width 128 (CIFAR-shaped)", cnn(in_channels=3, input_dim=2, width=128), xc.float(), yc,
              256 if big else 32, device, max(1, reps // 2) if not big else reps, 60 if big else (10 if args.quick else 80))


if __name__ == "__main__":
    main()
