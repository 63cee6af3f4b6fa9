"""Valley floor of each update's segment, convexity of the sampled curve, and height above the floor.

The minimum of L(θ(a)) for a in [0, 1] is bracketed on the interpolation grid and refined with
bounded Brent (golden section plus parabolic steps) on the *true* loss, below the grid spacing:

* interior grid minimum a_j: Brent on [a_{j-1}, a_{j+1}];
* minimum at an end of the grid: the loss is probed just inside the end (max(4·xtol, 1e-4) away); if it
  is not lower, the floor is the end itself (not interior); otherwise Brent runs on the first (or last)
  grid interval, so a floor just inside the segment is still found.

Columns: ``a_star``, ``floor_loss``, ``floor_acc``, ``loss_a`` (L(θ_t)), ``loss_b`` (L(θ_{t+1})),
``height`` (per option ``height``: 'start' = L(θ_t) − floor, the default; 'max' = max(L(θ_t), L(θ_{t+1})) − floor),
``height_start``, ``height_max``, ``interior`` (a* strictly inside (0, 1) and below both ends),
``convex`` (sampled curve on [0, 1] convex within the tolerance), ``convex_interior`` (both),
``evals`` (loss evaluations spent by Brent), ``nonfinite`` (a NaN/Inf loss was met: the other values are NaN/False).

Standard errors (version 2, issue 13): ``floor_se``, ``loss_a_se``, ``loss_b_se`` (of the mean losses) and
``height_se``, ``height_start_se``, ``height_max_se`` (*paired*: the sd of the per-unit differences between the
end and the floor over sqrt(units)). They come from one extra evaluation of each segment at a = 0, a*, 1 with
per-unit losses (samples, or BatchNorm groups under ``--bn train``): :mod:`~trajectory.analysis.stderr`.

Option ``significance`` (Z, default 0 = the plain comparisons): ``interior`` then needs both end-minus-floor
differences to exceed Z paired standard errors, and ``convex`` lets each interior grid point exceed the chord
by Z times its loss standard error (interpolation's ``loss_se``) on top of the tolerance. A NaN standard error
(fewer than 2 units) with Z > 0 decides "not interior". The option enters the configuration only when non-zero.

Convexity tolerance: at every interior grid point, the loss may exceed the chord of its neighbours by
at most ``convex_tol`` × (max − min of the curve on [0, 1]) + 1e-7 × max|L| (float32 resolution).

Late in training a curve can be flatter than float32 can resolve. Per-sample losses carry rounding errors
of about eps·|logit| (1e-6 nats for logits near 10), so a mean loss whose whole range along the update is
below ~1e-6 nats has convexity, interior and a* decided by rounding. The metric warns once
(:data:`FLAT_CURVE_NATS`); ``--dtype float64`` resolves such curves.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..brent import bounded_brent, endpoint_brent, run_lockstep
from ..errors import AnalysisError
from ..metric import Metric
from ..options import parse_alphas
from ..stderr import diff_se, mean_se

__all__ = ["Floor", "floor_from_grid", "is_convex", "FLAT_CURVE_NATS"]

#: under float32, curves whose range along the update is below this many nats are rounding noise (warned)
FLAT_CURVE_NATS = 1e-6


def is_convex(a: np.ndarray, f: np.ndarray, tol: float, margin: np.ndarray | None = None) -> bool:
    """True if every interior point lies at most tol(·range) above the chord of its neighbours (plus ``margin``,
    per grid point, e.g. Z standard errors)."""
    if len(a) < 3:
        return True
    if not np.all(np.isfinite(f)):
        return False
    rng = float(np.max(f) - np.min(f))
    slack = tol * rng + 1e-7 * float(np.max(np.abs(f)))
    if margin is not None:
        slack = slack + np.nan_to_num(np.asarray(margin, dtype=np.float64)[1:-1], nan=0.0)
    a0, a1, a2 = a[:-2], a[1:-1], a[2:]
    chord = ((a2 - a1) * f[:-2] + (a1 - a0) * f[2:]) / (a2 - a0)
    return bool(np.all(f[1:-1] - chord <= slack))


def floor_from_grid(a: np.ndarray, f: np.ndarray) -> tuple[int, float, float]:
    """Index of the grid minimum and the Brent bracket [lo, hi] around it."""
    j = int(np.argmin(f))
    n = len(a)
    if 0 < j < n - 1:
        return j, float(a[j - 1]), float(a[j + 1])
    if j == 0:
        return j, float(a[0]), float(a[1])
    return j, float(a[n - 2]), float(a[n - 1])


class Floor(Metric):
    name = "floor"
    version = 2
    requires = ("interpolation",)
    defaults = {"alphas": parse_alphas(None), "height": "start", "convex_tol": 0.01, "xtol": 1e-5, "significance": 0.0}
    #: options left out of the configuration while at their default (so default hashes do not depend on them)
    hash_if_set = ("significance",)
    description = "valley floor, convexity and height above the floor"

    def validate(self) -> None:
        o = self.options
        o["alphas"] = parse_alphas(o["alphas"])
        if 0.0 not in o["alphas"] or 1.0 not in o["alphas"]:
            raise AnalysisError("the floor metric needs --alphas that include 0 and 1 (the segment's ends)")
        if o["height"] not in ("start", "max"):
            raise AnalysisError(f"height option {o['height']!r}: expected 'start' (L(θ_t) − floor) or 'max'")
        o["convex_tol"] = float(o["convex_tol"])
        o["xtol"] = float(o["xtol"])
        if not o["xtol"] > 0 or o["convex_tol"] < 0:
            raise AnalysisError("xtol must be > 0 and convex_tol >= 0")
        try:
            o["significance"] = float(o["significance"])
        except (TypeError, ValueError):
            raise AnalysisError(f"--significance {o['significance']!r}: expected a number of standard errors >= 0") from None
        if not (math.isfinite(o["significance"]) and o["significance"] >= 0):
            raise AnalysisError(f"--significance {o['significance']!r}: expected a number of standard errors >= 0")

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        al = np.asarray(self.options["alphas"])
        seg = (al >= 0.0) & (al <= 1.0)
        a = al[seg]
        curves = ctx.rows("interpolation", [u[0] for u in units])
        losses = np.asarray(curves["loss"])[:, seg]
        accs = np.asarray(curves["acc"])[:, seg]
        z = self.options["significance"]
        loss_ses = np.asarray(curves["loss_se"])[:, seg] if "loss_se" in curves else np.full_like(losses, np.nan)
        rows: list[dict[str, Any] | None] = [None] * len(units)
        gens, owners, gen_unit, seen = [], [], [], []
        for k, u in enumerate(units):
            f = losses[k]
            if not np.all(np.isfinite(f)):
                rows[k] = self._nonfinite_row(f)
                continue
            j, lo, hi = floor_from_grid(a, f)
            xtol = self.options["xtol"]
            if j == 0:
                gens.append(endpoint_brent(float(a[0]), float(f[0]), float(a[1]), xtol))
            elif j == len(a) - 1:
                gens.append(endpoint_brent(float(a[-1]), float(f[-1]), float(a[-2]), xtol))
            else:
                gens.append(bounded_brent(lo, hi, xtol))
            owners.append(u[0])
            gen_unit.append(k)
            seen.append({})

        def evaluate(reqs):
            lines = [(owners[g], owners[g] + 1, [x], owners[g]) for g, x in reqs]
            res = ctx.evaluate_lines(lines)
            out = []
            for (g, x), (l, c) in zip(reqs, res):
                seen[g][x] = (float(l[0]), float(c[0]))
                out.append(float(l[0]))
            return out

        if ctx.dtype == torch.float32:
            flat = [k for k in range(len(units)) if np.all(np.isfinite(losses[k])) and np.ptp(losses[k]) < FLAT_CURVE_NATS]
            if flat:
                warnings.warn(
                    f"some interpolation curves are flatter than {FLAT_CURVE_NATS:g} nats, below float32 resolution of the "
                    "loss: their convex/interior/a* values are rounding noise; rerun with --dtype float64", stacklevel=2)
        results = run_lockstep(gens, evaluate) if gens else []
        found = []
        for g, (xb, fb, nev) in enumerate(results):
            k = gen_unit[g]
            f = losses[k]
            j = int(np.argmin(f))
            fa, fb_end = float(f[0]), float(f[-1])
            if not math.isfinite(fb):
                rows[k] = self._nonfinite_row(f, evals=nev)
                continue
            if fb <= f[j] and xb in seen[g]:
                a_star, floor, facc = float(xb), float(fb), seen[g][xb][1]
            else:  # the grid point is better than anything Brent found (flat or noisy curve)
                a_star, floor, facc = float(a[j]), float(f[j]), float(accs[k][j])
            hs, hm = fa - floor, max(fa, fb_end) - floor
            rows[k] = {
                "a_star": a_star, "floor_loss": floor, "floor_acc": facc, "loss_a": fa, "loss_b": fb_end,
                "height": hs if self.options["height"] == "start" else hm, "height_start": hs, "height_max": hm,
                "evals": int(nev), "nonfinite": False,
            }
            found.append(k)
        # standard errors: the same units at a = 0, a*, 1 (one extra evaluation of three points per segment)
        se_res = ctx.evaluate_lines([(units[k][0], units[k][0] + 1, [0.0, rows[k]["a_star"], 1.0], units[k][0])
                                     for k in found], units=True) if found else []
        eps = 2 * self.options["xtol"]
        for k, (_l, _c, per) in zip(found, se_res):
            r = rows[k]
            per = np.asarray(per, dtype=np.float64)
            u0, us, u1 = per[0], per[1], per[2]
            se_a, se_b = diff_se(u0, us), diff_se(u1, us)
            se_max = se_a if r["loss_a"] >= r["loss_b"] else se_b
            r.update(floor_se=mean_se(us), loss_a_se=mean_se(u0), loss_b_se=mean_se(u1), height_start_se=se_a,
                     height_max_se=se_max, height_se=se_a if self.options["height"] == "start" else se_max)
            da, db = r["loss_a"] - r["floor_loss"], r["loss_b"] - r["floor_loss"]
            if z > 0:  # a NaN standard error compares False: not shown to be interior
                below = bool(da > z * se_a and db > z * se_b)
            else:
                below = bool(da > 0 and db > 0)
            r["interior"] = bool(eps < r["a_star"] < 1 - eps and below)
            r["convex"] = is_convex(a, losses[k], self.options["convex_tol"], z * loss_ses[k] if z > 0 else None)
            r["convex_interior"] = bool(r["interior"] and r["convex"])
        return rows  # type: ignore[return-value]

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """Brent evaluations: one probe when the grid minimum is an end (known once the interpolation row exists),
        else the golden-section bound for the bracket of two grid intervals down to ``xtol`` (Brent's parabolic
        steps usually need fewer). Units whose curve is not known yet count the mean of the two cases."""
        al = np.asarray(self.options["alphas"])
        a = al[(al >= 0.0) & (al <= 1.0)]
        width = 2.0 * float(np.max(np.diff(a)))
        interior = 1.0 + math.ceil(math.log(max(width / self.options["xtol"], 1.0)) / math.log((1 + math.sqrt(5)) / 2))
        seg = (al >= 0.0) & (al <= 1.0)
        total = 0.0
        for u in units:
            try:
                f = np.asarray(ctx.rows("interpolation", [u[0]])["loss"])[0, seg]
            except Exception:  # noqa: BLE001 - not computed yet (or not reachable): an estimate only
                total += (1.0 + interior) / 2
                continue
            if not np.all(np.isfinite(f)):
                continue
            j = int(np.argmin(f))
            total += 1.0 if j in (0, len(f) - 1) else interior
        return (total + 3.0 * len(units)) * ctx.eval_size  # + a = 0, a*, 1 again for the standard errors

    @staticmethod
    def _nonfinite_row(f: np.ndarray, evals: int = 0) -> dict[str, Any]:
        nan = float("nan")
        return {
            "a_star": nan, "floor_loss": nan, "floor_acc": nan, "loss_a": float(f[0]), "loss_b": float(f[-1]),
            "height": nan, "height_start": nan, "height_max": nan, "interior": False, "convex": False,
            "convex_interior": False, "evals": int(evals), "nonfinite": True, "floor_se": nan, "loss_a_se": nan,
            "loss_b_se": nan, "height_se": nan, "height_start_se": nan, "height_max_se": nan,
        }

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        n = len(rows["a_star"])
        if n == 0:
            return {}
        ok = ~rows["nonfinite"].astype(bool)
        h = rows["height"][ok]
        return {
            "pairs": n,
            "convex_interior_fraction": float(np.mean(rows["convex_interior"][ok])) if ok.any() else float("nan"),
            "convex_fraction": float(np.mean(rows["convex"][ok])) if ok.any() else float("nan"),
            "interior_fraction": float(np.mean(rows["interior"][ok])) if ok.any() else float("nan"),
            "median_height": float(np.median(h)) if len(h) else float("nan"),
            **({"median_height_se": float(np.nanmedian(rows["height_se"][ok])) if np.isfinite(rows["height_se"][ok]).any()
                else float("nan")} if "height_se" in rows else {}),
            "median_a_star": float(np.median(rows["a_star"][ok])) if ok.any() else float("nan"),
            "nonfinite_pairs": int((~ok).sum()),
        }
