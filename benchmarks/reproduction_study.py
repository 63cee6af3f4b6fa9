#!/usr/bin/env python
"""Reproduction study of "A Walk with SGD" (Xing et al. 2018) on MNIST-1D with `sgdwalk`.

Runs `sgdwalk train` and `sgdwalk analyze` (as subprocesses, printing every command) over a
learning-rate sweep, a batch-size sweep, runs with equal lr/batch ratio, a learning-rate drop (with
its no-drop control) and a BatchNorm MLP; then reads the results files with h5py/numpy, writes
`summary.json`, `summary.md` and figures, and prints the total wall time. The claims and what was
measured for each are discussed in docs/reproduction.md.

    python benchmarks/reproduction_study.py                      # full study, ~28 min on 1 CPU thread
    python benchmarks/reproduction_study.py --quick --out /tmp/q # smoke run, < 1 min
    python benchmarks/reproduction_study.py --figures-dir docs/figures/reproduction

Resumable: a command whose outputs exist (marker files under OUT/done/) is skipped, so an interrupted
study continues where it stopped and a rerun only recomputes the summary and the figures
(`--force` runs every command again; `sgdwalk analyze` itself still reuses stored rows).

Needs `sgdwalk` installed (`pip install .`; `--sgdwalk CMD` to use another launcher). Everything
runs on the CPU (`--device cpu`) with one thread (`--threads 1`): the machine the study was written on
has 2 cores shared with other work.

Study-side code (not sgdwalk): the alignment of minibatch gradients with the top Hessian eigenvectors
(claim 6) is computed here from the archive's records (g_t = (θ_t − θ_{t+1}) / lr_t; momentum and
weight decay are 0 in every run) and the eigenvectors stored by `sgdwalk analyze -m hessian_top
--option store_vectors=true`; the barrier-crossing fraction of single updates and the fraction of
rising floors are computed from sgdwalk's interpolation and floor rows. Everything else is a column
that sgdwalk wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# Study design
# ----------------------------------------------------------------------------------------------

N_TRAIN = 4000          # MNIST-1D training split at the zoo defaults (5000 samples, 80 % train)

FULL = dict(
    epochs=100,                        # every sweep run: 100 epochs (steps = 100 * (4000 // batch))
    window=50,                         # pairs analysed per window (the authors plotted 50 iterations)
    window_epochs=(1, 10, 25),         # windows start at these epochs; one more ends at the last step
    seeds=(0, 1, 2),
    lrs=(0.05, 0.1, 0.2, 0.5, 1.0),    # lr sweep at batch 64
    base_lr=0.1, base_batch=64,
    batches=(16, 64, 256),             # batch sweep at lr 0.1
    ratio=((0.025, 16), (0.1, 64), (0.4, 256)),   # equal lr/batch = 1/640
    drop=dict(lr=0.2, batch=64, epochs=50, factor=0.1),  # drop at mid run: 0.2 -> 0.02
    bn_seeds=(0,),
    spans="1,10",
    mb_spans="1,2,5,10",
    hessian_k=5,
    align_grads=10,                    # gradients per window compared with the window-start eigenvectors
    log_steps=(10, 20, 50, 100, 200, 500, 1000, 1500, 2000, 5000, 10000, 20000),
)

QUICK = dict(
    FULL,
    epochs=3, window=10, window_epochs=(1, 2), seeds=(0,), lrs=(0.1,), batches=(64,),
    ratio=((0.1, 64),), drop=dict(lr=0.2, batch=64, epochs=2, factor=0.1, control=False), bn_seeds=(),
    align_grads=5, log_steps=(10, 20, 50, 100),
)


@dataclass
class Run:
    name: str
    model: str
    lr: float
    batch: int
    seed: int
    epochs: int
    drop: tuple[int, float] | None = None
    groups: set = field(default_factory=set)
    windows: dict = field(default_factory=dict)      # label -> (first step_a, last step_a + 1)

    @property
    def spe(self) -> int:
        return N_TRAIN // self.batch

    @property
    def steps(self) -> int:
        return self.epochs * self.spe

    @property
    def config(self) -> str:
        """Name without the seed: runs of one configuration."""
        return self.name.rsplit("_s", 1)[0] if "_s" in self.name else self.name


def lrtag(lr: float) -> str:
    return f"{lr:g}"


def build_runs(cfg: dict) -> list[Run]:
    runs: dict[str, Run] = {}
    W = cfg["window"]

    def add(model, lr, batch, seed, group, epochs=None, drop=None, suffix=""):
        name = f"{model}_lr{lrtag(lr)}_b{batch}{suffix}_s{seed}"
        if name not in runs:
            run = Run(name, model, lr, batch, seed, epochs or cfg["epochs"], drop)
            if drop is None and not suffix:
                for e in cfg["window_epochs"]:
                    a = (e - 1) * run.spe
                    run.windows[f"e{e}"] = (a, a + W)
                run.windows["end"] = (run.steps - W, run.steps)
            else:
                d = run.steps // 2
                run.windows = {"before": (d - W, d), "after": (d, d + W), "end": (run.steps - W, run.steps)}
            runs[name] = run
        runs[name].groups.add(group)

    for s in cfg["seeds"]:
        for lr in cfg["lrs"]:
            add("mlp", lr, cfg["base_batch"], s, "lr")
        for b in cfg["batches"]:
            add("mlp", cfg["base_lr"], b, s, "batch")
        for lr, b in cfg["ratio"]:
            add("mlp", lr, b, s, "ratio")
        dr = cfg["drop"]
        n = dr["epochs"] * (N_TRAIN // dr["batch"])
        add("mlp", dr["lr"], dr["batch"], s, "drop", epochs=dr["epochs"], drop=(n // 2, dr["factor"]), suffix="_drop")
        if dr.get("control", True):
            add("mlp", dr["lr"], dr["batch"], s, "drop", epochs=dr["epochs"], suffix="_ctrl")
    for s in cfg["bn_seeds"]:
        add("mlp_bn", cfg["base_lr"], cfg["base_batch"], s, "bn")
    return list(runs.values())


def schedule(run: Run, cfg: dict) -> str:
    wins = ",".join(f"{a}-{b + 1}:1" for a, b in run.windows.values())    # records a..b: pairs a..b-1
    logs = [s for s in cfg["log_steps"] if s < run.steps]
    parts = [f"window:{wins}", f"every:{run.spe}"]
    if logs:
        parts.append("steps:" + ",".join(map(str, logs)))
    return "+".join(parts)


def window_steps(run: Run) -> str:
    return ",".join(f"{a}:{b}" for a, b in run.windows.values())


# ----------------------------------------------------------------------------------------------
# Running commands
# ----------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, out: Path, sgdwalk: list[str], threads: int, force: bool):
        self.out, self.sgdwalk, self.force = out, sgdwalk, force
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        OPENBLAS_NUM_THREADS=str(threads), BLOSC_NTHREADS=str(threads))
        self.threads = threads
        self.log = out / "commands.sh"
        self.timings: list[dict] = []
        (out / "done").mkdir(parents=True, exist_ok=True)
        if not self.log.exists():
            self.log.write_text(f"#!/bin/sh\n# every command of the study, in order, run in {out}\nset -e\n")

    def __call__(self, args: list[str], label: str, outputs: tuple[str, ...] = (), force: bool = False) -> float:
        shown = f"OMP_NUM_THREADS={self.threads} " + shlex.join(["sgdwalk", *args])
        marker = self.out / "done" / (hashlib.sha1(shown.encode()).hexdigest()[:16] + ".json")
        if marker.exists() and not (self.force or force) and all((self.out / o).exists() for o in outputs):
            rec = json.loads(marker.read_text())
            self.timings.append({**rec, "skipped": True})
            return 0.0
        print(f"$ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([*self.sgdwalk, *args], cwd=self.out, env=self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout, file=sys.stderr)
            raise SystemExit(f"command failed with status {proc.returncode}: {shown}")
        tail = proc.stdout.strip().splitlines()
        for line in tail[-2:] if args[0] == "train" else tail[-1:]:
            print(f"    {line}", flush=True)
        rec = {"command": shown, "label": label, "seconds": round(dt, 2)}
        marker.write_text(json.dumps(rec))
        with self.log.open("a") as f:
            f.write(shown + "\n")
        self.timings.append(rec)
        return dt


def archive_ok(path: Path) -> bool:
    import h5py
    try:
        with h5py.File(path, "r", locking=False) as f:
            return bool(f.attrs.get("closed_cleanly", False))
    except OSError:
        return False


def run_all(runs: list[Run], cfg: dict, R: Runner, device: str) -> None:
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}  lr={run.lr:g} batch={run.batch} seed={run.seed} "
              f"steps={run.steps} groups={','.join(sorted(run.groups))}", flush=True)
        arch = f"runs/{run.name}.h5"
        train = ["train", "--model", run.model, "--lr", lrtag(run.lr), "--batch-size", str(run.batch),
                 "--steps", str(run.steps), "--seed", str(run.seed), "--record", schedule(run, cfg),
                 "--device", device, "--no-progress", "--overwrite", "--out", arch]
        if run.drop:
            train[-4:-4] = ["--lr-drop", f"{run.drop[0]}:{run.drop[1]:g}"]
        fresh = not archive_ok(R.out / arch)
        if fresh:
            # an archive that is missing or was not closed cleanly invalidates everything derived from it
            for p in (R.out / "runs").glob(f"{run.name}.*results.h5"):
                p.unlink()
        R(train, f"train {run.name}", (arch,), force=fresh)
        base = ["--device", device, "-q"] + (["--bn", "train"] if run.model.endswith("_bn") else [])

        def analyze(extra: list[str], suffix: str, label: str) -> None:
            res = f"runs/{run.name}{suffix}.results.h5"
            R(["analyze", arch, *extra, *base, "-o", res], f"analyze {label} {run.name}", (res,), force=fresh)

        # 1. the windows: interpolation, floor, geometry, barriers on a fixed 2000-sample training subset
        analyze(["--steps", window_steps(run), "--dtype", "float64", "--spans", cfg["spans"]], "", "windows")
        # 2. the same windows on each update's own minibatch
        analyze(["--steps", window_steps(run), "--eval", "minibatch", "--dtype", "float64", "--spans", cfg["mb_spans"]],
                ".minibatch", "minibatch")
        # 3. every record pair: test loss/accuracy at both ends, distance from initialisation
        analyze(["-m", "interpolation,geometry", "--alphas", "0,1", "--eval", "test"], ".test", "test")
        # 4. top-5 Hessian eigenpairs (subset:2000) at each window's first record and the last pair
        hsteps = sorted({a for a, _ in run.windows.values()} | {run.steps - 1})
        analyze(["-m", "hessian_top", "--k", str(cfg["hessian_k"]), "--option", "store_vectors=true",
                 "--steps", ",".join(map(str, hsteps))], ".hessian", "hessian")


# ----------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------

def table(path: Path, metric: str) -> dict[str, np.ndarray]:
    import h5py
    with h5py.File(path, "r", locking=False) as f:
        groups = list(f["metrics"][metric].values())
        if len(groups) != 1:
            raise SystemExit(f"{path}: expected one {metric} table, found {len(groups)} (remove the file and rerun)")
        g = groups[0]
        out = {k: g[k][()] for k in g.keys()}
        out["_config"] = json.loads(g.attrs["config"])
        return out


def provenance(path: Path) -> dict:
    import h5py
    with h5py.File(path, "r", locking=False) as f:
        return json.loads(f.attrs["archive_provenance"])


def select(t: dict, a: int, b: int, *, single: bool = True, span: int | None = None) -> np.ndarray:
    m = (t["step_a"] >= a) & (t["step_a"] < b)
    if span is not None:
        m &= t["span"] == span
        m &= t["step_b"] - t["step_a"] == span       # both pairs inside one window of consecutive steps
    elif single:
        m &= t["step_b"] - t["step_a"] == 1
    return m


def med(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def frac(x) -> float:
    x = np.asarray(x)
    return float(np.mean(x)) if len(x) else float("nan")


def window_stats(run: Run, res: Path, a: int, b: int) -> dict:
    fl, ge, ba, it = (table(res, m) for m in ("floor", "geometry", "barriers", "interpolation"))
    m = select(fl, a, b)
    L = it["loss"][select(it, a, b)]
    ends = np.maximum(L[:, 0], L[:, -1])
    bump = L[:, 1:-1].max(axis=1) - ends
    mg = select(ge, a, b)
    steps_a = set(ge["step_a"][mg].tolist())
    has_prev = np.array([s - 1 in steps_a for s in ge["step_a"][mg]], dtype=bool)
    cos = ge["cos_prev"][mg][has_prev]
    floor = fl["floor_loss"][m]
    la = fl["loss_a"][m]
    out = {
        "pairs": int(m.sum()),
        "loss_start": med(la),
        "floor_loss": med(floor),
        "convex_interior": frac(fl["convex_interior"][m]),
        "interior": frac(fl["interior"][m]),
        "convex": frac(fl["convex"][m]),
        "a_star": med(fl["a_star"][m]),
        "a_star_iqr": [float(np.percentile(fl["a_star"][m], 25)), float(np.percentile(fl["a_star"][m], 75))],
        "height": med(fl["height_start"][m]),
        "height_max": med(fl["height_max"][m]),
        "height_rel": med(fl["height_start"][m] / la),
        "loss_drop": med(fl["loss_a"][m] - fl["loss_b"][m]),
        "step_length": med(ge["step_length"][mg]),
        "cos_prev": med(cos),
        "cos_prev_neg": frac(cos < 0),
        "cross_1e-3": frac(bump > 1e-3),               # the update itself crosses a bump > 1e-3 (loss units)
        "cross_any": frac(bump > 1e-9 * np.abs(ends) + 1e-12),
        "floor_rises": frac(np.diff(floor) > 0) if len(floor) > 1 else float("nan"),
    }
    for k in sorted(set(ba["span"].tolist())):
        mb = select(ba, a, b, span=k)
        out[f"barrier_frac_k{k}"] = frac(ba["has_barrier"][mb])
        out[f"barrier_any_k{k}"] = frac(ba["barrier"][mb] > 1e-9)
        out[f"barrier_med_k{k}"] = med(ba["barrier"][mb])
        out[f"barrier_units_k{k}"] = int(mb.sum())
    return out


def run_stats(run: Run, out: Path, cfg: dict) -> dict:
    d = out / "runs"
    res, mbr, tst, hes = (d / f"{run.name}{s}.results.h5" for s in ("", ".minibatch", ".test", ".hessian"))
    prov = provenance(res)
    meta = prov.get("metadata", {})
    assert abs(meta["lr"] - run.lr) < 1e-12 and meta["batch_size"] == run.batch, (run.name, meta)
    st = {"name": run.name, "config": run.config, "model": run.model, "lr": run.lr, "batch": run.batch,
          "seed": run.seed, "steps": run.steps, "steps_per_epoch": run.spe, "groups": sorted(run.groups),
          "drop": list(run.drop) if run.drop else None, "windows": {}, "windows_minibatch": {}}
    for lab, (a, b) in run.windows.items():
        st["windows"][lab] = window_stats(run, res, a, b)
        st["windows_minibatch"][lab] = window_stats(run, mbr, a, b)
    # distance from initialisation and test accuracy at every record (sparse + windows)
    ge, it = table(tst, "geometry"), table(tst, "interpolation")
    steps = np.concatenate([[0], ge["step_b"]])
    dist = np.concatenate([[0.0], ge["dist_init_b"]])
    st["dist_curve"] = [steps.tolist(), dist.tolist()]
    tacc = it["acc"][:, 1]
    st["test_curve"] = [it["step_b"].tolist(), tacc.tolist(), it["loss"][:, 1].tolist()]
    at = {int(s): float(v) for s, v in zip(steps, dist)}
    st["dist_at_step"] = {s: at.get(s, float("nan")) for s in (50, 100, 200, 500, 1000, 1500)}
    st["dist_at_epoch"] = {e: at.get(e * run.spe, float("nan")) for e in (1, 10, 25, 50, 100)}
    st["test_acc_final"] = float(tacc[-1])
    st["test_loss_final"] = float(it["loss"][-1, 1])
    w = table(res, "interpolation")
    last = w["step_b"] == run.steps
    st["train_acc_final"] = float(w["acc"][last, -1][0])          # subset:2000 of the training split
    st["train_loss_final"] = float(w["loss"][last, -1][0])
    # curvature at window starts and at the end
    h = table(hes, "hessian_top")
    st["hessian"] = {int(s): {"lambda_max": float(l), "eos_ratio": float(e), "lr": float(r), "converged": bool(c),
                              "eigenvalues": [float(x) for x in ev]}
                     for s, l, e, r, c, ev in zip(h["step_a"], h["lambda_max"], h["eos_ratio"], h["lr"],
                                                  h["converged"], h["eigenvalues"])}
    st["alignment"] = alignment(run, out, h, cfg)
    return st


def alignment(run: Run, out: Path, h: dict, cfg: dict) -> dict:
    """Study-side: |cos(g_t, v_1)| and ‖V_kᵀ g_t‖/‖g_t‖ for the minibatch gradients of the first
    `align_grads` updates of each window, against the eigenvectors stored at the window's first record."""
    import torch
    from trajectory import Trajectory

    k = cfg["hessian_k"]
    res = {}
    with Trajectory(out / "runs" / f"{run.name}.h5") as traj:
        steps = traj.steps
        n = traj.n_params
        lr_steps, lr_vals = traj.scalar_history("lr")
        lr_at = dict(zip(np.asarray(lr_steps).tolist(), np.asarray(lr_vals).tolist()))
        for lab, (a, b) in run.windows.items():
            rows = np.nonzero(h["step_a"] == a)[0]
            if not len(rows):
                continue
            V = torch.from_numpy(h["eigenvectors"][rows[0]].reshape(k, n))
            c1, pk = [], []
            for s in range(a, min(b, a + cfg["align_grads"])):
                i = traj.index_of_step(s)
                if steps[i + 1] != s + 1:
                    break
                g = (traj.params(i).double() - traj.params(i + 1).double()) / lr_at[s]
                gn = float(torch.linalg.vector_norm(g))
                proj = V @ g
                c1.append(abs(float(proj[0])) / gn)
                pk.append(float(torch.linalg.vector_norm(proj)) / gn)
            res[lab] = {"cos_v1": med(c1), "proj_topk": med(pk), "grads": len(c1),
                        "random_baseline_topk": math.sqrt(k / n)}
    return res


# ----------------------------------------------------------------------------------------------
# Aggregation, tables, figures
# ----------------------------------------------------------------------------------------------

def agg(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "n": 0, "values": []}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
            "values": [float(x) for x in v]}


def by_config(stats: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in stats:
        out.setdefault(s["config"], []).append(s)
    return out


WSTATS = ("loss_start", "convex_interior", "interior", "convex", "a_star", "height", "height_max", "height_rel",
          "loss_drop", "step_length", "cos_prev", "cos_prev_neg", "cross_1e-3", "cross_any", "floor_rises")


def aggregate(stats: list[dict]) -> dict:
    out = {}
    for cfgname, runs in by_config(stats).items():
        r0 = runs[0]
        c = {k: r0[k] for k in ("model", "lr", "batch", "steps", "steps_per_epoch", "groups", "drop")}
        c["seeds"] = [r["seed"] for r in runs]
        c["windows"], c["windows_minibatch"] = {}, {}
        for key in ("windows", "windows_minibatch"):
            for lab in r0[key]:
                names = [n for n in r0[key][lab] if not n.endswith("_iqr") and n != "pairs"]
                c[key][lab] = {n: agg([r[key][lab][n] for r in runs]) for n in names if n in WSTATS or n.startswith("barrier")}
                c[key][lab]["pairs_per_seed"] = r0[key][lab]["pairs"]
        c["dist_at_step"] = {s: agg([r["dist_at_step"][s] for r in runs]) for s in r0["dist_at_step"]}
        c["dist_at_epoch"] = {e: agg([r["dist_at_epoch"][e] for r in runs]) for e in r0["dist_at_epoch"]}
        for n in ("test_acc_final", "test_loss_final", "train_acc_final", "train_loss_final"):
            c[n] = agg([r[n] for r in runs])
        c["hessian"] = {}
        for lab, (a, _b) in [*((lab, w) for lab, w in zip(r0["windows"], window_bounds(r0))), ("final", (r0["steps"] - 1, 0))]:
            c["hessian"][lab] = {n: agg([r["hessian"].get(a, {}).get(n) for r in runs]) for n in ("lambda_max", "eos_ratio")}
        c["alignment"] = {lab: {n: agg([r["alignment"].get(lab, {}).get(n) for r in runs]) for n in ("cos_v1", "proj_topk")}
                          for lab in r0["alignment"]}
        out[cfgname] = c
    return out


def window_bounds(st: dict) -> list[tuple[int, int]]:
    return [tuple(w) for w in st["_windows"]]


def fmt(a: dict, digits: int = 3, sci: bool = False) -> str:
    if not a or a.get("n", 0) == 0:
        return "–"
    f = (lambda x: f"{x:.{digits - 1}e}") if sci else (lambda x: f"{x:.{digits}g}")
    return f(a["mean"]) + (f" ± {f(a['sd'])}" if a["n"] > 1 else "")


def markdown(agg_: dict, cfg: dict) -> str:
    lines = ["# Reproduction study: summary tables", "",
             "Mean ± sd over seeds (sd of the per-run values). Windows: 50 consecutive single-step pairs",
             "(`e1`, `e10`, `e25`: starting at epochs 1, 10, 25; `end`: the last 50 updates; drop runs: 50",
             "pairs `before`/`after` the drop and at the `end`). Loss on a fixed 2000-sample training subset",
             "(`--eval subset:2000`, float64) unless marked minibatch. Height = L(θ_t) − floor (`height=start`).", ""]
    # main table: every config x window
    hdr = ("| run | seeds | window | L(θ_t) | convex+interior | median a* | height | height/L | "
           "loss drop/step | step ‖Δθ‖ | cos(prev) | frac cos<0 | barrier k=1 | barrier k=10 | update crosses bump |")
    lines += ["## Windows (subset:2000)", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for name, c in agg_.items():
        for lab, w in c["windows"].items():
            lines.append(f"| {name} | {len(c['seeds'])} | {lab} | {fmt(w['loss_start'])} | {fmt(w['convex_interior'], 2)} | "
                         f"{fmt(w['a_star'], 2)} | {fmt(w['height'], 2, True)} | {fmt(w['height_rel'], 2, True)} | "
                         f"{fmt(w['loss_drop'], 2, True)} | {fmt(w['step_length'], 3)} | {fmt(w['cos_prev'], 2)} | "
                         f"{fmt(w['cos_prev_neg'], 2)} | {fmt(w.get('barrier_frac_k1'), 2)} | {fmt(w.get('barrier_frac_k10'), 2)} | "
                         f"{fmt(w['cross_1e-3'], 2)} |")
    hdr = "| run | window | L(θ_t) | convex+interior | interior | median a* | height | height/L | barrier k=1 | k=2 | k=5 | k=10 | update crosses bump |"
    lines += ["", "## Windows on each update's own minibatch (`--eval minibatch`)", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for name, c in agg_.items():
        for lab, w in c["windows_minibatch"].items():
            lines.append(f"| {name} | {lab} | {fmt(w['loss_start'])} | {fmt(w['convex_interior'], 2)} | {fmt(w['interior'], 2)} | "
                         f"{fmt(w['a_star'], 2)} | {fmt(w['height'], 2, True)} | {fmt(w['height_rel'], 2, True)} | "
                         f"{fmt(w.get('barrier_frac_k1'), 2)} | {fmt(w.get('barrier_frac_k2'), 2)} | "
                         f"{fmt(w.get('barrier_frac_k5'), 2)} | {fmt(w.get('barrier_frac_k10'), 2)} | {fmt(w['cross_1e-3'], 2)} |")
    hdr = ("| run | dist@100 steps | dist@1000 steps | dist@1500 steps | dist@epoch 1 | dist@epoch 10 | dist@epoch 25 | "
           "dist@end | test acc | train acc (subset) | train loss (subset) |")
    lines += ["", "## Distance from initialisation ‖θ_t − θ_0‖ and final accuracy", "", hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for name, c in agg_.items():
        e_end = c["steps"] // c["steps_per_epoch"]
        dend = c["dist_at_epoch"].get(e_end) or c["dist_at_epoch"].get(str(e_end))
        lines.append(f"| {name} | {fmt(c['dist_at_step'][100])} | {fmt(c['dist_at_step'][1000])} | {fmt(c['dist_at_step'][1500])} | "
                     f"{fmt(c['dist_at_epoch'][1])} | {fmt(c['dist_at_epoch'][10])} | {fmt(c['dist_at_epoch'][25])} | {fmt(dend)} | "
                     f"{fmt(c['test_acc_final'])} | {fmt(c['train_acc_final'])} | {fmt(c['train_loss_final'], 2, True)} |")
    labs = sorted({lab for c in agg_.values() for lab in c["hessian"]}, key=_label_order)
    hdr = "| run | " + " | ".join(f"λ_max {lab}" for lab in labs) + " | " + " | ".join(f"λ·lr/2 {lab}" for lab in labs) + " |"
    lines += ["", "## Top Hessian eigenvalue (subset:2000, float32 Lanczos) at each window's first record and at the last pair", "",
              hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for name, c in agg_.items():
        lines.append(f"| {name} | " + " | ".join(fmt(c["hessian"].get(lab, {}).get("lambda_max")) for lab in labs) + " | "
                     + " | ".join(fmt(c["hessian"].get(lab, {}).get("eos_ratio"), 2) for lab in labs) + " |")
    labs = sorted({lab for c in agg_.values() for lab in c["alignment"]}, key=_label_order)
    hdr = "| run | " + " | ".join(f"\\|cos(g,v1)\\| {lab}" for lab in labs) + " | " + " | ".join(f"‖P5 g‖/‖g‖ {lab}" for lab in labs) + " |"
    lines += ["", f"## Study-side: alignment of minibatch gradients with the top-{cfg['hessian_k']} Hessian eigenvectors",
              "", f"Median over the first {cfg['align_grads']} updates of each window (random direction: ‖P5 g‖/‖g‖ ≈ "
              f"{math.sqrt(cfg['hessian_k'] / 15210):.3f} for the 15,210-parameter MLP).", "", hdr, "|" + "---|" * (1 + 2 * len(labs))]
    for name, c in agg_.items():
        lines.append(f"| {name} | " + " | ".join(fmt(c["alignment"].get(lab, {}).get("cos_v1"), 2) for lab in labs) + " | "
                     + " | ".join(fmt(c["alignment"].get(lab, {}).get("proj_topk"), 2) for lab in labs) + " |")
    return "\n".join(lines) + "\n"


def _label_order(lab: str) -> tuple:
    if lab.startswith("e") and lab[1:].isdigit():
        return (0, int(lab[1:]))
    return ({"before": 1, "after": 2, "end": 3, "final": 4}.get(lab, 5), 0)


def _lr_axis(ax, lrs) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(list(lrs)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{x:g}" for x in lrs])


def pooled(stats: list[dict]) -> dict:
    """Pairs of all MLP sweep runs (lr, batch, ratio; not the drop runs, not BatchNorm) pooled per window kind."""
    out = {}
    sweep = [s for s in stats if s["model"] == "mlp" and not s["drop"] and "_ctrl" not in s["name"]]
    for ev, suffix in (("subset", ""), ("minibatch", ".minibatch")):
        for kind, labs in (("first epoch (e1)", ("e1",)), ("mid training (e10, e25)", ("e10", "e25")), ("last 50 updates", ("end",))):
            ci, ast, cosn, ratio, n_units, n_bar, n_bump, n_pairs = [], [], [], [], 0, 0, 0, 0
            for st in sweep:
                res = Path(st["_res"].replace(".results.h5", f"{suffix}.results.h5"))
                fl, ge, ba, it = (table(res, m) for m in ("floor", "geometry", "barriers", "interpolation"))
                for lab in labs:
                    if lab not in st["windows"]:
                        continue
                    a, b = st["_windows"][list(st["windows"]).index(lab)]
                    m = select(fl, a, b)
                    n_pairs += int(m.sum())
                    ci += fl["convex_interior"][m].tolist()
                    ast += fl["a_star"][m].tolist()
                    ci_m = fl["convex_interior"][m]
                    far = (fl["loss_b"][m] - fl["floor_loss"][m]) / np.maximum(fl["height_start"][m], 1e-300)
                    ratio += far[ci_m].tolist()
                    mg = select(ge, a, b)
                    sa = set(ge["step_a"][mg].tolist())
                    keep = np.array([x - 1 in sa for x in ge["step_a"][mg]], dtype=bool)
                    cosn += (ge["cos_prev"][mg][keep] < 0).tolist()
                    for k in sorted(set(ba["span"].tolist())):
                        mb = select(ba, a, b, span=k)
                        n_units += int(mb.sum())
                        n_bar += int(ba["has_barrier"][mb].sum())
                    L = it["loss"][select(it, a, b)]
                    n_bump += int(((L[:, 1:-1].max(axis=1) - np.maximum(L[:, 0], L[:, -1])) > 1e-3).sum())
            if not n_pairs:
                continue
            ast = np.asarray(ast)
            out[f"{ev} / {kind}"] = {
                "runs": len(sweep), "pairs": n_pairs, "convex_interior": frac(ci),
                "a_star_median": med(ast), "a_star_iqr": [float(np.percentile(ast, 25)), float(np.percentile(ast, 75))],
                "frac_cos_prev_negative": frac(cosn), "convex_interior_median_far_wall_over_near_wall": med(ratio),
                "barrier_units": n_units, "barriers_found": n_bar, "updates_crossing_bump_1e-3": n_bump}
    return out


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def correlations(stats: list[dict]) -> dict:
    """Across the lr-sweep runs (one point per run): does a higher walk go with flatter / better?"""
    lr_runs = [s for s in stats if "lr" in s["groups"]]
    out = {}
    for lab in ("e10", "e25"):
        h = [s["windows"][lab]["height"] if lab in s["windows"] else np.nan for s in lr_runs]
        hr = [s["windows"][lab]["height_rel"] if lab in s["windows"] else np.nan for s in lr_runs]
        lam_end = [s["hessian"].get(s["steps"] - 1, {}).get("lambda_max", np.nan) for s in lr_runs]
        acc = [s["test_acc_final"] for s in lr_runs]
        dist = [s["dist_at_epoch"][25] for s in lr_runs]
        out[lab] = {"spearman_height_vs_final_lambda": spearman(h, lam_end),
                    "spearman_height_vs_test_acc": spearman(h, acc),
                    "spearman_rel_height_vs_test_acc": spearman(hr, acc),
                    "spearman_height_vs_dist_epoch25": spearman(h, dist), "runs": len(lr_runs)}
    return out


def figures(stats: list[dict], agg_: dict, cfg: dict, figdir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    made = []
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100, "lines.linewidth": 1.2})

    def save(fig, name):
        p = figdir / name
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        _shrink(p)
        made.append(p)

    lr_cfgs = sorted([c for c in agg_.values() if "lr" in c["groups"]], key=lambda c: c["lr"])
    labs = [lab for lab in lr_cfgs[0]["windows"]] if lr_cfgs else []
    # 1. height, relative height, convex+interior fraction vs lr
    if lr_cfgs:
        fig, ax = plt.subplots(1, 3, figsize=(10, 3))
        lrs = [c["lr"] for c in lr_cfgs]
        for lab in labs:
            for k, (key, ylab) in enumerate((("height", "median height L(θ_t) − floor (nats)"),
                                            ("height_rel", "median height / L(θ_t)"),
                                            ("convex_interior", "fraction convex with interior floor"))):
                m = [c["windows"][lab][key]["mean"] for c in lr_cfgs]
                s = [c["windows"][lab][key]["sd"] for c in lr_cfgs]
                ax[k].errorbar(lrs, m, yerr=s, marker="o", ms=3, capsize=2, label=lab)
                _lr_axis(ax[k], lrs)
                ax[k].set_xlabel("learning rate")
                ax[k].set_ylabel(ylab)
        ax[0].set_yscale("log")
        ax[1].set_yscale("log")
        ax[2].set_ylim(-0.03, 1.03)
        ax[0].legend(title="window", fontsize=7)
        fig.suptitle(f"MLP on MNIST-1D, batch {cfg['base_batch']}: lr sweep (mean ± sd over seeds, loss on subset:2000)", fontsize=9)
        save(fig, "height_vs_lr.png")

    # 2. distance from initialisation per batch size / equal ratio
    groups = [("batch", f"lr {cfg['base_lr']:g}, batch sweep"), ("ratio", "equal lr/batch")]
    fig, ax = plt.subplots(1, 3, figsize=(10, 3))
    colors = {}
    for gi, (g, title) in enumerate(groups):
        for c in sorted([c for c in stats if g in c["groups"]], key=lambda s: (s["batch"], s["lr"], s["seed"])):
            key = f"lr {c['lr']:g}, b {c['batch']}"
            col = colors.setdefault(key, f"C{len(colors)}")
            steps, dist = np.asarray(c["dist_curve"][0]), np.asarray(c["dist_curve"][1])
            o = np.argsort(steps)
            steps, dist = steps[o], dist[o]
            lab = key if c["seed"] == cfg["seeds"][0] else None
            if gi == 0:
                ax[0].plot(steps[1:], dist[1:], color=col, lw=0.8, label=lab)
                ax[1].plot(steps[1:] / c["steps_per_epoch"], dist[1:], color=col, lw=0.8, label=lab)
            else:
                ax[2].plot(steps[1:] / c["steps_per_epoch"], dist[1:], color=col, lw=0.8, label=lab)
    ax[0].set_xlabel("SGD step")
    ax[1].set_xlabel("epoch")
    ax[2].set_xlabel("epoch")
    for a_, t in zip(ax, ("batch sweep vs steps", "batch sweep vs epochs", "equal lr/batch ratio vs epochs")):
        a_.set_xscale("log")
        a_.set_ylabel("‖θ_t − θ_0‖ (parameter L2 norm)")
        a_.set_title(t)
        a_.legend(fontsize=7)
    save(fig, "dist_init_batch.png")

    # 3. the lr drop: joined interpolation curves around the drop, drop vs control (first seed)
    drop = [s for s in stats if s["drop"] and s["seed"] == cfg["seeds"][0]]
    if drop:
        d = drop[0]
        ctrl = [s for s in stats if s["name"] == d["name"].replace("_drop", "_ctrl")]
        D = d["drop"][0]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3))
        for s, col in ([(ctrl[0], "C0")] if ctrl else []) + [(d, "C3")]:
            it = table(Path(s["_res"]), "interpolation")
            fl = table(Path(s["_res"]), "floor")
            alphas = np.asarray(it["_config"]["options"]["alphas"])
            m = select(it, D - 25, D + 25)
            xs = (it["step_a"][m][:, None] + alphas[None, :-1]).ravel()
            ys = it["loss"][m][:, :-1].ravel()
            lab = "lr drop ×0.1 at step %d" % D if s is d else "control (no drop)"
            ax[0].plot(xs, ys, color=col, lw=0.8, label=lab)
            mf = select(fl, D - 25, D + 25)
            ax[0].plot(fl["step_a"][mf] + fl["a_star"][mf], fl["floor_loss"][mf], ".", color=col, ms=3)
            mh = select(fl, 0, 10 ** 9)
            ax[1].plot(fl["step_a"][mh], fl["height_start"][mh], ".", color=col, ms=2, label=lab)
        ax[0].axvline(D, color="k", lw=0.6, ls=":")
        ax[0].set_xlabel("SGD step (curve between step t and t+1 at x = t + a)")
        ax[0].set_ylabel("training loss on subset:2000 (nats)")
        ax[0].set_title(f"joined interpolations, lr {d['lr']:g} → {d['lr'] * d['drop'][1]:g}; dots = floors")
        ax[0].legend(fontsize=7)
        ax[1].set_yscale("log")
        ax[1].axvline(D, color="k", lw=0.6, ls=":")
        ax[1].set_xlabel("SGD step (windows: before, after the drop, end)")
        ax[1].set_ylabel("height L(θ_t) − floor (nats)")
        ax[1].legend(fontsize=7)
        save(fig, "lr_drop.png")

    # 4. lambda_max and test accuracy vs lr
    if lr_cfgs:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3))
        lrs = np.array([c["lr"] for c in lr_cfgs])
        for lab in [*labs[1:], "final"]:
            m = [c["hessian"][lab]["lambda_max"]["mean"] for c in lr_cfgs]
            s = [c["hessian"][lab]["lambda_max"]["sd"] for c in lr_cfgs]
            ax[0].errorbar(lrs, m, yerr=s, marker="o", ms=3, capsize=2, label=f"at {lab}")
        ax[0].plot(lrs, 2 / lrs, "k--", lw=0.8, label="2 / lr")
        _lr_axis(ax[0], lrs)
        ax[0].set_yscale("log")
        ax[0].set_xlabel("learning rate")
        ax[0].set_ylabel("top Hessian eigenvalue λ_max (subset:2000)")
        ax[0].legend(fontsize=7)
        for key, lab_ in (("test_acc_final", "test accuracy (1000 test samples)"), ("train_acc_final", "train accuracy (subset:2000)")):
            ax[1].errorbar(lrs, [c[key]["mean"] for c in lr_cfgs], yerr=[c[key]["sd"] for c in lr_cfgs], marker="o", ms=3,
                           capsize=2, label=lab_)
        _lr_axis(ax[1], lrs)
        ax[1].set_xlabel("learning rate")
        ax[1].set_ylabel(f"accuracy after {cfg['epochs']} epochs")
        ax[1].legend(fontsize=7)
        save(fig, "lambda_acc_vs_lr.png")

    # 5. the paper's figure 1: joined interpolations in each window of the base run (first seed)
    base = next((s for s in stats if s["config"] == f"mlp_lr{lrtag(cfg['base_lr'])}_b{cfg['base_batch']}"
                 and s["seed"] == cfg["seeds"][0]), None)
    if base:
        it, fl = table(Path(base["_res"]), "interpolation"), table(Path(base["_res"]), "floor")
        alphas = np.asarray(it["_config"]["options"]["alphas"])
        wins = list(base["windows"].items())
        fig, ax = plt.subplots(1, len(wins), figsize=(10, 2.8))
        for a_, (lab, _w) in zip(ax, wins):
            a, b = base["_windows"][list(base["windows"]).index(lab)]
            m = select(it, a, b)
            a_.plot((it["step_a"][m][:, None] + alphas[None, :-1]).ravel(), it["loss"][m][:, :-1].ravel(), lw=0.8)
            mf = select(fl, a, b)
            a_.plot(fl["step_a"][mf] + fl["a_star"][mf], fl["floor_loss"][mf], "r.", ms=2)
            a_.set_title(f"{lab}: steps {a}–{b}")
            a_.set_xlabel("SGD step (t + a)")
        ax[0].set_ylabel("training loss on subset:2000 (nats)")
        fig.suptitle(f"lr {base['lr']:g}, batch {base['batch']}, seed {base['seed']}: loss along consecutive updates "
                     "(red dots: valley floors)", fontsize=9)
        save(fig, "interpolation_windows.png")
    return made


def _shrink(path: Path) -> None:
    """Quantise a figure to a 64-colour palette: line plots stay sharp at a fraction of the size."""
    try:
        from PIL import Image
    except ImportError:
        return
    im = Image.open(path).convert("RGB")
    im.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def try_report(runner: Runner, stats: list[dict], out: Path, cfg: dict) -> list[str]:
    """`sgdwalk report` per sweep (first seed of each configuration; the report labels runs by the
    hyperparameters that differ), when that command exists."""
    probe = subprocess.run([*runner.sgdwalk, "report", "--help"], capture_output=True, text=True, env=runner.env)
    if probe.returncode != 0:
        print("sgdwalk report is not available here: the study's own figures only", flush=True)
        return []
    made = []
    seed = cfg["seeds"][0]
    for g in ("lr", "batch", "ratio", "drop", "bn"):
        runs = [s for s in stats if g in s["groups"] and s["seed"] == seed]
        if not runs:
            continue
        files = [f"runs/{s['name']}.results.h5" for s in runs]
        extra = []
        if g == "drop":
            d = runs[0]["drop"] or runs[-1]["drop"]
            extra = ["--window", f"{d[0] - 25}:{d[0] + 25}"]
        dest = f"report/{g}"
        try:
            runner(["report", *files, *extra, "--format", "png", "-q", "-o", dest], f"report {g}", (dest + "/report.html",))
            made.append(dest)
        except SystemExit as err:
            print(f"warning: sgdwalk report failed for {g}: {err}", flush=True)
    return made


# ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "study_out"), help="output folder (default: study_out/ in the repo, git-ignored)")
    ap.add_argument("--quick", action="store_true", help="a tiny version of the study (smoke run, < 1 min)")
    ap.add_argument("--sgdwalk", default=None, help="launcher of the sgdwalk CLI (default: `sgdwalk` on PATH, else next to python)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--figures-dir", default=None, help="also copy the figures here (e.g. docs/figures/reproduction)")
    ap.add_argument("--force", action="store_true", help="rerun every command even if its outputs exist")
    ap.add_argument("--no-report", action="store_true", help="do not call `sgdwalk report` even if it exists")
    args = ap.parse_args()

    t_start = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.sgdwalk:
        launcher = shlex.split(args.sgdwalk)
    else:
        exe = shutil.which("sgdwalk") or str(Path(sys.executable).parent / "sgdwalk")
        if not Path(exe).exists():
            raise SystemExit("error: sgdwalk is not installed (pip install .), or pass --sgdwalk CMD")
        launcher = [exe]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)

    runs = build_runs(cfg)
    print(f"{len(runs)} runs, output in {out}", flush=True)
    R = Runner(out, launcher, args.threads, args.force)
    t0 = time.perf_counter()
    run_all(runs, cfg, R, args.device)
    t_commands = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = []
    for run in runs:
        st = run_stats(run, out, cfg)
        st["_res"] = str(out / "runs" / f"{run.name}.results.h5")
        st["_windows"] = [list(w) for w in run.windows.values()]
        stats.append(st)
    agg_ = aggregate(stats)
    corr = correlations(stats)
    pool = pooled(stats)
    figs = figures(stats, agg_, cfg, out / "figures")
    reports = [] if args.no_report else try_report(R, stats, out, cfg)
    if "report/drop" in reports and (out / "report/drop/interpolation.png").exists():
        p = out / "figures" / "report_lr_drop_interpolation.png"      # sgdwalk report's own figure, kept too
        shutil.copy2(out / "report/drop/interpolation.png", p)
        _shrink(p)
        figs.append(p)
    t_summary = time.perf_counter() - t0
    if args.figures_dir:
        dst = Path(args.figures_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for p in figs:
            shutil.copy2(p, dst / p.name)

    import torch as _t
    fresh = [t for t in R.timings if not t.get("skipped")]
    summary = {
        "study": "quick" if args.quick else "full",
        "design": {k: v for k, v in cfg.items()},
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "device": args.device, "torch": _t.__version__},
        "seconds": {"commands_this_invocation": round(t_commands, 1), "summary_and_figures": round(t_summary, 1),
                    "total_this_invocation": round(time.perf_counter() - t_start, 1),
                    "commands_recorded": round(sum(t["seconds"] for t in R.timings), 1),
                    "by_kind": _by_kind(R.timings)},
        "commands_run_now": len(fresh), "commands_skipped": len(R.timings) - len(fresh),
        "configs": agg_, "correlations_lr_sweep": corr, "pooled": pool,
        "runs": [{k: v for k, v in s.items() if not k.startswith("_") and k not in ("dist_curve", "test_curve")} for s in stats],
        "figures": [str(p) for p in figs], "reports": reports,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    md = markdown(agg_, cfg)
    md += "\n## Across the lr sweep (Spearman rank correlation over runs)\n\n```\n" + json.dumps(corr, indent=1) + "\n```\n"
    md += "\n## Pooled over the MLP sweep runs (lr, batch, ratio)\n\n```\n" + json.dumps(pool, indent=1) + "\n```\n"
    (out / "summary.md").write_text(md)
    total = time.perf_counter() - t_start
    print(f"\nwrote {out / 'summary.json'}, {out / 'summary.md'}, {len(figs)} figures in {out / 'figures'}")
    print(f"commands: {len(fresh)} run now ({t_commands:.0f} s), {len(R.timings) - len(fresh)} skipped; "
          f"sgdwalk time of all commands as recorded: {summary['seconds']['commands_recorded']:.0f} s")
    print(f"total wall time of this invocation: {total:.0f} s ({total / 60:.1f} min)")


def _by_kind(timings: list[dict]) -> dict:
    out: dict[str, float] = {}
    for t in timings:
        k = " ".join(t["label"].split()[:2]) if t["label"].startswith("analyze") else t["label"].split()[0]
        out[k] = round(out.get(k, 0.0) + t["seconds"], 1)
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


if __name__ == "__main__":
    main()
