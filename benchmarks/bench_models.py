"""Benchmark: sgdwalk's interpolation against the naive per-point loop on every model family, same work, one process.

For each model (zoo ``mlp``, ``cnn_bn`` 1-D on MNIST-1D, ``cnn`` 2-D width 32, ``preact_resnet20``, ``vgg11_bn`` and
``resnet18`` on 3x32x32 synthetic data, and the zoo ``transformer`` on MNIST-1D), a few real SGD steps give the
records; then the interpolation curves of consecutive records (11 and 21 points a pair) are computed two ways,
interleaved, best of ``--repeat``:

* naive: the authors' / loss-landscape way: per point, interpolate the state dict, ``load_state_dict``, loop a
  DataLoader (batch 100) over the samples; BatchNorm in training mode (batch statistics per batch of 100, the
  analyzer's default ``--bn train``), dropout off.
* sgdwalk: ``Evaluator.evaluate`` on the stacked interpolated state vectors with their lines, i.e. the engine's
  call, using the strategy the evaluator's calibration chose (calibration time printed apart: it is paid once
  per run).

A third way, the *floor*, runs the naive loop's forwards at one fixed state (nothing interpolated or loaded): the
time of the per-point kernels themselves, which no one-point-per-call method can go below. On one CPU thread all
three are timed in thread CPU time (a shared machine's time-slicing does not count), else in wall time.

Printed per model and point count: the times, the ratio, the achieved FLOP/s (forward FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode`` on one naive forward), their share of a dense matmul rate measured
in the same run, the chosen strategy, and the max relative difference of the losses (both must agree). Sample
counts shrink for the big models so that the whole script runs in minutes on 2 CPU cores.

    PYTHONPATH=. python benchmarks/bench_models.py [--models cnn,preact_resnet20] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _workloads import cifar_shaped, mnist1d_train, print_table  # noqa: E402
from bench_analyze import matmul_rate  # noqa: E402

from trajectory.archive.layout import BUFFERS, PARAMS, Layout  # noqa: E402
from trajectory.analysis.evaluator import Evaluator  # noqa: E402
from trajectory.zoo import models as zoo  # noqa: E402


@dataclass
class Case:
    """One model of the table: its factory, data, and the work size (CPU sizes; ``gpu_scale`` multiplies samples)."""

    factory: Callable[[], torch.nn.Module]
    data: str  # 'mnist1d' or 'cifar'
    samples: int
    pairs: int


CASES = {
    "mlp": Case(lambda: zoo.mlp(), "mnist1d", 4000, 3),
    "cnn_bn": Case(lambda: zoo.cnn_bn(), "mnist1d", 1000, 2),
    "cnn": Case(lambda: zoo.cnn(in_channels=3, input_dim=2, width=32), "cifar", 200, 1),
    "preact_resnet20": Case(lambda: zoo.preact_resnet20(), "cifar", 200, 1),
    "vgg11_bn": Case(lambda: zoo.vgg11_bn(), "cifar", 50, 1),
    "resnet18": Case(lambda: zoo.resnet18(), "cifar", 30, 1),
    "transformer": Case(lambda: zoo.transformer(), "mnist1d", 1000, 2),
}
#: set in main(): this thread's CPU time on one CPU thread (time-slicing by other processes on a shared machine
#: does not count; cache sharing still does), else wall-clock time
CLOCK = time.perf_counter
NAIVE_BATCH = 100  # the authors' evaluation batch, and the BatchNorm batch of both ways
STATE_BUDGET = 256 << 20  # bytes of stacked state vectors per evaluate() call (the engine's default)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _records(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> list[dict]:
    """State dicts before and after each of ``steps`` real SGD steps (batch 32, lr 0.05, momentum 0.9)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    out = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g, device="cpu").to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    return out


def _naive(model: torch.nn.Module, recs: list[dict], alphas, x, y) -> np.ndarray:
    """Per point: interpolate the state dict, load it, loop a DataLoader of batch 100 (BN in training mode)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=NAIVE_BATCH, shuffle=False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    out = []
    for sa, sb in zip(recs[:-1], recs[1:]):
        for a in alphas:
            model.load_state_dict({k: (sa[k] + a * (sb[k] - sa[k])) if sa[k].is_floating_point() else sa[k] for k in sa})
            model.eval()
            for m in bns:
                m.train()
            total, correct, n = 0.0, 0, 0
            with torch.no_grad():
                for xb, yb in loader:
                    logits = model(xb)
                    total += F.cross_entropy(logits, yb, reduction="sum").item()
                    correct += int((logits.argmax(1) == yb).sum())
                    n += len(yb)
            out.append(total / n)
    return np.array(out)


def _floor(model: torch.nn.Module, state: dict, n_points: int, x, y) -> None:
    """The per-point kernel floor: the naive loop's forwards (batches of 100, BN in training mode) at ONE fixed
    state, ``n_points`` times, without interpolating or loading anything. Any method that evaluates one point per
    model call runs these kernels at these batch sizes; sgdwalk beats it only by sharing work across points
    (the first layer, the bmm route) or by calling the model on larger batches."""
    loader = DataLoader(TensorDataset(x, y), batch_size=NAIVE_BATCH, shuffle=False)
    model.load_state_dict(state)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():
        for _ in range(n_points):
            for xb, yb in loader:
                F.cross_entropy(model(xb), yb, reduction="sum").item()


def _sgdwalk(ev: Evaluator, A: torch.Tensor, B: torch.Tensor, alphas, x, y) -> np.ndarray:
    """The engine's call: stacked interpolated states with their lines, in chunks of at most STATE_BUDGET bytes."""
    t_all = torch.tensor(alphas, dtype=torch.float64)
    per = max(1, int(STATE_BUDGET // (A.shape[1] * A.element_size())))
    out = []
    for p in range(A.shape[0]):
        for s in range(0, len(alphas), per):
            t = t_all[s : s + per]
            states = torch.lerp(A[p : p + 1], B[p : p + 1], t.to(A.device, A.dtype).view(-1, 1))
            loss, _ = ev.evaluate(states, x, y, lines=(A[p : p + 1], B[p : p + 1], torch.zeros(len(t), dtype=torch.long), t))
            out.append(loss)
    return np.concatenate(out)


def _flops_per_sample(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of one sample. Counted on a copy in training mode with grad enabled: the counter does not
    see inside fused inference kernels (the transformer encoder's fast path); no model here has dropout on."""
    xb = x[: min(len(x), NAIVE_BATCH)]
    m = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as fc:
        m(xb)
    return fc.get_total_flops() / len(xb)


def bench_model(name: str, dev: torch.device, repeat: int, points: list[int], scale: float) -> list[dict]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.factory().to(dev)
    n = max(2, int(case.samples * scale))
    if case.data == "mnist1d":
        xa, ya = mnist1d_train()
        x, y = xa[:n], ya[:n]
    else:
        x, y = cifar_shaped(n)
    x, y = x.to(dev), y.to(dev)
    recs = _records(model, x, y, case.pairs)
    layout = Layout.from_module(model)
    vecs = torch.stack([torch.cat([layout.flatten(r, PARAMS), layout.flatten(r, BUFFERS)]) for r in recs]).to(dev)
    A, B = vecs[:-1], vecs[1:]
    fps = _flops_per_sample(model, x)
    ev = Evaluator(model, layout, device=dev, bn="train", bn_batch=NAIVE_BATCH)
    t = time.perf_counter()
    info = ev.calibrate(x, y)
    calib = time.perf_counter() - t
    best: dict[tuple[int, str], float] = {}
    results: dict[tuple[int, str], np.ndarray] = {}
    for _ in range(repeat):  # interleaved: both ways see the same machine state
        for k in points:
            alphas = [float(a) for a in np.linspace(0, 1, k)]
            for way in ("naive", "sgdwalk", "floor"):
                _sync(dev)
                t = CLOCK()
                if way == "naive":
                    out = _naive(model, recs, alphas, x, y)
                elif way == "sgdwalk":
                    out = _sgdwalk(ev, A, B, alphas, x, y)
                else:
                    out = _floor(model, recs[0], k * case.pairs, x, y)
                _sync(dev)
                el = CLOCK() - t
                best[(k, way)] = min(best.get((k, way), float("inf")), el)
                results[(k, way)] = out
    rows = []
    for k in points:
        ref, got = results[(k, "naive")], results[(k, "sgdwalk")]
        work = case.pairs * k * n
        flops = work * fps
        tn, ts, tf = best[(k, "naive")], best[(k, "sgdwalk")], best[(k, "floor")]
        rows.append({
            "model": name, "params": sum(p.numel() for p in model.parameters()), "points": k, "pairs": case.pairs,
            "samples": n, "naive_s": tn, "sgdwalk_s": ts, "ratio": tn / ts, "floor_s": tf, "naive_over_floor": tn / tf,
            "sgdwalk_over_floor": tf / ts,
            "naive_gflops": flops / tn / 1e9, "sgdwalk_gflops": flops / ts / 1e9,
            "strategy": info["name"], "candidates": info["candidates"], "calibration_s": calib,
            "max_rel_diff": float(np.max(np.abs(got - ref) / np.abs(ref))),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--points", default="11,21")
    ap.add_argument("--repeat", type=int, default=2, help="best of N (interleaved)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU, as the targets are stated)")
    ap.add_argument("--scale", type=float, default=None, help="multiply the sample counts (default 1 on CPU, 8 on CUDA)")
    ap.add_argument("--json", default=None, help="write the table as JSON to this path")
    args = ap.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CASES]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    dev = torch.device(args.device)
    threads = args.threads or (1 if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    global CLOCK
    CLOCK = time.thread_time if (dev.type == "cpu" and torch.get_num_threads() == 1) else time.perf_counter
    scale = args.scale if args.scale is not None else (8.0 if dev.type == "cuda" else 1.0)
    points = [int(p) for p in args.points.split(",")]
    peak = matmul_rate(dev, clock=CLOCK)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"machine: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, "
          f"clock: {'thread CPU time' if CLOCK is time.thread_time else 'wall time'}")
    rows: list[dict] = []
    t0 = time.perf_counter()
    for m in names:
        t = time.perf_counter()
        rows += bench_model(m, dev, args.repeat, points, scale)
        peak = max(peak, matmul_rate(dev, clock=CLOCK))  # measured between models too: the best is the machine's rate
        r = rows[-1]
        print(f"  {m}: done in {time.perf_counter() - t:.0f} s (strategy {r['strategy']}, calibration {r['calibration_s']:.1f} s; "
              f"candidates {', '.join(f'{k} {v:.3g}/s' for k, v in r['candidates'].items())})", flush=True)
    print(f"dense float32 matmul (2048^2, best of the run): {peak / 1e9:.1f} GFLOP/s")
    for r in rows:
        r["naive_pct_matmul"] = 100 * r["naive_gflops"] * 1e9 / peak
        r["sgdwalk_pct_matmul"] = 100 * r["sgdwalk_gflops"] * 1e9 / peak
    header = ["model", "params", "points", "pairs x samples", "naive s", "sgdwalk s", "ratio", "naive GFLOP/s",
              "sgdwalk GFLOP/s", "% matmul (naive / sgdwalk)", "floor s", "naive / floor", "floor / sgdwalk", "strategy",
              "max rel diff"]
    table = [[r["model"], f"{r['params'] / 1e3:.0f}k", r["points"], f"{r['pairs']} x {r['samples']}", f"{r['naive_s']:.3f}",
              f"{r['sgdwalk_s']:.3f}", f"{r['ratio']:.2f}x", f"{r['naive_gflops']:.1f}", f"{r['sgdwalk_gflops']:.1f}",
              f"{r['naive_pct_matmul']:.0f}% / {r['sgdwalk_pct_matmul']:.0f}%", f"{r['floor_s']:.3f}",
              f"{r['naive_over_floor']:.2f}", f"{r['sgdwalk_over_floor']:.2f}", r["strategy"], f"{r['max_rel_diff']:.1e}"]
             for r in rows]
    print_table(f"sgdwalk interpolation vs naive loop ({time.perf_counter() - t0:.0f} s)", header, table)
    ok = all(r["max_rel_diff"] < 1e-4 for r in rows)
    print("numbers agree (max relative difference < 1e-4):", "yes" if ok else "NO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "machine": name, "threads": torch.get_num_threads(), "matmul_flops": peak,
                       "rows": rows}, f, indent=1)
    print("floor: the same forwards at one fixed state (no interpolation, no state loading): naive / floor is the part of "
          "the naive loop that any one-point-per-call method can remove; floor / sgdwalk > 1 means sgdwalk beats the "
          "per-point kernels themselves (shared work across points, larger calls)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
