"""The loss on the straight line between any two recorded points: two records of one archive, or of two archives.

Why: the update line answers local questions; two classic global ones need a line between arbitrary points:
is the loss monotonic on θ₀ → θ_T (monotonic linear interpolation, Lucas et al. 2021), and are two seeds'
solutions linearly connected (linear mode connectivity, Frankle et al. 2020)? :func:`analyze_line` evaluates

    θ(t) = θ_A + t·(θ_B − θ_A)      (parameters and floating buffers alike, as every segment of the analyzer)

on a grid of t with the run's model, data, evaluation set, dtype and BatchNorm policy (the replay's own
evaluator), and reports the same quantities as the segment metrics: the curve, its grid minimum (the floor),
the barrier max(path) − max(ends) of ``barriers`` and whether the curve is monotonically non-increasing. Standard
errors: the evaluation data are cut into ``se_chunks`` disjoint chunks, the curve evaluated on each, and the
paired batch-means standard error of every curve point and of the barrier reported (the same chunk for every t,
so the SE of the barrier is that of a paired difference). Two archives must have the same layout; the result
names both archives' identities (:func:`trajectory.analysis.identity.archive_identity`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..archive.reader import Trajectory
from .errors import AnalysisError
from .evaluator import has_batchnorm
from .identity import archive_identity
from .options import BN_POLICIES, DTYPES, LOSSES, check_choice, parse_alphas, parse_eval
from .replay import DataSource, auto_device, build_evaluator, resolve_eval_data, resolve_model

__all__ = ["Endpoint", "LineResult", "analyze_line", "parse_endpoint", "line_curve_stats"]


@dataclass(frozen=True)
class Endpoint:
    """One end of a line: an archive and the optimizer step of one of its records."""

    path: str
    step: int | str  # an optimizer step, or 'first' / 'last'


def parse_endpoint(text: str) -> Endpoint:
    """'run.h5:STEP' (STEP an integer step, 'first' or 'last') -> Endpoint; 'run.h5' alone means its last record."""
    if not isinstance(text, str) or not text.strip():
        raise AnalysisError("a line end must be ARCHIVE:STEP, e.g. run.h5:0 or run.h5:last")
    path, sep, step = text.rpartition(":")
    if not sep or not path:
        return Endpoint(text, "last")
    step = step.strip()
    if step in ("first", "last"):
        return Endpoint(path, step)
    try:
        return Endpoint(path, int(step))
    except ValueError:
        raise AnalysisError(f"line end {text!r}: the step after ':' must be an integer, 'first' or 'last'") from None


def _record(traj: Trajectory, step: int | str) -> int:
    steps = np.asarray(traj.steps)
    if step == "first":
        return 0
    if step == "last":
        return len(steps) - 1
    hit = np.nonzero(steps == int(step))[0]
    if len(hit) == 0:
        near = steps[np.argsort(np.abs(steps - int(step)))[:3]]
        raise AnalysisError(f"{traj.path} has no record at step {step}; nearest recorded steps: {', '.join(map(str, sorted(near)))}")
    return int(hit[0])


def max_rise(loss: np.ndarray) -> tuple[float, int, int]:
    """Largest increase along the curve, max over i < j of loss[j] − loss[i] (0 when it never rises), and (i, j).

    Why: "is θ₀ → θ_T monotonic?" (Lucas et al. 2021) is a yes/no that one noisy grid point flips; the largest rise
    with its paired standard error says by how much, and whether the evaluation data resolves it."""
    best, bi, bj = 0.0, 0, 0
    lo = 0  # index of the running minimum before j
    for j in range(1, len(loss)):
        if loss[j] - loss[lo] > best:
            best, bi, bj = float(loss[j] - loss[lo]), lo, j
        if loss[j] < loss[lo]:
            lo = j
    return best, bi, bj


def line_curve_stats(t: np.ndarray, loss: np.ndarray, tol: float = 0.0) -> dict[str, Any]:
    """Floor (grid minimum), barrier max(path) − max(ends), its position, monotonic non-increase (within tol) and
    the largest rise along the line (:func:`max_rise`) with the t of its two points."""
    if not np.all(np.isfinite(loss)):
        nan = float("nan")
        return {"floor_t": nan, "floor_loss": nan, "barrier": nan, "barrier_t": nan, "monotonic": False,
                "max_rise": nan, "max_rise_t": [nan, nan]}
    j = int(np.argmin(loss))
    k = int(np.argmax(loss))
    rise, ri, rj = max_rise(loss)
    return {"floor_t": float(t[j]), "floor_loss": float(loss[j]), "barrier": float(loss[k] - max(loss[0], loss[-1])),
            "barrier_t": float(t[k]), "monotonic": bool(np.all(np.diff(loss) <= tol)),
            "max_rise": rise, "max_rise_t": [float(t[ri]), float(t[rj])]}


@dataclass
class LineResult:
    """What :func:`analyze_line` measured (JSON-able through :meth:`to_dict`)."""

    t: list[float]
    loss: list[float]
    acc: list[float]
    loss_se: list[float]
    floor_t: float
    floor_loss: float
    barrier: float
    barrier_t: float
    barrier_se: float
    monotonic: bool
    distance: float  # ‖θ_B − θ_A‖ (parameters)
    max_rise: float = float("nan")  # largest loss[j] − loss[i] over i < j (0: never rises)
    max_rise_t: list[float] = field(default_factory=list)  # [t_i, t_j] of that rise
    max_rise_se: float = float("nan")  # its paired standard error over the SE chunks
    ends: list[dict[str, Any]] = field(default_factory=list)  # path, step, record, identity per end
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON (NaN written as null)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        with open(path, "w") as fh:
            json.dump(clean(self.to_dict()), fh, indent=1)


def analyze_line(a: str | Endpoint, b: str | Endpoint, *, alphas: str | Sequence[float] | None = None,
                 eval: str = "test", bn: str = "train", dtype: str = "float64", loss: str = "cross_entropy",
                 device: str | None = None, model: Any = None, data: Any = None, trust_specs: bool = False,
                 subset_seed: int = 0, bn_batch: int | None = None, bn_batches: int = 4, se_chunks: int = 10,
                 monotonic_tol: float = 0.0) -> LineResult:
    """Loss on the straight line from end ``a`` to end ``b`` (``'run.h5:STEP'`` or :class:`Endpoint`).

    The model and data come from ``a``'s archive (or the overrides, as in :func:`~trajectory.analysis.analyze`);
    ``b`` may be another archive with the same layout (two seeds, two learning rates). ``alphas`` is the grid of t
    (default 0, 0.05, ..., 1). ``--eval minibatch`` has no meaning between arbitrary points and is refused."""
    check_choice(bn, BN_POLICIES, "--bn")
    check_choice(dtype, DTYPES, "--dtype")
    check_choice(loss, LOSSES, "--loss")
    ea = parse_endpoint(a) if isinstance(a, str) else a
    eb = parse_endpoint(b) if isinstance(b, str) else b
    t = np.asarray(parse_alphas(alphas), dtype=np.float64)
    eval_spec = parse_eval(eval, subset_seed)
    if eval_spec.kind == "minibatch":
        raise AnalysisError("--eval minibatch has no minibatch between two arbitrary points; use test, train or subset:N")
    se_chunks = int(se_chunks)
    if se_chunks == 1 or se_chunks < 0:
        raise AnalysisError("se_chunks must be 0 (no standard errors) or >= 2")
    for e in (ea, eb):
        if not os.path.exists(e.path):
            raise AnalysisError(f"no such archive: {e.path}")
    ta = Trajectory(ea.path)
    tb = ta if os.path.abspath(eb.path) == os.path.abspath(ea.path) else Trajectory(eb.path)
    try:
        if tb is not ta and tb.layout != ta.layout:
            raise AnalysisError(f"{ea.path} and {eb.path} have different layouts (different models); a line between them is undefined")
        ia, ib = _record(ta, ea.step), _record(tb, eb.step)
        m, model_id = resolve_model(ta, model, trust_specs)
        if tb is not ta:
            tb.check_model(m)
        dev = auto_device(device)
        tdtype = torch.float64 if dtype == "float64" else torch.float32
        source = DataSource(ta, data, trust_specs)
        bn_eff = bn if has_batchnorm(m) else "none"
        evdata = resolve_eval_data(ta, source, [ia] if ia < len(ta) - 1 else [max(0, ia - 1)], np.ones(len(ta), bool),
                                   eval_spec, bn_eff, loss, bn_batch=bn_batch, bn_batches=bn_batches,
                                   subset_seed=subset_seed, device=dev, dtype=tdtype)
        ev = build_evaluator(m, ta, evdata, device=dev, dtype=tdtype, bn_eff=bn_eff, loss=loss, max_elems=None,
                             fast_path=True)
        sa = torch.cat([ta.params(ia), ta.buffers(ia)]).to(dev, tdtype)
        sb = torch.cat([tb.params(ib), tb.buffers(ib)]).to(dev, tdtype)
        w = torch.as_tensor(t, dtype=tdtype, device=dev).reshape(-1, 1)
        states = torch.lerp(sa.unsqueeze(0), sb.unsqueeze(0), w)
        x, y = evdata.eval_x, evdata.eval_y
        lv, acc = ev.evaluate(states, x, y)
        stats = line_curve_stats(t, lv, monotonic_tol)
        loss_se = np.full(len(t), np.nan)
        barrier_se = rise_se = float("nan")
        if se_chunks >= 2 and len(x) >= se_chunks:
            parts = torch.tensor_split(torch.arange(len(x), device=x.device), se_chunks)
            per = np.stack([ev.evaluate(states, x[p], y[p])[0] for p in parts])  # (chunks, len(t))
            loss_se = per.std(axis=0, ddof=1) / math.sqrt(len(parts))
            if np.all(np.isfinite(per)):
                k = int(np.argmax(lv))  # the barrier's point on the whole data, paired with the ends chunk by chunk
                bar = per[:, k] - np.maximum(per[:, 0], per[:, -1])
                barrier_se = float(bar.std(ddof=1) / math.sqrt(len(parts)))
                _, ri, rj = max_rise(lv)
                if rj > ri:  # the rise's two points on the whole data, paired chunk by chunk
                    rise_se = float((per[:, rj] - per[:, ri]).std(ddof=1) / math.sqrt(len(parts)))
        ends = []
        for e, traj, i in ((ea, ta, ia), (eb, tb, ib)):
            ends.append({"path": os.path.abspath(traj.path), "step": int(traj.steps[i]), "record": int(i),
                         "identity": str(archive_identity(traj))})
        return LineResult(t=t.tolist(), loss=lv.tolist(), acc=np.asarray(acc).tolist(), loss_se=loss_se.tolist(),
                          barrier_se=barrier_se, max_rise_se=rise_se, distance=float(torch.linalg.vector_norm((tb.params(ib).double() - ta.params(ia).double()))),
                          ends=ends, settings={"eval": eval_spec.kind if eval_spec.kind != "subset" else f"subset:{eval_spec.n}",
                                               "bn": bn_eff, "dtype": dtype, "loss": loss, "model": model_id,
                                               "data": source.ident, "se_chunks": se_chunks}, **stats)
    finally:
        if tb is not ta:
            tb.close()
        ta.close()
