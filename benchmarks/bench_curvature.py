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

Conv nets (zoo ``cnn_bn`` on MNIST-1D and ``preact_resnet20`` on synthetic 3x32x32 data, BatchNorm 'eval'):

* rev / rev+keep / fwd per chunk size: one HVP over all samples per (mode, chunk), the time ``hvp=auto`` measures
  from, and the choice ``autotune.measure`` makes (timed on one chunk, as in a run); ``rev+keep`` is a further
  product at the same point through kept gradient graphs (``Objective.keeps_graph``), what Lanczos pays per step;
* other candidates: the gradient by ``torch.func.grad`` (what ``loss_grad`` uses) against ``torch.autograd.grad``,
  and channels-last memory format for the 2-D ResNet.

One run vs two (the acceptance case of issue 10): ``analyze`` of a small ``cnn_bn`` archive with
``hessian_top`` and ``sharpness`` together, against each alone; HVPs counted through ``Objective.hvp_many``.
Together they must cost one Lanczos per pair, not two.

    PYTHONPATH=. python benchmarks/bench_curvature.py [--device cpu|cuda] [--threads N] [--quick]
        [--skip-cnn] [--skip-conv] [--skip-one-run]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from trajectory.analysis.curvature import Objective, top_eigen
from trajectory.analysis.curvature.autotune import measure
from trajectory.zoo.data import mnist1d, synthetic
from trajectory.zoo.models import cnn, cnn_bn, mlp, preact_resnet20


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


def bench_conv(name, model, x, y, device, reps, chunks):
    """rev/fwd HVP per chunk, the autotune choice, func.grad vs autograd.grad, channels-last (4-D inputs)."""
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    obj, p = Objective.from_model(model, x, y, bn="eval")
    n = p.numel()
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device, p.dtype)
    print(f"\n{name}: {n:,} parameters, {len(x)} samples of {tuple(x.shape[1:])}, {p.dtype}, {device}; "
          f"memory-budget chunk {obj.default_chunk()}")
    print(f"  {'mode':9s} {'chunk':>6s} {'ms / HVP':>10s} {'samples/s':>10s}   (rev+keep: gradient graphs kept between"
          f" products at one point, {'fits' if obj.keeps_graph else 'does NOT fit'} the budget here)")
    ref = None
    for mode, keep in (("rev", False), ("rev", True), ("fwd", None)):
        for c in chunks:
            o, _ = Objective.from_model(model, x, y, bn="eval", hvp=mode, chunk=c, keep_graph=keep)
            hv = o.hvp(p, v)
            ref = hv if ref is None else ref
            err = float((hv - ref).norm() / ref.norm())
            t = timeit(lambda: o.hvp(p, v), reps, sync)
            label = mode + ("+keep" if keep else "")
            print(f"  {label:9s} {c:6d} {t * 1e3:10.1f} {len(x) / t:10.0f}   (rel. diff to rev/{chunks[0]}: {err:.1e})")
            o.release()
    t0 = time.perf_counter()
    ch = measure(obj, p)
    sync()
    print(f"  auto: {ch['hvp']} chunk {ch['chunk']} ({ch['samples_per_s']:.0f} samples/s on one chunk;"
          f" timing took {time.perf_counter() - t0:.2f} s)")
    print("    " + ", ".join(f"{k} {r:.0f}/s" for k, r in ch["rates"].items()))
    # gradient: torch.func.grad (loss_grad) against torch.autograd.grad on the same batches
    q0 = p.clone().requires_grad_(True)

    def autograd_grad():
        g = torch.zeros_like(p)
        for s, e in obj.batches:
            g.add_(torch.autograd.grad(obj._batch_loss(q0, s, e), q0)[0], alpha=obj._w(s, e))
        return g

    t_func = timeit(lambda: obj.loss_grad(p), reps, sync)
    t_auto = timeit(autograd_grad, reps, sync)
    print(f"  gradient: torch.func.grad {t_func * 1e3:.1f} ms, torch.autograd.grad {t_auto * 1e3:.1f} ms")
    if x.dim() == 4:
        mcl = model.to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        ocl, pcl = Objective.from_model(mcl, xcl, y, bn="eval", hvp=ch["hvp"], chunk=ch["chunk"])
        ocl.model = ocl.model.to(memory_format=torch.channels_last)
        ob, _ = Objective.from_model(model.to(memory_format=torch.contiguous_format), x, y, bn="eval", hvp=ch["hvp"],
                                     chunk=ch["chunk"])
        t_cl = timeit(lambda: ocl.hvp(pcl, v), reps, sync)
        t_cf = timeit(lambda: ob.hvp(p, v), reps, sync)
        err = float((ocl.hvp(pcl, v) - ob.hvp(p, v)).norm() / ob.hvp(p, v).norm())
        print(f"  channels-last ({ch['hvp']}, chunk {ch['chunk']}): {t_cl * 1e3:.1f} ms vs contiguous {t_cf * 1e3:.1f} ms"
              f" = {t_cf / t_cl:.2f}x (rel. diff {err:.1e})")


def bench_one_run(device, quick):
    """sharpness + hessian_top in one analyze() run against each alone: HVPs and seconds."""
    import os
    import tempfile

    from trajectory import Recorder
    from trajectory.analysis import analyze
    from trajectory.specs import Spec

    tmp = tempfile.mkdtemp(prefix="bench_curv_")
    path = os.path.join(tmp, "cnn_bn.h5")
    torch.manual_seed(0)
    mspec = Spec("trajectory.zoo.models:cnn_bn", {"width": 8})
    dspec = Spec("trajectory.zoo.data:mnist1d", {"num_samples": 1000})
    model = mspec.build()
    x, y = dspec.build(split="train").tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    pairs = 2 if quick else 4
    with Recorder(path, model, optimizer=opt, model_spec=mspec, data_spec=dspec) as rec:
        for _ in range(pairs):
            idx = torch.randint(0, len(x), (32,), generator=g)
            model.train()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(batch_indices=idx, loss=loss.detach())
    count = [0]
    orig = Objective.hvp_many

    def counted(self, p, V):
        count[0] += V.shape[0]
        return orig(self, p, V)

    Objective.hvp_many = counted
    opts = {"iters": 40 if quick else 100, "ascent_steps": 2, "noise_draws": 2}
    print(f"\nsharpness + hessian_top, zoo cnn_bn width 8 ({sum(q.numel() for q in model.parameters()):,} parameters),"
          f" {pairs} pairs, eval subset:256, bn eval, {device}")
    print(f"  {'metrics':28s} {'HVPs':>6s} {'seconds':>8s}")
    res = {}
    try:
        for label, metrics in (("hessian_top", ["hessian_top"]), ("sharpness", ["sharpness"]),
                               ("hessian_top + sharpness", ["hessian_top", "sharpness"])):
            count[0] = 0
            known = {k for m in metrics for k in __import__("trajectory.analysis.metric", fromlist=["get_metric"]).get_metric(m).defaults}
            # time the curvature only: floor (a dependency of both) is computed into the file first
            out = os.path.join(tmp, label.replace(" + ", "_") + ".h5")
            analyze(path, out, metrics=["floor"], eval="subset:256", bn="eval", device=device)
            t = time.perf_counter()
            analyze(path, out, metrics=metrics, eval="subset:256", bn="eval", device=device,
                    options={k: v for k, v in opts.items() if k in known})
            res[label] = (count[0], time.perf_counter() - t)
            print(f"  {label:28s} {count[0]:6d} {res[label][1]:8.2f}")
    finally:
        Objective.hvp_many = orig
    sep = res["hessian_top"][0] + res["sharpness"][0]
    both = res["hessian_top + sharpness"][0]
    print(f"  separate runs: {sep} HVPs; one run: {both} HVPs ({'one Lanczos per pair' if both == res['hessian_top'][0] else 'NOT shared'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer repetitions")
    ap.add_argument("--skip-cnn", action="store_true", help="skip the 1.5 M-parameter CNN of the HVP-vs-naive table")
    ap.add_argument("--skip-conv", action="store_true", help="skip the rev/fwd/auto table on cnn_bn and preact_resnet20")
    ap.add_argument("--skip-one-run", action="store_true", help="skip sharpness + hessian_top in one run vs two")
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
    if not args.skip_conv:
        big = device.type == "cuda"
        n1 = (2000 if args.quick else 4000) if big else (256 if args.quick else 1000)
        bench_conv("zoo cnn_bn (MNIST-1D, 1 x 40)", cnn_bn(), x[:n1].float(), y[:n1], device, reps,
                   [c for c in (64, 256, 1024, 4000) if c <= n1] + ([n1] if n1 not in (64, 256, 1024, 4000) else []))
        ds = synthetic(split="train", num_samples=(512 if args.quick else 1024) if big else (32 if args.quick else 128))
        xc, yc = ds.tensors
        bench_conv("zoo preact_resnet20 (synthetic 3 x 32 x 32)", preact_resnet20(), xc.float(), yc, device,
                   max(1, reps // 2), [c for c in (16, 64, 256, 1024) if c <= len(xc)])
    if not args.skip_one_run:
        bench_one_run(device, args.quick)


if __name__ == "__main__":
    main()
