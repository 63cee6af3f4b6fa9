"""Benchmark: distributed analysis with torchrun, 1 process against N processes, on the same work.

Work: the default metrics (interpolation, floor, geometry, barriers span 1) on every pair of an archive
(default: the shipped sample, 300 pairs of an MNIST-1D MLP, 2,000 evaluation samples), float32. Each
configuration is a fresh ``torchrun --standalone --nproc-per-node P`` launch of this script's worker mode,
which calls :func:`trajectory.analysis.analyze` (the code path of ``torchrun -m trajectory.cli analyze``)
into a new results file; the configurations run one after another, interleaved over ``--repeat`` rounds,
and the best round counts.

Reported per configuration: the analysis time on rank 0 (from the start of ``analyze`` to the merged
results file, excluding interpreter and torch start-up), pairs/s, the speed-up over 1 process with the
same threads per process, and the whole launch's wall time. On a CPU-only machine the natural baseline is
also one process using every core through intra-op threads, so that row is printed too.

``--metric hessian_top --curvature-split data`` measures data-parallel curvature instead (every rank works
on every unit; each Hessian-vector product is all-reduced).

    PYTHONPATH=. python benchmarks/bench_distributed.py [--archive A] [--procs 1,2] [--threads 1] [--repeat 3]
    PYTHONPATH=. python benchmarks/bench_distributed.py --device cuda --procs 1,2,4,8     # a multi-GPU node
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun launch: analyze, then rank 0 prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from trajectory.analysis import analyze

    opts = json.loads(args.options) if args.options else None
    t = time.perf_counter()
    rep = analyze(args.archive, args.out, metrics=args.metric.split(",") if args.metric else None, steps=args.steps,
                  eval=args.eval, device=args.device, curvature_split=args.curvature_split, options=opts,
                  flush_seconds=30.0)
    seconds = time.perf_counter() - t
    if rep.rank == 0:
        pairs = len({k[0] for t_ in rep.tables.values() for k in t_.rows})
        print("RESULT " + json.dumps({"seconds": seconds, "pairs": pairs, "world": rep.world_size,
                                      "rows": sum(rep.computed.values()),
                                      "per_rank": [sum(c.values()) for c in rep.rank_computed] or [sum(rep.computed.values())]}))


def launch(args: argparse.Namespace, procs: int, threads: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           os.path.abspath(__file__), "--worker", "--archive", args.archive, "--out", out, "--threads", str(threads),
           "--eval", args.eval, "--curvature-split", args.curvature_split]
    for flag in ("metric", "steps", "device", "options"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"torchrun failed ({procs} procs):\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    r["wall"] = wall
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--archive", default=os.path.join(ROOT, "sample_data", "mnist1d_mlp.h5"))
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--procs", default="1,2", help="process counts to compare (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--eval", default="subset:2000")
    ap.add_argument("--metric", default=None)
    ap.add_argument("--steps", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--options", default=None, help="metric options as JSON")
    ap.add_argument("--curvature-split", default="pairs", choices=["pairs", "data"])
    ap.add_argument("--no-threads-baseline", action="store_true", help="skip the 1 process x all cores row")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from _workloads import print_table

    procs = [int(p) for p in args.procs.split(",")]
    configs = [(p, args.threads) for p in procs]
    cores = os.cpu_count() or 1
    if not args.no_threads_baseline and (args.device or "cpu") == "cpu" and not torch.cuda.is_available() and args.threads < cores:
        configs.append((1, cores))
    best: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeat):
            for p, th in configs:
                out = os.path.join(tmp, f"r{rnd}-{p}x{th}.results.h5")
                r = launch(args, p, th, out)
                print(f"round {rnd + 1}: {p} proc x {th} thread(s): {r['seconds']:.2f} s analysis, {r['wall']:.1f} s wall, "
                      f"rows per rank {r['per_rank']}", flush=True)
                if (p, th) not in best or r["seconds"] < best[(p, th)]["seconds"]:
                    best[(p, th)] = r
    base = {th: best[(1, th)]["seconds"] for (p, th) in best if p == 1}
    rows = []
    for (p, th), r in best.items():
        speed = base[th] / r["seconds"] if th in base else float("nan")
        rows.append([f"{p} x {th}", r["pairs"], f"{r['seconds']:.2f}", f"{r['pairs'] / r['seconds']:.1f}", f"{speed:.2f}x",
                     f"{r['wall']:.1f}", "+".join(map(str, r["per_rank"]))])
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print_table(f"Distributed analysis on {dev}: {os.path.basename(args.archive)}, metrics {args.metric or 'default'}, "
                f"eval {args.eval}, curvature split {args.curvature_split}; best of {args.repeat}",
                ["procs x threads", "pairs", "analysis s", "pairs/s", "vs 1 proc", "launch wall s", "rows per rank"], rows)


if __name__ == "__main__":
    main()
