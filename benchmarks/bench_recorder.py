#!/usr/bin/env python
"""Recorder overhead: the same SGD training run with and without ``Recorder`` recording every step.

For each model (the MNIST-1D MLP 40-100-100-10 at batch 64, and a 1.48 M-parameter CNN on
CIFAR-shaped generated data at batch 64) and each torch thread count (2 and 1), the script runs
alternating trials - baseline, recorder, recorder, baseline, ... (ABBA order, so drift cancels) -
from the same initial weights over the same minibatches, in one process. A trial is real training
steps: forward, cross-entropy, backward, ``SGD.step()``; the recorder trial adds
``rec.record(idx, loss=loss)`` after each step (batch indices, loss and lr are stored too, as in
the README's usage) and records every step with the default codec.

Reported per configuration: median over trials of the mean step time, baseline vs recorder.
``loop`` times the training loop only; ``+close`` also counts ``rec.close()`` (the writer drains
its queue and writes the last partial chunk), i.e. the time until every record is on disk.
Recorder construction (file creation, the step-0 record) is a one-off and is reported apart.

    python benchmarks/bench_recorder.py            # full run, ~3 minutes on 2 cores
    python benchmarks/bench_recorder.py --quick    # smoke run, < 30 s
    python benchmarks/bench_recorder.py --codec xor-blosc-lz4-bit --models mlp --threads 1
    python benchmarks/bench_recorder.py --optimizer-state   # params alone vs params + optimizer state

``--optimizer-state`` (issue 14 item 5) trains with SGD(momentum=0.9) and with Adam instead of plain SGD and
times three variants in the same ABBA rounds: no recording, ``Recorder`` (params), and
``Recorder(optimizer_state=True)`` (params + the momentum buffer: 1 extra params-sized row per record; Adam's
``exp_avg`` and ``exp_avg_sq``: 2 extra rows). The table gives each variant's step time relative to training
without recording and the extra milliseconds per step the optimizer state costs.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trajectory import Recorder  # noqa: E402
from trajectory.archive import codecs as codecs_mod  # noqa: E402

GOAL = 1.05


# ---------------------------------------------------------------------------------- models and data
from _workloads import cifar_shaped, make_cnn, make_mlp, mnist1d_train, print_table  # noqa: E402  (shared with the other benchmarks)


# ---------------------------------------------------------------------------------- shared-machine guard
def foreign_cpu_s() -> float | None:
    """CPU seconds used so far by everything on this machine except this process (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(vals[:8]) - vals[3] - vals[4]  # all but idle and iowait (guest time is inside user)
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - (t.user + t.system)


# ---------------------------------------------------------------------------------- one trial
class Setup:
    def __init__(self, name: str, model: torch.nn.Module, x, y, *, lr: float, batch: int, steps: int, optimizer: str = "sgd"):
        self.name, self.model, self.x, self.y, self.lr = name, model, x, y, lr
        self.optimizer = optimizer
        self.init = {k: v.clone() for k, v in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(1)
        self.batches, perm, pos = [], torch.randperm(len(x), generator=g), 0
        for _ in range(steps):
            if pos + batch > len(x):
                perm, pos = torch.randperm(len(x), generator=g), 0
            self.batches.append(perm[pos : pos + batch])
            pos += batch


def load_recorder_class(path: str):
    """``Recorder`` from another copy of trajectory/recorder.py (e.g. ``git show HEAD:trajectory/recorder.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trajectory._bench_old_recorder", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its relative imports resolve against the installed package
    spec.loader.exec_module(module)
    return module.Recorder


OPTIMIZERS = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "sgd-momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr * 0.01),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer per trial, so every trial starts from the same (empty) state."""
    return OPTIMIZERS[name](params, lr)


def trial(s: Setup, recorder, path: str, opts: dict, steps: int | None = None) -> tuple[float, float, float]:
    """Seconds per step (loop only, loop + close) and the recorder's construction seconds.

    ``recorder`` is a Recorder class, or None for the baseline (no recording).
    """
    s.model.load_state_dict(s.init)
    opt = make_optimizer(s.optimizer, s.model.parameters(), s.lr)
    batches = s.batches if steps is None else s.batches[:steps]
    model, x, y = s.model, s.x, s.y
    gc.collect()
    t_make = time.perf_counter()
    rec = recorder(path, model, optimizer=opt, mode="w", **opts) if recorder is not None else None
    t0 = time.perf_counter()
    if rec is None:
        for idx in batches:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        for idx in batches:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.record(idx, loss=loss)
    t1 = time.perf_counter()
    if rec is not None:
        rec.close()
        os.remove(path)
    t2 = time.perf_counter()
    n = len(batches)
    return (t1 - t0) / n, (t2 - t0) / n, t0 - t_make


def clean_trial(s: Setup, recorder, path: str, opts: dict, max_foreign: float, retries: int, log: list):
    """Run a trial; repeat it (up to ``retries`` times) while other processes took more than
    ``max_foreign`` of one core during it. Appends (foreign CPU share, repeats) of the kept run to
    ``log``; returns (result, clean)."""
    for attempt in range(retries + 1):
        f0, t0 = foreign_cpu_s(), time.perf_counter()
        result = trial(s, recorder, path, opts)
        f1, t1 = foreign_cpu_s(), time.perf_counter()
        share = (f1 - f0) / (t1 - t0) if f0 is not None and f1 is not None else 0.0
        if share <= max_foreign or attempt == retries:
            log.append((share, attempt))
            return result, share <= max_foreign


def compare(s: Setup, threads: int, trials: int, variants: dict, opts: dict, tmp: str, max_foreign: float,
            retries: int) -> dict:
    """Median step times of each variant over ``trials`` rounds; the order flips every round (ABBA)."""
    torch.set_num_threads(threads)
    path = os.path.join(tmp, f"{s.name}.h5")
    warm = max(1, len(s.batches) // 10)
    for recorder in variants.values():  # warm up allocator, kernels, file system
        trial(s, recorder, path, opts, warm)
    runs: dict[str, list] = {name: [] for name in variants}
    log: list = []
    names = list(variants)
    for t in range(trials):
        for name in names if t % 2 == 0 else names[::-1]:
            runs[name].append(clean_trial(s, variants[name], path, opts, max_foreign, retries, log))
    # medians over the trials no other process disturbed (all trials if fewer than two are clean)
    n_clean = min(sum(ok for _, ok in runs[name]) for name in names)
    keep = {name: [r for r, ok in runs[name] if ok or n_clean < 2] for name in names}
    base = [r[0] for r in keep["base"]]
    b = statistics.median(base)
    out = {"base": b, "spread": (max(base) - min(base)) / b, "clean": n_clean,
           "foreign": max(sh for sh, _ in log), "retried": sum(a for _, a in log)}
    for name in names[1:]:
        out[name] = {
            "loop": statistics.median(r[0] for r in keep[name]),
            "all": statistics.median(r[1] for r in keep[name]),
            "make": statistics.median(r[2] for r in keep[name]),
            "pairs": [r[0] / x[0] for (r, ok), (x, okx) in zip(runs[name], runs["base"]) if ok and okx] or
                     [r[0] / x[0] for (r, _), (x, _) in zip(runs[name], runs["base"])],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    ap.add_argument("--trials", type=int, default=None, help="trials per variant (default 5, quick 2)")
    ap.add_argument("--threads", default="2,1", help="torch intra-op thread counts to measure (default 2,1)")
    ap.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both (default)")
    ap.add_argument("--codec", default=None, help="archive codec (default: trajectory's DEFAULT_CODEC)")
    ap.add_argument("--schedule", default="every", help="recording schedule (default: every step)")
    ap.add_argument("--mlp-steps", type=int, default=None, help="steps per MLP trial (default 3000, quick 400)")
    ap.add_argument("--cnn-steps", type=int, default=None, help="steps per CNN trial (default 24 = 3 chunks, quick 3)")
    ap.add_argument("--old-recorder", default=None, metavar="PATH",
                    help="also time the Recorder of another recorder.py (e.g. from `git show HEAD:trajectory/recorder.py`)")
    ap.add_argument("--optimizer-state", action="store_true",
                    help="compare params alone with params + optimizer state (SGD momentum 0.9 and Adam)")
    ap.add_argument("--optimizers", default="sgd-momentum,adam", help="with --optimizer-state: sgd-momentum, adam or both")
    ap.add_argument("--tmp", default=None, help="directory for the archives (default: a temp dir)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="repeat a trial while other processes used more than this share of one core (default 0.05)")
    ap.add_argument("--retries", type=int, default=None, help="repeats per trial on a busy machine (default 4, quick 1)")
    args = ap.parse_args(argv)
    if args.optimizer_state:
        return main_optimizer_state(args)
    trials = args.trials or (2 if args.quick else 5)
    retries = args.retries if args.retries is not None else (1 if args.quick else 4)
    codec = args.codec or codecs_mod.DEFAULT_CODEC
    codecs_mod.get_codec(codec)
    opts = {"codec": codec, "schedule": args.schedule}
    threads = [int(t) for t in args.threads.split(",")]
    models = args.models.split(",")
    variants = {"base": None, "rec": Recorder}
    if args.old_recorder:
        variants["old"] = load_recorder_class(args.old_recorder)
    t_start = time.perf_counter()

    setups = []
    if "mlp" in models:
        torch.manual_seed(0)
        x, y = mnist1d_train()
        steps = args.mlp_steps or (400 if args.quick else 3000)
        setups.append(Setup("mlp", make_mlp(), x, y, lr=0.1, batch=64, steps=steps))
    if "cnn" in models:
        torch.manual_seed(0)
        x, y = cifar_shaped()
        steps = args.cnn_steps or (3 if args.quick else 24)
        setups.append(Setup("cnn", make_cnn(), x, y, lr=0.05, batch=64, steps=steps))

    print(f"codec {codec}; schedule {args.schedule}; BLOSC_NTHREADS={os.environ.get('BLOSC_NTHREADS', 'unset')}; "
          f"{trials} trials per variant, alternating order; cores: {os.cpu_count()}; "
          "load average at start: %.2f %.2f %.2f" % os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for s in setups:
            for nt in threads:
                r = compare(s, nt, trials, variants, opts, tmp, args.max_foreign, retries)
                rec = r["rec"]
                ratio, ratio_all = rec["loop"] / r["base"], rec["all"] / r["base"]
                row = [
                    s.name, f"{s.n_params:,}", nt, len(s.batches),
                    f"{1e3 * r['base']:.3f}", f"{1e3 * rec['loop']:.3f}",
                    f"{ratio:.3f}", f"{ratio_all:.3f}", f"{min(rec['pairs']):.2f}-{max(rec['pairs']):.2f}",
                ]
                if "old" in r:
                    row += [f"{r['old']['loop'] / r['base']:.3f}", f"{r['old']['all'] / r['base']:.3f}"]
                row += [f"{100 * r['spread']:.1f}%", f"{1e3 * rec['make']:.0f}",
                        f"{r['clean']}/{trials}, {r['retried']}", "yes" if ratio <= GOAL else "NO"]
                rows.append(row)
                print(f"  {s.name} threads={nt}: base {1e3 * r['base']:.3f} ms/step, "
                      f"recorder {1e3 * rec['loop']:.3f} ms/step ({ratio:.3f}x)", flush=True)
    header = ["model", "params", "threads", "steps", "base ms/step", "rec ms/step", "ratio", "ratio+close",
              "per-trial ratios"]
    if args.old_recorder:
        header += ["old ratio", "old +close"]
    header += ["base spread", "ctor ms", "clean, redone", "<= 5%"]
    print_table(f"Recorder overhead, schedule {args.schedule}, codec {codec} "
                f"(median of {trials} trials; goal: ratio <= {GOAL})", header, rows)
    print("\nratio = recorder / baseline mean step time (training loop); ratio+close also counts rec.close(). "
          f"clean = trials per variant during which other processes used <= {100 * args.max_foreign:.0f}% of a core "
          "(medians use only those when at least 2 are clean); redone = trials repeated because they were not clean.")
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


def main_optimizer_state(args) -> int:
    """Params alone vs params + optimizer state, both against training without recording (issue 14 item 5)."""
    trials = args.trials or (2 if args.quick else 5)
    retries = args.retries if args.retries is not None else (1 if args.quick else 4)
    codec = args.codec or codecs_mod.DEFAULT_CODEC
    codecs_mod.get_codec(codec)
    opts = {"codec": codec, "schedule": args.schedule}
    threads = [int(t) for t in args.threads.split(",")]
    models = args.models.split(",")
    variants = {"base": None, "rec": Recorder, "state": functools.partial(Recorder, optimizer_state=True)}
    t_start = time.perf_counter()
    print(f"codec {codec}; schedule {args.schedule}; {trials} trials per variant, rotating order; cores: {os.cpu_count()}; "
          "load average at start: %.2f %.2f %.2f" % os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for model_name in models:
            for opt_name in args.optimizers.split(","):
                torch.manual_seed(0)
                if model_name == "mlp":
                    x, y = mnist1d_train()
                    s = Setup("mlp", make_mlp(), x, y, lr=0.1, batch=64, steps=args.mlp_steps or (400 if args.quick else 3000),
                              optimizer=opt_name)
                else:
                    x, y = cifar_shaped()
                    s = Setup("cnn", make_cnn(), x, y, lr=0.05, batch=64, steps=args.cnn_steps or (3 if args.quick else 24),
                              optimizer=opt_name)
                extra_rows = 1 if opt_name.startswith("sgd") else 2
                for nt in threads:
                    r = compare(s, nt, trials, variants, opts, tmp, args.max_foreign, retries)
                    rec, st = r["rec"], r["state"]
                    rows.append([
                        s.name, f"{s.n_params:,}", opt_name, extra_rows, nt, len(s.batches),
                        f"{1e3 * r['base']:.3f}",
                        f"{1e3 * rec['loop']:.3f} ({rec['loop'] / r['base']:.3f}x)",
                        f"{1e3 * st['loop']:.3f} ({st['loop'] / r['base']:.3f}x)",
                        f"{1e3 * (st['loop'] - rec['loop']):+.3f}",
                        f"{rec['all'] / r['base']:.3f} / {st['all'] / r['base']:.3f}",
                        f"{100 * r['spread']:.1f}%", f"{r['clean']}/{trials}, {r['retried']}",
                    ])
                    print(f"  {s.name} {opt_name} threads={nt}: base {1e3 * r['base']:.3f} ms/step, params "
                          f"{rec['loop'] / r['base']:.3f}x, params+state {st['loop'] / r['base']:.3f}x", flush=True)
    header = ["model", "params", "optimizer", "extra rows", "threads", "steps", "base ms/step", "params ms/step",
              "params+state ms/step", "state ms/step", "+close ratios", "base spread", "clean, redone"]
    print_table(f"Optimizer-state recording overhead, schedule {args.schedule}, codec {codec} (median of {trials} trials)",
                header, rows)
    print("\nratios are against the same training without recording (loop only); state ms/step = params+state - params; "
          "+close ratios also count rec.close() (params / params+state).")
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
