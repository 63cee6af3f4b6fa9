#!/usr/bin/env python
"""Study of issue 14's dynamics metrics on the reproduction study's lr and batch sweeps (MNIST-1D MLP).

Four questions, each answered with sgdwalk commands run as subprocesses (every command printed and appended to
OUT/commands.sh) and study-side arithmetic on their results:

1. Does the gradient noise scale B_simple (``gradients``, noise=sample, subset:2000, float64) explain the
   batch-size effects? B_simple at every record of the four 50-update windows, compared with the batch sizes 16,
   64 and 256 and with the measured batch effects (height above the floor, distance from θ₀, final test loss).
2. How much of the height lies in the top-5 Hessian directions? ``eigen_split`` k=5 at the first records of each
   window (one Lanczos per record), the metric's share_top and a floor-based share computed from its curves.
3. Is θ₀ → θ_T monotonic? ``sgdwalk line RUN.h5:first RUN.h5:last`` (21 points, subset:2000 and test).
4. Are two seeds linearly connected at the end? ``sgdwalk line S0.h5:last S1.h5:last``.

    python benchmarks/dynamics_study.py --out /tmp/dyn                 # full study, one CPU thread
    python benchmarks/dynamics_study.py --quick --out /tmp/dynq        # smoke run, < 1 min
    python benchmarks/dynamics_study.py --out /tmp/dyn --figures-dir docs/figures/dynamics

Resumable: a command whose outputs exist (marker files under OUT/done/, the reproduction study's Runner) is
skipped, so an interrupted study continues where it stopped. The training runs are those of docs/reproduction.md
(same commands, 100 epochs) except that only seeds 0 and 1 are run and only what the questions need is recorded:
the four 50-update windows (epochs 1, 10, 25 and the last 50 updates, which include the last step) and one state per
epoch. Results in docs/reproduction.md, section "Beyond the update line".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduction_study import Runner, _cpu_name, _jsonable, _shrink, archive_ok, lrtag, table  # noqa: E402

N_TRAIN = 4000          # MNIST-1D training split at the zoo defaults (5000 samples, 80 % train)

FULL = dict(
    epochs=100, window=50, window_epochs=(1, 10, 25), seeds=(0, 1),
    lrs=(0.05, 0.1, 0.2, 0.5, 1.0), base_lr=0.1, base_batch=64, batches=(16, 64, 256),
    split_pairs=5,           # eigen_split: the first N pairs of each window, one Lanczos each
    grad_every=25,           # gradients: every K-th record of each window (2 of the 50)
    line_points=21,
    targets=(1.0, 0.8, 0.6, 0.4),   # training losses (subset:2000) for steps-to-target S(B)
    eval="subset:2000",      # training-loss evaluation data of every analysis and line
)
QUICK = dict(FULL, epochs=3, window=10, window_epochs=(1, 2), lrs=(0.1,), batches=(64,), split_pairs=2,
             line_points=5, targets=(2.0, 1.5), eval="subset:256")


@dataclass
class Run:
    lr: float
    batch: int
    seed: int
    epochs: int
    windows: dict = field(default_factory=dict)       # label -> (first pair step, last pair step + 1)
    groups: set = field(default_factory=set)

    @property
    def config(self) -> str:
        return f"mlp_lr{lrtag(self.lr)}_b{self.batch}"

    @property
    def name(self) -> str:
        return f"{self.config}_s{self.seed}"

    @property
    def spe(self) -> int:
        return N_TRAIN // self.batch

    @property
    def steps(self) -> int:
        return self.epochs * self.spe


def build_runs(cfg: dict) -> list[Run]:
    runs: dict[str, Run] = {}
    W = cfg["window"]

    def add(lr: float, batch: int, seed: int, group: str) -> None:
        r = Run(lr, batch, seed, cfg["epochs"])
        if r.name not in runs:
            for e in cfg["window_epochs"]:
                a = (e - 1) * r.spe
                r.windows[f"e{e}"] = (a, a + W)
            r.windows["end"] = (r.steps - W, r.steps)
            runs[r.name] = r
        runs[r.name].groups.add(group)

    for s in cfg["seeds"]:
        for lr in cfg["lrs"]:
            add(lr, cfg["base_batch"], s, "lr")
        for b in cfg["batches"]:
            add(cfg["base_lr"], b, s, "batch")
    return list(runs.values())


def schedule(run: Run) -> str:
    """The four windows (every step; the end window holds the last step) and one state per epoch."""
    wins = ",".join(f"{a}-{b + 1}:1" for a, b in run.windows.values())
    return f"window:{wins}+every:{run.spe}"


def train_all(runs: list[Run], R: Runner, device: str) -> None:
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] train {run.name} (lr {run.lr:g}, batch {run.batch}, {run.steps} steps)", flush=True)
        arch = f"runs/{run.name}.h5"
        fresh = not archive_ok(R.out / arch)
        if fresh:
            for p in (R.out / "runs").glob(f"{run.name}.*"):
                if p.name != f"{run.name}.h5":
                    p.unlink()
        R(["train", "--model", "mlp", "--lr", lrtag(run.lr), "--batch-size", str(run.batch), "--steps", str(run.steps),
           "--seed", str(run.seed), "--record", schedule(run), "--device", device, "--no-progress", "--overwrite",
           "--out", arch], f"train {run.name}", (arch,), force=fresh)


def line_name(kind: str, config: str, seed: int | None, ev: str) -> str:
    tag = "subset" if ev.startswith("subset") else ev
    return f"lines/{config}{'' if seed is None else f'_s{seed}'}.{kind}.{tag}.json"


def line_evals(cfg: dict) -> tuple[str, str]:
    """The two evaluation sets of every line: the training subset and the test split."""
    return (cfg["eval"], "test")


def analyze_all(runs: list[Run], cfg: dict, R: Runner, device: str) -> None:
    (R.out / "lines").mkdir(exist_ok=True)
    W, K, P = cfg["window"], cfg["grad_every"], cfg["split_pairs"]
    pts = f"0:1:{cfg['line_points']}"
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] analyze {run.name}", flush=True)
        arch = f"runs/{run.name}.h5"
        base = ["--device", device, "-q"]
        gsteps = ",".join(f"{a}:{b}:{K}" for a, b in run.windows.values())
        res = f"runs/{run.name}.gradients.results.h5"
        R(["analyze", arch, "-m", "gradients", "--option", "noise=sample", "--eval", cfg["eval"], "--dtype", "float64",
           "--steps", gsteps, *base, "-o", res], f"analyze gradients {run.name}", (res,))
        esteps = ",".join(f"{a}:{a + min(P, W)}" for a, _ in run.windows.values())
        res = f"runs/{run.name}.eigen.results.h5"
        ev_ = [] if cfg["eval"] == "subset:2000" else ["--eval", cfg["eval"]]    # subset:2000 is the default
        R(["analyze", arch, "-m", "eigen_split", "--k", "5", "--steps", esteps, *ev_, *base, "-o", res],
          f"analyze eigen_split {run.name}", (res,))
        # the training loss at every record (one state per epoch + the windows): steps to a target loss
        res = f"runs/{run.name}.loss.results.h5"
        R(["analyze", arch, "-m", "interpolation", "--alphas", "0,1", "--eval", cfg["eval"], "--dtype", "float64",
           *base, "-o", res], f"analyze loss {run.name}", (res,))
        for ev in line_evals(cfg):
            out = line_name("first_last", run.config, run.seed, ev)
            R(["line", f"{arch}:first", f"{arch}:last", "--eval", ev, "--alphas", pts, "--device", device, "--out", out],
              f"line first_last {run.name}", (out,))
    configs: dict[str, list[Run]] = {}
    for run in runs:
        configs.setdefault(run.config, []).append(run)
    for c, rs in configs.items():
        rs = sorted(rs, key=lambda r: r.seed)
        for a, b in zip(rs, rs[1:]):
            for ev in line_evals(cfg):
                out = line_name(f"seeds{a.seed}{b.seed}", c, None, ev)
                R(["line", f"runs/{a.name}.h5:last", f"runs/{b.name}.h5:last", "--eval", ev, "--alphas", pts,
                   "--device", device, "--out", out], f"line seeds {c}", (out,))


# ----------------------------------------------------------------------------------------------
# Reading results (study-side arithmetic on sgdwalk's columns)
# ----------------------------------------------------------------------------------------------

def med(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def in_window(t: dict, a: int, b: int) -> np.ndarray:
    return (t["step_a"] >= a) & (t["step_a"] < b) & (t["step_b"] - t["step_a"] == 1)


def max_rise(loss: np.ndarray, se: np.ndarray) -> tuple[float, float]:
    """Largest increase L(t_j) − L(t_i), t_j > t_i, along the line, and the unpaired SE bound √(se_i² + se_j²).

    0 when the curve is monotonically non-increasing. The line's JSON holds per-point SEs only (the chunks are
    paired, so the true SE of the difference is at most this bound when the chunk errors correlate positively)."""
    best, bse = 0.0, 0.0
    for j in range(1, len(loss)):
        i = int(np.argmin(loss[:j]))
        if loss[j] - loss[i] > best:
            best, bse = float(loss[j] - loss[i]), float(math.hypot(se[i], se[j]))
    return best, bse


def steps_to(steps: np.ndarray, loss: np.ndarray, target: float) -> float:
    """First step at which the training loss is <= target, linearly interpolated between records (NaN: never)."""
    o = np.argsort(steps)
    s, l = steps[o].astype(float), loss[o]
    hit = np.nonzero(l <= target)[0]
    if not len(hit):
        return float("nan")
    j = int(hit[0])
    if j == 0:
        return float(s[0])
    return float(s[j - 1] + (l[j - 1] - target) / (l[j - 1] - l[j]) * (s[j] - s[j - 1]))


def run_stats(run: Run, out: Path, cfg: dict) -> dict:
    d = out / "runs"
    g = table(d / f"{run.name}.gradients.results.h5", "gradients")
    e = table(d / f"{run.name}.eigen.results.h5", "eigen_split")
    lo = table(d / f"{run.name}.loss.results.h5", "interpolation")
    st: dict = {"name": run.name, "config": run.config, "lr": run.lr, "batch": run.batch, "seed": run.seed,
                "steps": run.steps, "steps_per_epoch": run.spe, "groups": sorted(run.groups), "windows": {}}
    for lab, (a, b) in run.windows.items():
        mg, me = in_window(g, a, b), in_window(e, a, b)
        bs = g["b_simple"][mg]
        L0 = e["loss_full"][me][:, 0]
        h_full = L0 - e["loss_full"][me].min(axis=1)        # height above the floor on the update's line
        h_top = L0 - e["loss_top"][me].min(axis=1)          # the same along the top-5 component alone
        h_rest = L0 - e["loss_rest"][me].min(axis=1)
        with np.errstate(all="ignore"):
            fshare = h_top / h_full
            ratio = g["actual_change"][mg] / g["pred_change"][mg]
        st["windows"][lab] = {
            "grad_records": int(mg.sum()),
            "b_simple": med(bs), "b_simple_min": float(np.min(bs)) if len(bs) else float("nan"),
            "b_simple_max": float(np.max(bs)) if len(bs) else float("nan"),
            "batch_over_b_simple": run.batch / med(bs),
            "grad_norm": med(g["grad_norm"][mg]), "trace_sigma": med(g["trace_sigma"][mg]),
            "cos_update": med(g["cos_update"][mg]), "loss": med(g["loss"][mg]),
            "pred_change": med(g["pred_change"][mg]), "actual_change": med(g["actual_change"][mg]),
            "actual_over_pred": med(ratio),
            "split_pairs": int(me.sum()),
            "share_top": med(e["share_top"][me]), "share_rest": med(e["share_rest"][me]),
            "top_fraction": med(e["top_fraction"][me]),
            "interaction_rel": med(e["interaction"][me] / np.abs(e["height_full"][me])),
            "height_floor": med(h_full), "height_floor_top": med(h_top), "height_floor_rest": med(h_rest),
            "floor_share_top": med(fshare),
            "lambda_max": med(e["eigenvalues"][me][:, 0]), "lanczos_converged": float(np.mean(e["converged"][me])),
        }
    steps = np.concatenate([lo["step_a"], lo["step_b"][-1:]])
    loss = np.concatenate([lo["loss"][:, 0], lo["loss"][-1:, 1]])
    steps, idx = np.unique(steps, return_index=True)
    loss = loss[idx]
    st["steps_to_target"] = {f"{t:g}": steps_to(steps, loss, t) for t in cfg["targets"]}
    st["loss_curve"] = [steps.tolist(), loss.tolist()]
    st["train_loss_final"] = float(loss[-1])
    for ev in line_evals(cfg):
        j = json.loads((out / line_name("first_last", run.config, run.seed, ev)).read_text())
        L, S = np.asarray(j["loss"], dtype=float), np.asarray([np.nan if v is None else v for v in j["loss_se"]], dtype=float)
        rise, rise_se = max_rise(L, S)
        key = "subset" if ev.startswith("subset") else ev
        st[f"line_{key}"] = {"monotonic": bool(j["monotonic"]), "max_rise": rise, "max_rise_se": rise_se,
                             "max_rise_over_se": rise / rise_se if rise_se > 0 else (0.0 if rise == 0 else float("inf")),
                             "barrier": j["barrier"], "barrier_se": j["barrier_se"], "loss_start": float(L[0]),
                             "loss_end": float(L[-1]), "loss_end_se": float(S[-1]), "acc_end": float(j["acc"][-1]),
                             "floor_t": j["floor_t"], "distance": j["distance"], "curve": [j["t"], j["loss"]]}
    return st


def seed_lines(runs: list[Run], out: Path, cfg: dict) -> dict:
    res: dict = {}
    configs = sorted({r.config for r in runs}, key=lambda c: [r for r in runs if r.config == c][0].lr * 1000 + [r for r in runs if r.config == c][0].batch)
    for c in configs:
        seeds = sorted(r.seed for r in runs if r.config == c)
        for a, b in zip(seeds, seeds[1:]):
            for ev in line_evals(cfg):
                j = json.loads((out / line_name(f"seeds{a}{b}", c, None, ev)).read_text())
                bse = j["barrier_se"] if j["barrier_se"] is not None else float("nan")
                key = "subset" if ev.startswith("subset") else ev
                barrier = float(j["barrier"])
                res.setdefault(c, {})[key] = {
                    "seeds": [a, b], "barrier": barrier, "barrier_se": bse, "barrier_t": j["barrier_t"],
                    "barrier_over_se": barrier / bse if bse and bse > 0 else float("nan"),
                    "connected": bool(barrier <= 2 * bse or barrier < 1e-3),
                    "loss_ends": [j["loss"][0], j["loss"][-1]], "loss_mid": j["loss"][len(j["loss"]) // 2],
                    "acc_ends": [j["acc"][0], j["acc"][-1]], "acc_mid": j["acc"][len(j["acc"]) // 2],
                    "distance": j["distance"], "curve": [j["t"], j["loss"]]}
    return res


def agg(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "n": 0, "values": []}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
            "values": [float(x) for x in v]}


WKEYS = ("b_simple", "batch_over_b_simple", "grad_norm", "trace_sigma", "cos_update", "loss", "actual_over_pred",
         "share_top", "top_fraction", "interaction_rel", "height_floor", "height_floor_top", "floor_share_top",
         "lambda_max")
LKEYS = ("max_rise", "max_rise_se", "max_rise_over_se", "barrier", "loss_start", "loss_end", "loss_end_se", "acc_end",
         "distance")


def aggregate(stats: list[dict], cfg: dict) -> dict:
    out: dict = {}
    for s in stats:
        out.setdefault(s["config"], []).append(s)
    res = {}
    for c, ss in sorted(out.items(), key=lambda kv: (kv[1][0]["batch"], kv[1][0]["lr"])):
        labs = list(ss[0]["windows"])
        r = {"lr": ss[0]["lr"], "batch": ss[0]["batch"], "groups": ss[0]["groups"], "seeds": [s["seed"] for s in ss],
             "windows": {lab: {k: agg(s["windows"][lab][k] for s in ss) for k in WKEYS} for lab in labs},
             "steps_to_target": {t: agg(s["steps_to_target"][t] for s in ss) for t in ss[0]["steps_to_target"]},
             "train_loss_final": agg(s["train_loss_final"] for s in ss)}
        for key in ("subset", "test"):
            r[f"line_{key}"] = {k: agg(s[f"line_{key}"][k] for s in ss) for k in LKEYS}
            r[f"line_{key}"]["monotonic_runs"] = int(sum(s[f"line_{key}"]["monotonic"] for s in ss))
        res[c] = r
    return res


def critical_batch(agg_: dict, cfg: dict) -> dict:
    """Fit S(B) = S_min (1 + B_crit / B) to the steps-to-target of the batch sweep (lr fixed): least squares of S
    on 1/B, per target loss; McCandlish et al. 2018 predict B_crit ≈ B_simple (eq. 2.11 / 2.12)."""
    bs = sorted((c for c in agg_.values() if "batch" in c["groups"]), key=lambda c: c["batch"])
    out = {}
    for t in cfg["targets"]:
        key = f"{t:g}"
        B = np.array([c["batch"] for c in bs], dtype=float)
        S = np.array([c["steps_to_target"][key]["mean"] for c in bs])
        if len(bs) < 2 or not np.all(np.isfinite(S)):       # no fit: fewer than two batch sizes or a target not reached
            out[key] = {"batches": B.tolist(), "steps": S.tolist(), "s_min": float("nan"), "b_crit": float("nan"),
                        "epochs": (S * B / N_TRAIN).tolist()}
            continue
        A = np.stack([np.ones_like(B), 1.0 / B], axis=1)
        (s_min, s_min_bc), *_ = np.linalg.lstsq(A, S, rcond=None)
        out[key] = {"batches": B.tolist(), "steps": S.tolist(), "epochs": (S * B / N_TRAIN).tolist(),
                    "s_min": float(s_min), "b_crit": float(s_min_bc / s_min) if s_min > 0 else float("nan")}
    return out


def fmt(x: float, d: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.{d - 1}e}"
    return f"{x:.{d}g}" if abs(x) < 1 else f"{x:.{d + 1}g}"


def pm(a: dict, d: int = 2) -> str:
    return f"{fmt(a['mean'], d)} ± {fmt(a['sd'], 1)}" if a["n"] > 1 else fmt(a["mean"], d)


def markdown(agg_: dict, seeds: dict, crit: dict, cfg: dict) -> str:
    cs = list(agg_.items())
    labs = list(cs[0][1]["windows"])
    head = "| config | " + " | ".join(labs) + " |\n|---|" + "---|" * len(labs) + "\n"
    md = ["# Dynamics study: tables (mean ± sd over seeds " + ", ".join(map(str, cfg["seeds"])) + ")\n"]
    md.append("## Q1. B_simple (median over the window's gradient records; subset:2000, float64, noise=sample)\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["b_simple"]) for l in labs) + " |\n")
    md.append("\nB / B_simple\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["batch_over_b_simple"]) for l in labs) + " |\n")
    md.append("\nactual / first-order predicted loss change (median)\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["actual_over_pred"]) for l in labs) + " |\n")
    md.append("\nheight above the floor (first pairs of each window, eigen_split's full-update curve, float32)\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["height_floor"]) for l in labs) + " |\n")
    md.append("\nsteps to a training loss (subset:2000) and the fit S(B) = S_min(1 + B_crit/B) over the batch sweep\n\n")
    md.append("| target | " + " | ".join(f"B={int(b)}" for b in next(iter(crit.values()), {}).get("batches", [])) +
              " | S_min | B_crit |\n|---|" + "---|" * (len(next(iter(crit.values()), {}).get("batches", [])) + 2) + "\n")
    for t, v in crit.items():
        md.append(f"| {t} | " + " | ".join(f"{fmt(s, 3)} steps ({fmt(e, 2)} ep)" for s, e in zip(v["steps"], v["epochs"]))
                  + f" | {fmt(v['s_min'], 3)} | {fmt(v['b_crit'], 3)} |\n")
    md.append("\n## Q2. Height share in the top-5 directions (median over the first pairs of each window)\n\n"
              "floor-based share (L(θ_t) − min along d_top) / (L(θ_t) − min along d)\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["floor_share_top"]) for l in labs) + " |\n")
    md.append("\neigen_split share_top = height_top / height_full (end-point heights)\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["share_top"]) for l in labs) + " |\n")
    md.append("\ntop_fraction ‖d_top‖²/‖d‖²\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["top_fraction"]) for l in labs) + " |\n")
    md.append("\nλ_max at the window's first pairs\n\n" + head)
    for c, r in cs:
        md.append(f"| {c} | " + " | ".join(pm(r["windows"][l]["lambda_max"]) for l in labs) + " |\n")
    md.append("\n## Q3. θ₀ → θ_T (max rise L(t_j) − L(t_i), t_j > t_i, with the unpaired SE bound)\n\n"
              "| config | monotonic (subset) | max rise (subset) | rise / SE | monotonic (test) | max rise (test) | rise / SE | "
              "L(θ₀) → L(θ_T) test |\n|---|---|---|---|---|---|---|---|\n")
    for c, r in cs:
        s, t = r["line_subset"], r["line_test"]
        md.append(f"| {c} | {s['monotonic_runs']}/{s['max_rise']['n']} | {pm(s['max_rise'])} | {pm(s['max_rise_over_se'])} | "
                  f"{t['monotonic_runs']}/{t['max_rise']['n']} | {pm(t['max_rise'])} | {pm(t['max_rise_over_se'])} | "
                  f"{fmt(t['loss_start']['mean'], 3)} → {pm(t['loss_end'], 3)} |\n")
    md.append("\n## Q4. Two seeds at the end: barrier max(path) − max(ends) ± SE (10 paired chunks)\n\n"
              "| config | barrier (subset) | / SE | connected | barrier (test) | / SE | connected | midpoint acc (test) | ‖θ_A − θ_B‖ |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    for c, v in seeds.items():
        s, t = v["subset"], v["test"]
        md.append(f"| {c} | {fmt(s['barrier'], 3)} ± {fmt(s['barrier_se'], 2)} | {fmt(s['barrier_over_se'], 3)} | "
                  f"{'yes' if s['connected'] else 'no'} | {fmt(t['barrier'], 3)} ± {fmt(t['barrier_se'], 2)} | "
                  f"{fmt(t['barrier_over_se'], 3)} | {'yes' if t['connected'] else 'no'} | "
                  f"{fmt(t['acc_mid'], 3)} (ends {fmt(t['acc_ends'][0], 3)}, {fmt(t['acc_ends'][1], 3)}) | {fmt(s['distance'], 3)} |\n")
    return "".join(md)


def figures(stats: list[dict], agg_: dict, seeds: dict, cfg: dict, figdir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (NullFormatter below)

    figdir.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100, "lines.linewidth": 1.2})
    made: list[Path] = []

    def save(fig, name: str) -> None:
        p = figdir / name
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        _shrink(p)
        made.append(p)

    lr_c = sorted([c for c in agg_.values() if "lr" in c["groups"]], key=lambda c: c["lr"])
    b_c = sorted([c for c in agg_.values() if "batch" in c["groups"]], key=lambda c: c["batch"])
    labs = list(next(iter(agg_.values()))["windows"])
    # 1. B_simple: lr sweep, batch sweep against B, loss curves of the batch sweep
    fig, ax = plt.subplots(1, 3, figsize=(10, 3))
    for lab in labs:
        ax[0].errorbar([c["lr"] for c in lr_c], [c["windows"][lab]["b_simple"]["mean"] for c in lr_c],
                       yerr=[c["windows"][lab]["b_simple"]["sd"] for c in lr_c], marker="o", ms=3, capsize=2, label=lab)
        ax[1].errorbar([c["batch"] for c in b_c], [c["windows"][lab]["b_simple"]["mean"] for c in b_c],
                       yerr=[c["windows"][lab]["b_simple"]["sd"] for c in b_c], marker="o", ms=3, capsize=2, label=lab)
    bb = [c["batch"] for c in b_c]
    if bb:
        ax[1].plot(bb, bb, "k--", lw=0.8, label="B_simple = B")
    for a_, x in ((ax[0], "learning rate (batch 64)"), (ax[1], "batch size (lr 0.1)")):
        a_.set_xscale("log")
        a_.set_yscale("log")
        a_.set_xlabel(x)
        a_.set_ylabel("median B_simple = tr(Σ)/‖g‖²")
        a_.legend(fontsize=7, title="window")
    if bb:
        ax[1].set_xticks(bb, [str(b) for b in bb])
        ax[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for s in sorted([s for s in stats if "batch" in s["groups"] and s["seed"] == cfg["seeds"][0]], key=lambda s: s["batch"]):
        st, lo = np.asarray(s["loss_curve"][0]), np.asarray(s["loss_curve"][1])
        ax[2].plot(np.maximum(st, 1), lo, lw=0.8, label=f"B = {s['batch']}")
    for t in cfg["targets"]:
        ax[2].axhline(t, color="0.6", lw=0.5, ls=":")
    ax[2].set_xscale("log")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("SGD step")
    ax[2].set_ylabel("training loss (subset:2000)")
    ax[2].set_title("batch sweep, lr 0.1 (dotted: target losses)")
    ax[2].legend(fontsize=7)
    save(fig, "b_simple.png")

    # 2. top-5 share of the height vs lr
    fig, ax = plt.subplots(1, 2, figsize=(10, 3))
    for lab in labs:
        for a_, key in ((ax[0], "floor_share_top"), (ax[1], "top_fraction")):
            a_.errorbar([c["lr"] for c in lr_c], [c["windows"][lab][key]["mean"] for c in lr_c],
                        yerr=[c["windows"][lab][key]["sd"] for c in lr_c], marker="o", ms=3, capsize=2, label=lab)
    ax[0].set_ylabel("median height share, top 5")
    ax[1].set_ylabel("median ‖d_top‖² / ‖d‖²")
    for a_ in ax:
        a_.set_xscale("log")
        a_.set_xlabel("learning rate (batch 64)")
        a_.axhline(1, color="0.6", lw=0.5, ls=":")
        a_.legend(fontsize=7, title="window")
    save(fig, "top5_share.png")

    # 3. lines: θ₀ → θ_T (first seed, subset) and seed 0 ↔ seed 1 (test)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3))
    for s in sorted([s for s in stats if s["seed"] == cfg["seeds"][0]], key=lambda s: (s["batch"], s["lr"])):
        t, lo = s["line_subset"]["curve"]
        ax[0].plot(t, lo, lw=0.8, label=f"lr {s['lr']:g}, B {s['batch']}")
    for c, v in seeds.items():
        t, lo = v["test"]["curve"]
        ax[1].plot(t, lo, lw=0.8, label=f"lr {agg_[c]['lr']:g}, B {agg_[c]['batch']}")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("t on θ₀ + t(θ_T − θ₀)")
    ax[0].set_ylabel("training loss (subset:2000)")
    ax[0].set_title(f"θ₀ → θ_T, seed {cfg['seeds'][0]}")
    ax[1].set_xlabel("t on θ_T(seed 0) + t(θ_T(seed 1) − θ_T(seed 0))")
    ax[1].set_ylabel("test loss (1000 samples)")
    ax[1].set_title("two seeds' end points")
    for a_ in ax:
        a_.legend(fontsize=6)
    save(fig, "lines.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dyn", help="output folder (default /tmp/dyn)")
    ap.add_argument("--quick", action="store_true", help="a tiny version of the study (smoke run, < 1 min)")
    ap.add_argument("--sgdwalk", default=None, help="launcher of the sgdwalk CLI (default: `sgdwalk` next to python)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-only", action="store_true", help="only the training runs")
    ap.add_argument("--figures-dir", default=None, help="also copy the figures here (e.g. docs/figures/dynamics)")
    ap.add_argument("--force", action="store_true", help="rerun every command even if its outputs exist")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    exe = shutil.which("sgdwalk") or str(Path(sys.executable).parent / "sgdwalk")
    launcher = shlex.split(args.sgdwalk) if args.sgdwalk else [exe]
    runs = build_runs(cfg)
    R = Runner(out, launcher, args.threads, args.force)
    t0 = time.perf_counter()
    train_all(runs, R, args.device)
    if args.train_only:
        return
    analyze_all(runs, cfg, R, args.device)
    t_commands = time.perf_counter() - t0
    stats = [run_stats(r, out, cfg) for r in runs]
    agg_ = aggregate(stats, cfg)
    seeds = seed_lines(runs, out, cfg)
    crit = critical_batch(agg_, cfg)
    figs = figures(stats, agg_, seeds, cfg, out / "figures")
    if args.figures_dir:
        dst = Path(args.figures_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for p in figs:
            shutil.copy2(p, dst / p.name)
    import torch
    fresh = [t for t in R.timings if not t.get("skipped")]
    by_kind: dict[str, float] = {}
    for t in R.timings:
        k = t["label"].split()[0] if t["label"].startswith("train") else " ".join(t["label"].split()[:2])
        by_kind[k] = round(by_kind.get(k, 0.0) + t["seconds"], 1)
    summary = {
        "study": "quick" if args.quick else "full",
        "design": cfg,
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "device": args.device, "torch": torch.__version__},
        "seconds": {"commands_this_invocation": round(t_commands, 1),
                    "commands_recorded": round(sum(t["seconds"] for t in R.timings), 1), "by_kind": by_kind,
                    "total_this_invocation": round(time.perf_counter() - t_start, 1)},
        "commands_run_now": len(fresh), "commands_skipped": len(R.timings) - len(fresh),
        "configs": agg_, "seed_lines": seeds, "critical_batch": crit,
        "runs": [{k: v for k, v in s.items() if k != "loss_curve"} for s in stats],
        "figures": [str(p) for p in figs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    # this design's commands (run now or skipped as done); commands.sh also keeps those of interrupted designs
    (out / "commands_used.sh").write_text("#!/bin/sh\n# the study's commands, in order, run in this folder\nset -e\n"
                                          + "".join(t["command"] + "\n" for t in R.timings))
    md = markdown(agg_, seeds, crit, cfg)
    (out / "summary.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {len(figs)} figures in {out / 'figures'}")
    print(f"commands: {len(fresh)} run now, {len(R.timings) - len(fresh)} skipped; sgdwalk time of all commands as "
          f"recorded: {summary['seconds']['commands_recorded']:.0f} s; by kind: {by_kind}")
    print(f"total wall time of this invocation: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
