"""Barriers, dips and floor-sequence peaks along the valley floor.

Floor points φ_t = θ(a*_t) (buffers interpolated likewise); for each span k the path φ_t → φ_{t+k} is
sampled at ``barrier_points`` evenly spaced points (ends included) on the data of pair t, and

    barrier = max(path) − max(path ends)      (how far the straight path rises above both ends; >= 0)
    dip     = min(path ends) − min(path)      (how far it falls below both ends; >= 0)

A dip means the two floors are not minima of the straight line between them: the valley floor found
segment by segment is not the valley's bottom (issue 13: dips are common, barriers rare).

Floor-sequence peaks: the floor losses of the pairs met by the units, in pair order, are a sequence
F_0, F_1, ...; a peak is a local maximum of it and its prominence is how far it stands above the higher
of its two bases (:func:`scipy.signal.find_peaks` with ``prominence``; :func:`floor_peaks`). Peaks are a
run-level quantity, computed by :meth:`Barriers.summarize` from the stored ``floor_a``/``floor_b`` columns.

Thresholds (``barrier_tol`` = τ, ``tol_kind``) decide ``has_barrier``, ``has_dip`` and which peaks count:

* ``abs`` (default, today's behaviour): the value must exceed τ nats;
* ``rel``: τ × the floor height of pair t (``height_a``; for a peak, the height of the peak's pair);
* ``se``:  τ standard errors of the value. Barrier/dip SEs are paired SEs of the loss difference on the
  same units, sd(u_max − u_end)/sqrt(U) from the per-unit losses of ``ctx.evaluate_lines(..., units=True)``
  (:mod:`~trajectory.analysis.stderr`: samples, or BatchNorm groups under ``--bn train``);
  a peak's SE is sqrt(se_peak² + se_base²) of the floor losses (``floor_se`` of the floor table),
  conservative since floors on the same samples are positively correlated. Without that API the ``se``
  kind is refused with one error line.

Units are (t, k) with both pair t and pair t+k among the selected pairs (k counts records).

Columns: ``barrier``, ``has_barrier``, ``beta_max`` (position of the path maximum in [0, 1]), ``dip``,
``has_dip``, ``beta_min``, ``barrier_se``, ``dip_se`` (NaN without the SE API), ``floor_a``, ``floor_b``
(floor losses of pairs t and t+k), ``height_a``, ``height_b`` (their floor heights), ``floor_a_se``,
``floor_b_se`` (the floor table's ``floor_se`` where it has one, else NaN), ``path_loss``
(barrier_points,), ``nonfinite``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.signal import find_peaks

from ..errors import AnalysisError
from ..metric import Metric
from ..options import parse_spans

try:  # paired standard errors (issue 13 item 1); absent from builds before it
    from ..stderr import diff_se
except ImportError:  # pragma: no cover - only in builds without the SE module
    diff_se = None

__all__ = ["Barriers", "TOL_KINDS", "path_barrier_dip", "floor_peaks", "threshold"]

TOL_KINDS = ("abs", "rel", "se")


def _has_units(ctx: Any) -> bool:
    """Whether the evaluation returns per-unit losses (``evaluate_lines(..., units=True)``) for paired SEs."""
    if diff_se is None:
        return False
    try:
        return "units" in inspect.signature(ctx.evaluate_lines).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _col(rows: Mapping[str, np.ndarray], name: str, k: int) -> float:
    """rows[name][k], NaN when the column does not exist (floor tables without standard errors)."""
    return float(rows[name][k]) if name in rows else float("nan")


def path_barrier_dip(loss: np.ndarray) -> tuple[float, int, float, int]:
    """(barrier, index of the path maximum, dip, index of the path minimum) of a sampled path, ends included."""
    loss = np.asarray(loss, dtype=np.float64)
    jmax, jmin = int(np.argmax(loss)), int(np.argmin(loss))
    ends = (float(loss[0]), float(loss[-1]))
    return float(loss[jmax] - max(ends)), jmax, float(min(ends) - loss[jmin]), jmin


def threshold(kind: str, tol: float, height: float = math.nan, se: float = math.nan) -> float:
    """The margin a barrier, dip or prominence must exceed: τ (abs), τ·height (rel) or τ·SE (se)."""
    if kind == "abs":
        return tol
    if kind == "rel":
        return tol * height
    return tol * se


def floor_peaks(floors: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of a floor-loss sequence: (indices, prominences, left bases, right bases).

    Non-finite floors split the sequence: peaks are searched within each finite run, so a NaN never
    creates or hides a peak."""
    f = np.asarray(floors, dtype=np.float64)
    idx, prom, lb, rb = [], [], [], []
    ok = np.isfinite(f)
    start = 0
    while start < len(f):
        if not ok[start]:
            start += 1
            continue
        end = start
        while end < len(f) and ok[end]:
            end += 1
        if end - start >= 3:
            p, props = find_peaks(f[start:end], prominence=(None, None))
            idx.extend(p + start)
            prom.extend(props["prominences"])
            lb.extend(props["left_bases"] + start)
            rb.extend(props["right_bases"] + start)
        start = end
    as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_int(idx), np.asarray(prom, dtype=np.float64), as_int(lb), as_int(rb)


class Barriers(Metric):
    name = "barriers"
    version = 2  # 2: dip, beta_min, has_dip, *_se, floor_a/b, height_a/b columns; tol_kind option
    requires = ("floor",)
    keys = ("pair", "span")
    unit_options = ("spans",)
    defaults = {"spans": [1], "barrier_points": 11, "barrier_tol": 1e-3, "tol_kind": "abs"}
    description = "barriers and dips between valley-floor points k records apart, floor-sequence peaks"

    def validate(self) -> None:
        o = self.options
        o["spans"] = parse_spans(o["spans"])
        o["barrier_points"] = int(o["barrier_points"])
        o["barrier_tol"] = float(o["barrier_tol"])
        if o["barrier_points"] < 3:
            raise AnalysisError("barrier_points must be >= 3")
        if o["tol_kind"] not in TOL_KINDS:
            raise AnalysisError(f"tol_kind {o['tol_kind']!r}: expected one of {', '.join(TOL_KINDS)} "
                                "(nats, times the floor height, or standard errors)")
        if not math.isfinite(o["barrier_tol"]) or o["barrier_tol"] < 0:
            raise AnalysisError("barrier_tol must be a finite number >= 0")

    def units(self, pairs: Sequence[int]) -> list[tuple[int, ...]]:
        have = set(int(p) for p in pairs)
        return [(int(p), k) for p in pairs for k in self.options["spans"] if int(p) + k in have]

    def needs(self, unit: tuple[int, ...]) -> Sequence[int]:
        return (unit[0], unit[0] + unit[1])

    def _nan_row(self, n: int, fl: tuple, ht: tuple, fse: tuple, loss: np.ndarray | None = None) -> dict[str, Any]:
        nan = float("nan")
        return {"barrier": nan, "has_barrier": False, "beta_max": nan, "dip": nan, "has_dip": False, "beta_min": nan,
                "barrier_se": nan, "dip_se": nan, "floor_a": fl[0], "floor_b": fl[1], "height_a": ht[0], "height_b": ht[1],
                "floor_a_se": fse[0], "floor_b_se": fse[1], "path_loss": np.full(n, nan) if loss is None else loss, "nonfinite": True}

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        o = self.options
        n, kind, tol = o["barrier_points"], o["tol_kind"], o["barrier_tol"]
        with_units = _has_units(ctx)
        if kind == "se" and not with_units:
            raise AnalysisError("tol_kind=se needs paired standard errors, which this build's evaluation does not provide; "
                                "use tol_kind=abs or rel")
        betas = np.linspace(0.0, 1.0, n)
        ra = ctx.rows("floor", [u[0] for u in units])
        rb = ctx.rows("floor", [u[0] + u[1] for u in units])
        lines, idx = [], []
        rows: list[dict[str, Any] | None] = [None] * len(units)
        for k, u in enumerate(units):
            a1, a2 = float(ra["a_star"][k]), float(rb["a_star"][k])
            fl = (float(ra["floor_loss"][k]), float(rb["floor_loss"][k]))
            ht = (float(ra["height"][k]), float(rb["height"][k]))
            fse = (_col(ra, "floor_se", k), _col(rb, "floor_se", k))
            if not (np.isfinite(a1) and np.isfinite(a2)):
                rows[k] = self._nan_row(n, fl, ht, fse)
                continue
            t, t2 = u[0], u[0] + u[1]
            phi_a = ctx.line(ctx.state(t), ctx.state(t + 1), [a1])[0]
            phi_b = ctx.line(ctx.state(t2), ctx.state(t2 + 1), [a2])[0]
            lines.append((phi_a, phi_b, betas, t))
            idx.append((k, fl, ht, fse))
        results = ctx.evaluate_lines(lines, units=True) if with_units else ctx.evaluate_lines(lines)
        for (k, fl, ht, fse), res in zip(idx, results):
            loss = res[0]
            if not np.all(np.isfinite(loss)):
                rows[k] = self._nan_row(n, fl, ht, fse, loss)
                continue
            b, jmax, d, jmin = path_barrier_dip(loss)
            hi_end = 0 if loss[0] >= loss[-1] else n - 1  # the end the barrier is measured from
            lo_end = 0 if loss[0] <= loss[-1] else n - 1  # the end the dip is measured from
            per = res[2] if with_units and len(res) > 2 else None
            b_se = float(diff_se(per[jmax], per[hi_end])) if per is not None else float("nan")
            d_se = float(diff_se(per[lo_end], per[jmin])) if per is not None else float("nan")
            rows[k] = {
                "barrier": b, "has_barrier": bool(b > threshold(kind, tol, ht[0], b_se)), "beta_max": float(betas[jmax]),
                "dip": d, "has_dip": bool(d > threshold(kind, tol, ht[0], d_se)), "beta_min": float(betas[jmin]),
                "barrier_se": b_se, "dip_se": d_se, "floor_a": fl[0], "floor_b": fl[1], "height_a": ht[0],
                "height_b": ht[1], "floor_a_se": fse[0], "floor_b_se": fse[1], "path_loss": loss, "nonfinite": False,
            }
        return rows  # type: ignore[return-value]

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float:
        """``barrier_points`` model evaluations per unit (exact; units whose floor is NaN cost nothing, counted anyway)."""
        return float(len(units) * self.options["barrier_points"] * ctx.eval_size)

    @staticmethod
    def floor_sequence(rows: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pairs, floor losses, floor heights, floor SEs) of every pair met by a unit, in pair order."""
        seen: dict[int, tuple[float, float, float]] = {}
        for p, s, fa, fb, ha, hb, sa, sb in zip(rows["pair"], rows["span"], rows["floor_a"], rows["floor_b"],
                                                rows["height_a"], rows["height_b"], rows["floor_a_se"], rows["floor_b_se"]):
            seen.setdefault(int(p), (float(fa), float(ha), float(sa)))
            seen.setdefault(int(p) + int(s), (float(fb), float(hb), float(sb)))
        pairs = np.asarray(sorted(seen), dtype=np.int64)
        vals = np.asarray([seen[int(p)] for p in pairs], dtype=np.float64).reshape(-1, 3)
        return pairs, vals[:, 0], vals[:, 1], vals[:, 2]

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        spans = rows["span"]
        nan = float("nan")
        for k in np.unique(spans):
            sel = (spans == k) & ~rows["nonfinite"].astype(bool)
            entry = {
                "spans": int((spans == k).sum()),
                "barrier_fraction": float(np.mean(rows["has_barrier"][sel])) if sel.any() else nan,
                "median_barrier": float(np.median(rows["barrier"][sel])) if sel.any() else nan,
            }
            if "dip" in rows:  # version-1 tables have no dip
                entry["dip_fraction"] = float(np.mean(rows["has_dip"][sel])) if sel.any() else nan
                entry["median_dip"] = float(np.median(rows["dip"][sel])) if sel.any() else nan
            out[f"span{int(k)}"] = entry
        if "floor_a" in rows and len(spans):
            _, floors, heights, ses = self.floor_sequence(rows)
            idx, prom, lb, rb = floor_peaks(floors)
            kind, tol = self.options["tol_kind"], self.options["barrier_tol"]
            above = [p > threshold(kind, tol, heights[i], math.hypot(ses[i], ses[l if floors[l] >= floors[r] else r]))
                     for i, p, l, r in zip(idx, prom, lb, rb)]
            out["floor_peaks"] = int(len(idx))
            out["floor_peaks_above_tol"] = int(np.sum(above))
            out["max_prominence"] = float(np.max(prom)) if len(prom) else nan
        return out
