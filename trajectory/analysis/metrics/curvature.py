"""Curvature metrics: top Hessian eigenvalues, Hessian trace, spectral density, sharpness.

Each metric evaluates the curvature of the run's loss (same evaluation data, BatchNorm policy, loss, device and
dtype as every other metric; ``--eval minibatch`` uses the pair's own minibatch) at one point per pair:

* ``at: "record"`` (default) the state θ_i of the pair's first record;
* ``at: "floor"``  the valley-floor point θ(a*) = θ_i + a*·(θ_{i+1} − θ_i) of the ``floor`` metric
  (buffers interpolated too).

All four declare ``requires = ("floor",)`` so that ``at: "floor"`` always has its rows; the floor rows are cheap
next to curvature (tens of forward passes per pair against hundreds for curvature) and are stored as usual.

Random vectors are drawn from a generator seeded by (``seed``, pair, metric), so a row does not depend on
which other pairs run with it, and the same configuration gives the same numbers. ``sharpness``'s Lanczos start
vector is ``hessian_top``'s, so that in one run the top eigenpair at a point is computed once and shared through
the run's cache (:mod:`trajectory.analysis.curvature.runcache`); rows equal those of separate runs.

``hvp=auto`` (default) uses the HVP mode and data chunk measured fastest on the run's first curvature unit
(:mod:`trajectory.analysis.curvature.autotune`; ``choice()`` tells which); it is stored as ``rev`` in the options,
hence in the configuration hash, because every choice gives the same values to float rounding. ``cost()`` estimates
the work in sample-forward equivalents, and every loss, gradient and HVP is reported to
``ctx.evaluator.on_samples`` as it happens (progress).

``hessian_top``   columns ``eigenvalues`` (k,), ``residuals`` (k,) = ‖Hv − λv‖ (explicit), ``lambda_max``
                  (= eigenvalues[0]), ``lr``, ``eos_ratio``, ``momentum``, ``eos_threshold``, ``loss``, ``a``, ``iters``,
                  ``matvecs``, ``converged``; ``eigenvectors`` (k·n_params,) only with ``store_vectors``.
``hessian_trace`` ``trace``, ``trace_se``, ``trace_per_param``, ``matvecs``, ``loss``, ``a``.
``hessian_esd``   ``density`` (grid,), ``grid_lo``, ``grid_hi``, ``sigma``, ``nodes`` and ``weights``
                  (esd_probes·esd_iters,; NaN/0 padding), ``moment1``, ``moment2`` (of the quadrature,
                  estimates of tr(H)/n and tr(H²)/n), ``ritz_min``, ``ritz_max``, ``matvecs``, ``a``.
``sharpness``     ``loss``, ``eps_sharpness`` (Keskar, percent), ``eps_increase``, ``gauss_increase``,
                  ``gauss_se``, ``lambda_max``, ``lambda_residual``, ``lr``, ``eos_ratio``, ``momentum``,
                  ``eos_threshold``, ``a``.

Edge of stability: ``eos_threshold`` is the curvature at which SGD with the recorded momentum β turns unstable,
(2 + 2β)/lr for heavy ball (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge
of stability", appendix on momentum; dampening and Nesterov in :func:`~trajectory.analysis.curvature.sharpness.
eos_critical_step`), 2/lr without momentum; ``eos_ratio`` = λ_max/eos_threshold = λ_max·lr/(2 + 2β), 1 at the edge.
β comes from the archive's ``optimizer`` attribute (first parameter group); NaN (and threshold 2/lr) for recorded
optimizers other than SGD.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..curvature.autotune import apply, measure
from ..curvature.linalg import gaussian_density, hutchinson, hutchpp, slq, top_eigen
from ..curvature.objective import COST_GRAD, COST_HVP, COST_LOSS, HVP_MODES, OPERATORS, objective_for
from ..curvature.runcache import fingerprint, run_cache
from ..curvature.sharpness import eos_critical_step, eps_sharpness, gaussian_increase, sgd_momentum
from ..errors import AnalysisError
from ..metric import Metric

__all__ = ["HessianTop", "HessianTrace", "HessianESD", "Sharpness", "UpdateAlignment"]

_COMMON = {"at": "record", "seed": 0, "hvp": "auto", "operator": "hessian"}
HVP_CHOICES = ("auto", *HVP_MODES)
#: seed tag of the Lanczos start vector that hessian_top and sharpness share (hessian_top's own tag), so that
#: both compute the same top eigenpair at a point and one may reuse the other's (:meth:`_Curvature.top_eigenpairs`)
EIGEN_STREAM = 1
_BLOCK = 8  # vectors per batched HVP pass


#: Upper bound of every integer curvature option: sizes are checked before anything is allocated (a row holds k
#: floats per eigenpair, Lanczos keeps iters vectors), so a typo such as --k 100000000 is one error line, not a hang.
MAX_INT_OPTION = 1_000_000
#: Most eigenpairs one metric computes (full reorthogonalisation keeps k + iters vectors of the model's size).
MAX_K = 1000


def _int(o: dict, key: str, lo: int = 1, hi: int = MAX_INT_OPTION) -> None:
    try:
        v = int(o[key])
    except (TypeError, ValueError, OverflowError):
        raise AnalysisError(f"option {key}={str(o[key])[:40]!r} is not an integer") from None
    if v < lo or v > hi or v != float(o[key]):
        raise AnalysisError(f"option {key}={str(o[key])[:40]!r}: expected an integer from {lo} to {hi}")
    o[key] = v


def _pos(o: dict, key: str, allow_zero: bool = False) -> None:
    try:
        v = float(o[key])
    except (TypeError, ValueError):
        raise AnalysisError(f"option {key}={o[key]!r} is not a number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise AnalysisError(f"option {key}={o[key]!r}: expected a {'non-negative' if allow_zero else 'positive'} number")
    o[key] = v


def _choice(o: dict, key: str, choices: Sequence[str]) -> None:
    if o[key] not in choices:
        raise AnalysisError(f"option {key}={o[key]!r}: expected one of {', '.join(choices)}")


class _Curvature(Metric):
    requires = ("floor",)
    tag = 0

    def validate(self) -> None:
        o = self.options
        _choice(o, "at", ("record", "floor"))
        _choice(o, "hvp", HVP_CHOICES)
        _choice(o, "operator", OPERATORS)
        _int(o, "seed", 0, hi=2**63 - 1)
        # 'auto' is stored as 'rev' in the options, hence in the configuration hash: every mode and chunk gives the
        # same products to float rounding, and results files written when 'rev' was the default stay reusable
        self.hvp_request = o["hvp"]
        if o["hvp"] == "auto":
            o["hvp"] = "rev"
        self._choice: dict[str, Any] | None = None
        self._external = 0.0

    def generator(self, pair: int, tag: int | None = None) -> torch.Generator:
        s = np.random.SeedSequence([int(self.options["seed"]), int(pair), self.tag if tag is None else tag]).generate_state(2)
        return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))

    def points(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[tuple[torch.Tensor | None, float]]:
        """(state, a) per unit; state None where the floor is not finite."""
        pairs = [u[0] for u in units]
        if self.options["at"] == "record":
            return [(ctx.state(p), 0.0) for p in pairs]
        a_star = np.asarray(ctx.rows("floor", pairs)["a_star"], dtype=np.float64)
        out = []
        for p, a in zip(pairs, a_star):
            out.append((ctx.segment(p, [float(a)])[0], float(a)) if math.isfinite(a) else (None, float("nan")))
        return out

    def objective(self, ctx: Any, state: torch.Tensor | None, pair: int):
        """The :class:`Objective` at ``state`` with the run's HVP mode and chunk: the option's mode, or under
        ``hvp=auto`` the fastest measured on the run's first curvature unit (shared by the run's curvature metrics
        through :func:`run_cache`; not timed when the data are sharded across ranks, which must cut alike)."""
        if state is None or not bool(torch.isfinite(state).all()):
            return None
        o = self.options
        obj = objective_for(ctx, state, pair, hvp=o["hvp"], operator=o["operator"])
        if obj is None:
            return None
        if self.hvp_request != "auto":
            self._choice = {"hvp": obj.hvp_mode, "chunk": obj.chunk, "by": "option", "device": str(obj.device)}
            return obj
        cache = run_cache(ctx.evaluator)
        key = ("hvp", o["operator"])
        choice = cache.choices.get(key)
        if choice is None:
            if obj._reduce is not None:  # data sharded across ranks: they must cut the data alike, so no timing
                choice = {"hvp": obj.hvp_mode, "chunk": obj.chunk, "by": "default (data sharded)", "device": str(obj.device)}
            else:
                choice = measure(obj, state[: ctx.n_params], seed=int(o["seed"]))
            cache.choices[key] = choice
        self._choice = choice
        return apply(obj, choice)

    def choice(self) -> dict[str, Any] | None:
        """How this metric computed its Hessian-vector products in this run (None before its first unit):
        ``{"hvp": "rev"|"fwd", "chunk": samples per data batch, "by": "auto"|"option"|..., "device": ...}`` and, when
        measured, ``"rates"`` (sample-HVPs per second per "mode/chunk" candidate) and ``"samples_per_s"``. Not part of
        the configuration: the engine may store it with the table (the choice never changes a value beyond rounding)."""
        return None if self._choice is None else dict(self._choice)

    # ------------------------------------------------------------------ shared top eigenpairs
    def top_eigenpairs(self, ctx: Any, obj, p: torch.Tensor, pair: int, a: float, *, k: int, iters: int, tol: float,
                       method: str, which: str, stream: int, need_vectors: bool):
        """Top-k eigenpairs at p, from the run's cache when another metric already computed them at this point with
        the same options and the same seeded start vector (``stream``: the tag seeding it), else computed and cached."""
        o = self.options
        key = ("top_eigen", int(pair), o["at"], float(a), fingerprint(p), o["operator"], obj.hvp_mode, int(o["seed"]),
               int(stream), int(k), int(iters), float(tol), method, which)
        cache = run_cache(ctx.evaluator)
        r = cache.get_eigen(key, need_vectors)
        if r is None:
            r = top_eigen(obj.matmat(p, _BLOCK), p.numel(), k, iters=iters, tol=tol, which=which,
                          gen=self.generator(pair, stream), like=p, method=method)
            cache.put_eigen(key, r)
        return r

    # ------------------------------------------------------------------ work and progress
    def unit_cost(self, n_samples: int, n_params: int) -> float:
        """Upper estimate of one unit's work in sample-forward equivalents (a loss over one sample = 1, a gradient
        ~3, an HVP ~5) for ``n_samples`` evaluation samples, from the options alone."""
        raise NotImplementedError

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float | None:
        """Work of ``units`` in sample-forward equivalents (see :meth:`unit_cost`); None when the data size is unknown.
        An upper estimate: Lanczos may stop early and ``sharpness`` may reuse ``hessian_top``'s eigenpair. The
        progress hook is topped up to this estimate at the end of every unit, so the bar ends where it should."""
        try:
            return float(sum(self.unit_cost(_samples(ctx, u[0]), int(ctx.n_params)) for u in units))
        except Exception:  # noqa: BLE001 - an estimate must never break a run
            return None

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        hook = getattr(getattr(ctx, "evaluator", None), "on_samples", None)
        rows = []
        for u, (state, a) in zip(units, self.points(ctx, units)):
            obj = self.objective(ctx, state, u[0])
            tally = [0.0]
            self._external = 0.0
            row = None
            if obj is not None:
                if hook is not None:
                    def counted(n: float, tally=tally) -> None:
                        tally[0] += n
                        hook(n)

                    obj.on_samples = counted
                p = state[: ctx.n_params].detach()
                row = self.compute_one(ctx, u[0], obj, p, state, a)
            rows.append(row if row is not None else self.nan_row(ctx, a))
            if hook is not None:  # top up to the estimate (early Lanczos stop, reuse, NaN rows)
                try:
                    left = self.unit_cost(_samples(ctx, u[0]), int(ctx.n_params)) - tally[0] - self._external
                except Exception:  # noqa: BLE001
                    left = 0.0
                if left > 0:
                    hook(left)
        return rows

    def compute_one(self, ctx, pair, obj, p, state, a) -> dict[str, Any] | None:
        raise NotImplementedError

    def nan_row(self, ctx, a: float) -> dict[str, Any]:
        raise NotImplementedError


def _samples(ctx: Any, pair: int) -> int:
    """Evaluation samples of ``pair`` (0 when the pair has no data, e.g. multi-step pairs under --eval minibatch)."""
    data = ctx.data(pair)
    return 0 if data is None else len(data[0])


def recorded_optimizer(ctx: Any) -> Any:
    """The archive's ``optimizer`` attribute (class and hyperparameters, :func:`trajectory.recorder.optimizer_info`);
    "" when none was recorded (:attr:`ReplayContext.optimizer <trajectory.analysis.replay.ReplayContext.optimizer>`;
    a context without it counts as none)."""
    opt = getattr(ctx, "optimizer", "")
    return opt() if callable(opt) else opt


def eos_columns(ctx: Any, lam: float, lr: float) -> dict[str, float]:
    """``momentum`` β, ``eos_threshold`` (the λ at which SGD with the recorded momentum turns unstable:
    (2 + 2β)/lr for heavy ball, :func:`~trajectory.analysis.curvature.sharpness.eos_critical_step`) and
    ``eos_ratio`` = λ / eos_threshold. Optimizers other than SGD get β = NaN and the plain-SGD threshold 2/lr."""
    mom = sgd_momentum(recorded_optimizer(ctx))
    beta, crit = (math.nan, 2.0) if mom is None else (mom[0], eos_critical_step(*mom))
    thr = crit / lr if lr > 0 else math.nan
    return {"momentum": beta, "eos_threshold": thr, "eos_ratio": lam / thr if thr > 0 else math.nan}


def _med(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


_EIGEN = {"k": 1, "iters": 100, "tol": 1e-4, "eig_method": "lanczos", "eig_which": "LA"}


class _TopEigen(_Curvature):
    """Curvature metrics built on the top-k Hessian eigenpairs at the point (options of :data:`_EIGEN`)."""

    def validate(self) -> None:
        super().validate()
        o = self.options
        _int(o, "k", hi=MAX_K)
        _int(o, "iters")
        _pos(o, "tol")
        _choice(o, "eig_method", ("lanczos", "power"))
        _choice(o, "eig_which", ("LA", "LM"))

    def eigenpairs(self, ctx: Any, obj, p: torch.Tensor, pair: int, a: float, need_vectors: bool = False):
        """Top min(k, n) eigenpairs of the objective's operator at p, random start seeded by (seed, pair, metric)."""
        o = self.options
        return self.top_eigenpairs(ctx, obj, p, pair, a, k=min(o["k"], p.numel()), iters=o["iters"], tol=o["tol"],
                                   method=o["eig_method"], which=o["eig_which"], stream=self.tag, need_vectors=need_vectors)

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        o = self.options
        k = min(o["k"], n_params)
        steps = o["iters"] * k if o["eig_method"] == "power" else min(o["iters"], n_params) + k
        return n_samples * (COST_HVP * steps + COST_LOSS)

    def padded(self, values) -> np.ndarray:
        """A per-eigenpair column padded with NaN to the configured k (models with fewer parameters than k)."""
        values = np.asarray(values, dtype=np.float64)
        return np.pad(values, (0, self.options["k"] - len(values)), constant_values=np.nan)


class HessianTop(_TopEigen):
    name = "hessian_top"
    version = 2  # 2: eos_ratio momentum-aware (λ·lr/(2 + 2β) for heavy ball), momentum and eos_threshold columns
    tag = 1
    defaults = {**_COMMON, **_EIGEN, "store_vectors": False}
    description = "top-k Hessian eigenvalues by Lanczos, residuals, edge-of-stability ratio"

    def validate(self) -> None:
        super().validate()
        self.options["store_vectors"] = bool(self.options["store_vectors"])

    def compute_one(self, ctx, pair, obj, p, state, a):
        o = self.options
        r = self.eigenpairs(ctx, obj, p, pair, a, need_vectors=o["store_vectors"])
        k = len(r.values)
        lr = ctx.lr(pair)
        lam = float(r.values[0])
        row = {
            "eigenvalues": self.padded(r.values),
            "residuals": self.padded(r.residuals),
            "lambda_max": lam, "lr": lr, **eos_columns(ctx, lam, lr), "loss": obj.loss(p), "a": a,
            "iters": int(r.iters), "matvecs": int(r.matvecs), "converged": bool(r.converged),
        }
        if o["store_vectors"]:
            vec = torch.full((o["k"], p.numel()), float("nan"), dtype=torch.float64)
            vec[:k] = r.vectors.detach().double().cpu()
            row["eigenvectors"] = vec.reshape(-1).numpy()
        return row

    def nan_row(self, ctx, a):
        k, nan = self.options["k"], float("nan")
        row = {"eigenvalues": np.full(k, nan), "residuals": np.full(k, nan), "lambda_max": nan, "lr": nan,
               "eos_ratio": nan, "momentum": nan, "eos_threshold": nan, "loss": nan, "a": a, "iters": 0, "matvecs": 0, "converged": False}
        if self.options["store_vectors"]:
            row["eigenvectors"] = np.full(k * ctx.n_params, nan)
        return row

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        lam = np.asarray(rows.get("lambda_max", []), dtype=np.float64)
        if len(lam) == 0:
            return {}
        return {"pairs": len(lam), "median_lambda_max": _med(lam), "max_lambda_max": float(np.nanmax(lam)) if np.isfinite(lam).any() else float("nan"),
                "median_eos_ratio": _med(rows["eos_ratio"]), "converged_fraction": float(np.mean(rows["converged"]))}


class HessianTrace(_Curvature):
    name = "hessian_trace"
    version = 1
    tag = 2
    defaults = {**_COMMON, "trace_method": "hutch++", "probes": 30}
    description = "Hessian trace by Hutch++ (or Hutchinson) with its standard error"

    def validate(self) -> None:
        super().validate()
        _choice(self.options, "trace_method", ("hutchinson", "hutch++"))
        _int(self.options, "probes", 3 if self.options["trace_method"] == "hutch++" else 2)

    def compute_one(self, ctx, pair, obj, p, state, a):
        o = self.options
        mm, g = obj.matmat(p, _BLOCK), self.generator(pair)
        if o["trace_method"] == "hutchinson":
            tr, se, _ = hutchinson(mm, p.numel(), o["probes"], gen=g, like=p, block=_BLOCK)
            mv = o["probes"]
        else:
            tr, se, mv = hutchpp(mm, p.numel(), o["probes"], gen=g, like=p, block=_BLOCK)
        return {"trace": tr, "trace_se": se, "trace_per_param": tr / p.numel(), "matvecs": int(mv),
                "loss": obj.loss(p), "a": a}

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        return n_samples * (COST_HVP * self.options["probes"] + COST_LOSS)

    def nan_row(self, ctx, a):
        nan = float("nan")
        return {"trace": nan, "trace_se": nan, "trace_per_param": nan, "matvecs": 0, "loss": nan, "a": a}

    def summarize(self, rows):
        tr = rows.get("trace", [])
        return {"pairs": len(tr), "median_trace": _med(tr), "median_trace_se": _med(rows["trace_se"])} if len(tr) else {}


def _parse_grid(value) -> tuple[int, float | None, float | None]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n, lo, hi = int(value), None, None
    elif isinstance(value, str) and ":" in value:
        parts = value.split(":")
        try:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise AnalysisError(f"esd_grid {value!r}: use a point count or lo:hi:count") from None
        if len(parts) != 3 or not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise AnalysisError(f"esd_grid {value!r}: use a point count or lo:hi:count with hi > lo")
    else:
        try:
            n, lo, hi = int(value), None, None
        except (TypeError, ValueError):
            raise AnalysisError(f"esd_grid {value!r}: use a point count or lo:hi:count") from None
    if n < 2:
        raise AnalysisError(f"esd_grid {value!r}: need at least 2 points")
    return n, lo, hi


class HessianESD(_Curvature):
    name = "hessian_esd"
    version = 1
    tag = 3
    defaults = {**_COMMON, "esd_probes": 3, "esd_iters": 40, "esd_grid": 201, "esd_width": 0.01, "esd_sigma": 0.0}
    description = "Hessian eigenvalue density by stochastic Lanczos quadrature (Gaussian broadening)"

    def validate(self) -> None:
        super().validate()
        o = self.options
        _int(o, "esd_probes")
        _int(o, "esd_iters")
        _pos(o, "esd_width")
        _pos(o, "esd_sigma", allow_zero=True)
        _parse_grid(o["esd_grid"])

    def compute_one(self, ctx, pair, obj, p, state, a):
        o = self.options
        it = min(o["esd_iters"], p.numel())
        nodes, weights, mv = slq(obj.matmat(p, _BLOCK), p.numel(), o["esd_probes"], it, gen=self.generator(pair), like=p)
        if it < o["esd_iters"]:
            pad = o["esd_iters"] - it
            nodes = np.pad(nodes, ((0, 0), (0, pad)), constant_values=np.nan)
            weights = np.pad(weights, ((0, 0), (0, pad)))
        if not np.isfinite(nodes[weights > 0]).all():
            return None
        n_grid, lo, hi = _parse_grid(o["esd_grid"])
        tmin, tmax = float(np.nanmin(nodes)), float(np.nanmax(nodes))
        span = max(tmax - tmin, 1e-12 * max(abs(tmin), abs(tmax), 1e-300))
        sigma = o["esd_sigma"] if o["esd_sigma"] > 0 else o["esd_width"] * span
        if lo is None:
            lo, hi = tmin - 5 * sigma, tmax + 5 * sigma
        grid = np.linspace(lo, hi, n_grid)
        dens = gaussian_density(nodes, weights, grid, sigma)
        th = np.nan_to_num(nodes)
        m1 = float(np.mean((weights * th).sum(1)))
        m2 = float(np.mean((weights * th * th).sum(1)))
        return {"density": dens, "grid_lo": float(lo), "grid_hi": float(hi), "sigma": float(sigma),
                "nodes": nodes.reshape(-1), "weights": weights.reshape(-1), "moment1": m1, "moment2": m2,
                "ritz_min": tmin, "ritz_max": tmax, "matvecs": int(mv), "a": a}

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        o = self.options
        return n_samples * COST_HVP * o["esd_probes"] * min(o["esd_iters"], n_params)

    def nan_row(self, ctx, a):
        o, nan = self.options, float("nan")
        n_grid = _parse_grid(o["esd_grid"])[0]
        m = o["esd_probes"] * o["esd_iters"]
        return {"density": np.full(n_grid, nan), "grid_lo": nan, "grid_hi": nan, "sigma": nan, "nodes": np.full(m, nan),
                "weights": np.zeros(m), "moment1": nan, "moment2": nan, "ritz_min": nan, "ritz_max": nan, "matvecs": 0, "a": a}

    def summarize(self, rows):
        m1 = rows.get("moment1", [])
        return {"pairs": len(m1), "median_moment1": _med(m1), "median_ritz_max": _med(rows["ritz_max"])} if len(m1) else {}


class Sharpness(_Curvature):
    name = "sharpness"
    version = 2  # 2: eos_ratio momentum-aware (λ·lr/(2 + 2β) for heavy ball), momentum and eos_threshold columns
    tag = 4
    defaults = {**_COMMON, "eps": 1e-3, "ascent_steps": 10, "noise_scale": 0.01, "noise_draws": 8, "iters": 100, "tol": 1e-4}
    description = "Keskar ε-sharpness, Gaussian-perturbation loss increase, λ_max and the edge-of-stability ratio"

    def validate(self) -> None:
        super().validate()
        o = self.options
        _pos(o, "eps")
        _int(o, "ascent_steps", 0)
        _pos(o, "noise_scale", allow_zero=True)
        _int(o, "noise_draws", 1)
        _int(o, "iters")
        _pos(o, "tol")

    def compute_one(self, ctx, pair, obj, p, state, a):
        o = self.options
        g = self.generator(pair)
        keskar, inc, base = eps_sharpness(obj.loss_grad, obj.loss, p, o["eps"], o["ascent_steps"], gen=g)

        def losses_at(P: torch.Tensor) -> np.ndarray:
            states = state.unsqueeze(0).repeat(P.shape[0], 1)
            states[:, : ctx.n_params] = P.to(states.dtype)
            return ctx.evaluate(states, pair)[0]

        base_eval = float(ctx.evaluate(state.unsqueeze(0), pair)[0][0])
        gi, gse = gaussian_increase(losses_at, p, o["noise_scale"], o["noise_draws"], base_eval, gen=g)
        self._external += COST_LOSS * obj.n_data * (1 + o["noise_draws"])  # reported by the evaluator itself
        # hessian_top's Lanczos (same start vector, k=1): computed once per point in a run, whichever metric is first
        r = self.top_eigenpairs(ctx, obj, p, pair, a, k=1, iters=o["iters"], tol=o["tol"], method="lanczos", which="LA",
                                stream=EIGEN_STREAM, need_vectors=False)
        lr = ctx.lr(pair)
        lam = float(r.values[0])
        return {"loss": base, "eps_sharpness": keskar, "eps_increase": inc, "gauss_increase": gi, "gauss_se": gse,
                "lambda_max": lam, "lambda_residual": float(r.residuals[0]), "lr": lr, **eos_columns(ctx, lam, lr), "a": a}

    def unit_cost(self, n_samples: int, n_params: int) -> float:
        o = self.options
        steps = o["ascent_steps"]
        losses = 1 + (1 if steps > 0 else 0) + 1 + o["noise_draws"]
        return n_samples * (COST_GRAD * steps + COST_LOSS * losses + COST_HVP * (min(o["iters"], n_params) + 1))

    def nan_row(self, ctx, a):
        nan = float("nan")
        return {k: nan for k in ("loss", "eps_sharpness", "eps_increase", "gauss_increase", "gauss_se", "lambda_max",
                                 "lambda_residual", "lr", "eos_ratio", "momentum", "eos_threshold")} | {"a": a}

    def summarize(self, rows):
        s = rows.get("eps_sharpness", [])
        return {"pairs": len(s), "median_eps_sharpness": _med(s), "median_gauss_increase": _med(rows["gauss_increase"]),
                "median_eos_ratio": _med(rows["eos_ratio"])} if len(s) else {}


class UpdateAlignment(_TopEigen):
    """How much of each SGD update lies in the top-k Hessian eigenspace (the resubmission's claim that large-batch
    gradients align with the top eigenvectors).

    The update d = θ_{i+1} − θ_i is what the optimizer actually did: for plain SGD it is −lr·(minibatch gradient),
    so its direction is the gradient's; with momentum or weight decay it is the step taken, not the raw gradient.
    The eigenvectors are those of the evaluation-data Hessian at ``at`` (default the record θ_i, where the step
    started). A random direction has an expected top fraction of about sqrt(k / n_params), stored for reference.
    """

    name = "update_alignment"
    version = 1
    tag = 5
    defaults = {**_COMMON, **_EIGEN, "k": 5}
    description = "share of each update in the top-k Hessian eigenspace, and |cos| with each top eigenvector"

    def compute_one(self, ctx, pair, obj, p, state, a):
        n = p.numel()
        r = self.eigenpairs(ctx, obj, p, pair, a, need_vectors=True)
        k = len(r.values)
        d = (ctx.params(pair + 1) - ctx.params(pair)).to(p.device, torch.float64)
        norm = float(torch.linalg.vector_norm(d))
        V = r.vectors.to(torch.float64)
        proj = (V @ d).cpu().numpy() if norm > 0 else np.full(len(V), np.nan)
        cos = np.abs(proj) / norm if norm > 0 else proj
        return {
            "top_fraction": float(np.sqrt(np.nansum(proj ** 2)) / norm) if norm > 0 else float("nan"),
            "cos_top": self.padded(cos),
            "eigenvalues": self.padded(r.values),
            "random_fraction": float(np.sqrt(k / n)),
            "update_norm": norm, "lambda_max": float(r.values[0]), "a": a, "converged": bool(r.converged),
        }

    def nan_row(self, ctx, a):
        k, nan = self.options["k"], float("nan")
        return {"top_fraction": nan, "cos_top": np.full(k, nan), "eigenvalues": np.full(k, nan), "random_fraction": nan,
                "update_norm": nan, "lambda_max": nan, "a": a, "converged": False}

    def summarize(self, rows):
        f = rows.get("top_fraction", [])
        return {"pairs": len(f), "median_top_fraction": _med(f), "median_random_fraction": _med(rows["random_fraction"]),
                "median_cos_top1": _med(np.asarray(rows["cos_top"])[:, 0]) if len(f) else float("nan")} if len(f) else {}
