"""Loss-landscape measurements on in-memory models, for notebooks: one call, no archive.

::

    from trajectory import landscape
    curve = landscape.interpolate(model_a, model_b, (x, y))        # .alphas .loss .acc .floor
    top = landscape.hessian_top(model, loader, k=5)                 # .eigenvalues (descending) .eigenvectors
    tr = landscape.hessian_trace(model, dataset)                    # .trace .se
    esd = landscape.hessian_esd(model, dataset)                     # .grid .density
    sh = landscape.sharpness(model, dataset)                        # .eps_sharpness .lambda_max ...

Same engine as ``sgdwalk analyze``, not a second implementation: every function builds the analyzer's own
:class:`~trajectory.analysis.evaluator.Evaluator` for the model and runs the analyzer's own metric classes
(``interpolation``, ``floor``, ``hessian_top``, ``hessian_trace``, ``hessian_esd``, ``sharpness``; their Lanczos,
Hutch++, SLQ, Brent and BatchNorm code) through a small context that serves two in-memory states instead of an
archive's records - the metric plug-in contract of docs/analysis.md. So the policies are the CLI's:

``bn``     ``"train"`` (default: batch statistics on batches of ``bn_batch``), ``"eval"`` (running statistics from
           the state; interpolated too), ``"recompute"`` (re-estimated from ``bn_batches`` seeded batches of the data).
``dtype``  ``"float32"`` (default) or ``"float64"``; the model is copied and cast, never modified.
``device`` ``None``: CUDA when available, else the CPU (as ``sgdwalk analyze``).
``loss``   ``"cross_entropy"`` (accuracy reported) or ``"mse"``.

``data`` is an ``(x, y)`` tuple of tensors, a map-style Dataset (items ``(x, y)`` or dicts with ``labels``), or a
DataLoader (all its batches, in order; its ``batch_size`` is the default BatchNorm batch). ``adapter=`` maps other
batches and outputs (:mod:`trajectory.adapters`, e.g. ``"huggingface"``). Metric options (``iters``, ``tol``,
``probes``, ``seed``, ``esd_iters``, ``eps``, ...) are passed through as keyword arguments; see docs/analysis.md.
Examples that run: docs/notebook.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .analysis.errors import AnalysisError
from .analysis.evaluator import Evaluator, has_batchnorm
from .analysis.metric import get_metric
from .analysis.options import EvalSpec, parse_alphas
from .archive.layout import BUFFERS, PARAMS, Layout

__all__ = ["interpolate", "hessian_top", "hessian_trace", "hessian_esd", "sharpness",
           "Curve", "Floor", "TopEigen", "Trace", "Density", "Sharpness"]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Floor:
    """Valley floor of the segment: ``a_star``, ``loss`` (floor loss), ``height`` (L(a) − floor), plus the floor
    metric's flags. Unpacks as ``a_star, loss, height = curve.floor``."""

    a_star: float
    loss: float
    height: float
    acc: float
    interior: bool
    convex: bool
    row: dict = field(repr=False, default_factory=dict)

    def __iter__(self):
        return iter((self.a_star, self.loss, self.height))


@dataclass
class Curve:
    """Loss and accuracy along θ(a) = θ_a + a·(θ_b − θ_a): numpy arrays over ``alphas``; ``floor`` (None when the
    grid lacks 0 or 1)."""

    alphas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    floor: Floor | None


@dataclass
class TopEigen:
    """Top-k Hessian eigenvalues (descending), residuals ‖Hv − λv‖, eigenvectors (k, n_params) if asked for."""

    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: np.ndarray | None
    loss: float
    converged: bool
    row: dict = field(repr=False, default_factory=dict)


@dataclass
class Trace:
    """Hessian trace estimate and its standard error (Hutch++ by default)."""

    trace: float
    se: float
    per_param: float
    loss: float
    row: dict = field(repr=False, default_factory=dict)


@dataclass
class Density:
    """Hessian eigenvalue density on ``grid`` (stochastic Lanczos quadrature), its nodes/weights and moments."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    moment1: float
    moment2: float
    row: dict = field(repr=False, default_factory=dict)


@dataclass
class Sharpness:
    """Keskar ε-sharpness (percent), its loss increase, Gaussian-perturbation increase, λ_max, and λ_max·lr/2."""

    eps_sharpness: float
    eps_increase: float
    gauss_increase: float
    gauss_se: float
    lambda_max: float
    eos_ratio: float
    loss: float
    row: dict = field(repr=False, default_factory=dict)


# ---------------------------------------------------------------------------------------------- inputs
def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise AnalysisError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if dtype in ("float32", torch.float32):
        return torch.float32
    if dtype in ("float64", torch.float64):
        return torch.float64
    raise AnalysisError(f"dtype {dtype!r}: expected 'float32' or 'float64'")


def _data(data: Any, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(x, y, batch size of a DataLoader or None) from a tuple, a Dataset or a DataLoader."""
    from torch.utils.data import DataLoader

    from .analysis.data import materialize

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y) or len(x) == 0:
            raise AnalysisError(f"data: x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
        return x, y, None
    if isinstance(data, DataLoader):
        xs, ys = [], []
        from .errors import SpecError

        for batch in data:
            try:
                x, y = adapter.batch(batch)
            except SpecError as err:
                raise AnalysisError(f"data: {' '.join(str(err).split())}") from None
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
        if not xs:
            raise AnalysisError("data: the DataLoader yields no batch")
        return torch.cat(xs), torch.cat(ys), data.batch_size
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, Mapping)):
        x, y = materialize(data, what="data", adapter=None if type(adapter) is Adapter else adapter)
        return x, y, None
    raise AnalysisError(f"data must be an (x, y) tuple of tensors, a Dataset or a DataLoader, not {type(data).__name__}")


def _state_dict(obj: Any, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise AnalysisError(f"{what} must be an nn.Module or a state dict, not {type(obj).__name__}")


def _state(layout: Layout, sd: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
    """The analyzer's state vector (parameters, then floating buffers, in layout order), in float64 on the CPU."""
    missing = [e.name for e in layout.entries if e.dataset in (PARAMS, BUFFERS) and e.name not in sd]
    if missing:
        raise AnalysisError(f"{what} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:2]}")
    parts = [sd[e.name].detach().reshape(-1).to("cpu", torch.float64) for ds in (PARAMS, BUFFERS)
             for e in layout.entries if e.dataset == ds]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


class _Setup:
    """Template model, evaluator and evaluation data under the CLI's policies."""

    def __init__(self, model: nn.Module, data: Any, *, bn: str, dtype: Any, device: Any, loss: str, adapter: Any,
                 bn_batch: int | None, bn_batches: int, seed: int):
        if not isinstance(model, nn.Module):
            raise AnalysisError(f"model must be an nn.Module, not {type(model).__name__}")
        if bn not in ("train", "eval", "recompute"):
            raise AnalysisError(f"bn {bn!r}: expected 'train', 'eval' or 'recompute'")
        if loss not in ("cross_entropy", "mse"):
            raise AnalysisError(f"loss {loss!r}: expected 'cross_entropy' or 'mse'")
        ad = get_adapter(adapter)
        if adapter is not None and not getattr(type(model), "_sgdwalk_wrapper", False):
            model = ad.wrap(model)
        self.device, self.dtype = _device(device), _dtype(dtype)
        template = copy.deepcopy(model).to("cpu")
        self.layout = Layout.from_module(template)
        x, y, loader_bs = _data(data, ad)
        if loss == "cross_entropy" and (y.is_floating_point() or y.dim() != 1):
            raise AnalysisError("labels are not integer class indices; use loss='mse' for regression data")
        self.bn = bn if has_batchnorm(template) else "none"
        self.bn_batch = int(bn_batch or loader_bs or 100)
        recompute: list[torch.Tensor] = []
        if self.bn == "recompute":  # as the analyzer: seeded batches of the (training) data
            g = torch.Generator().manual_seed(int(seed) + 1)
            perm = torch.randperm(len(x), generator=g)
            recompute = [x[perm[j * self.bn_batch:(j + 1) * self.bn_batch]] for j in range(max(1, bn_batches))]
            recompute = [b for b in recompute if len(b) >= 2]
        to = lambda t: t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)  # noqa: E731
        self.x, self.y = to(x), to(y)
        self.evaluator = Evaluator(template, self.layout, device=self.device, dtype=self.dtype,
                                   bn=self.bn if self.bn != "none" else "eval", loss=loss, bn_batch=self.bn_batch,
                                   recompute_batches=[to(b) for b in recompute], bn_seed=int(seed) + 2)

    def state(self, obj: Any, what: str) -> torch.Tensor:
        return _state(self.layout, _state_dict(obj, what), what).to(self.device, self.dtype)


class _Context:
    """The metric plug-in contract (docs/analysis.md) over in-memory states: record 0 = a, record 1 = b."""

    def __init__(self, setup: _Setup, states: Sequence[torch.Tensor], options: dict, lr: float | None):
        ev = setup.evaluator
        self._setup = setup
        self._states = list(states)
        self._rows: dict[str, dict] = {}
        self._lr = float("nan") if lr is None else float(lr)
        self.steps = np.arange(len(states))
        self.pairs = [0]
        self.n_params, self.n_state = ev.n_params, ev.n_state
        self.device, self.dtype = ev.device, ev.dtype
        self.options = options
        self.eval = EvalSpec("train")
        self.bn = setup.bn
        self.data_shard = None

    # states
    def state(self, i: int) -> torch.Tensor:
        return self._states[int(i)]

    def params(self, i: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self._states[int(i)][: self.n_params].to("cpu", dtype)

    def line(self, a: torch.Tensor, b: torch.Tensor, alphas: Any) -> torch.Tensor:
        w = torch.as_tensor(alphas, dtype=a.dtype, device=a.device).reshape(-1, 1)
        return torch.lerp(a.unsqueeze(0), b.unsqueeze(0), w)

    def segment(self, i: int, alphas: Any) -> torch.Tensor:
        return self.line(self.state(i), self.state(i + 1), alphas)

    def data(self, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._setup.x, self._setup.y

    @property
    def evaluator(self) -> Evaluator:
        return self._setup.evaluator

    @property
    def eval_size(self) -> int:
        return int(self._setup.x.shape[0])

    def lr(self, i: int) -> float:
        return self._lr

    # evaluation
    def evaluate(self, states: torch.Tensor, pairs: Any, units: bool = False) -> tuple[np.ndarray, ...]:
        return self._setup.evaluator.evaluate(states, self._setup.x, self._setup.y, units=units)

    def evaluate_lines(self, lines: Sequence[tuple[Any, Any, Sequence[float], int]], units: bool = False) -> list[tuple[np.ndarray, ...]]:
        if not lines:
            return []
        ends = [(self.state(a) if isinstance(a, (int, np.integer)) else a, self.state(b) if isinstance(b, (int, np.integer)) else b)
                for a, b, _, _ in lines]
        states = torch.cat([self.line(a, b, ts) for (a, b), (_, _, ts, _) in zip(ends, lines)])
        res = self.evaluate(states, 0, units=units)
        out, pos = [], 0
        for _, _, ts, _ in lines:
            n = len(ts)
            out.append(tuple(r[pos:pos + n] for r in res))
            pos += n
        return out

    def evaluate_segments(self, requests: Sequence[tuple[int, Sequence[float]]], units: bool = False) -> list[tuple[np.ndarray, ...]]:
        return self.evaluate_lines([(p, p + 1, al, p) for p, al in requests], units=units)

    def rows(self, metric: str, pairs: Sequence[int], span: int | None = None) -> dict[str, np.ndarray]:
        if metric not in self._rows:
            raise AnalysisError(f"metric {metric!r} has no rows in this notebook call")
        row = self._rows[metric]
        return {k: np.stack([np.asarray(row[k]) for _ in pairs]) for k in row}

    def run(self, name: str, **options: Any) -> dict[str, Any]:
        """Run one of the analyzer's metrics on pair 0 and keep its row for metrics that require it."""
        cls = get_metric(name)
        known = set(cls.defaults)
        unknown = sorted(set(options) - known)
        if unknown:
            raise AnalysisError(f"unknown option {unknown[0]!r} for {name}; known: {', '.join(sorted(known))}")
        row = cls(**options).compute(self, [(0,)])[0]
        self._rows[name] = row
        return row


def _curvature_context(model: nn.Module, data: Any, options: dict, *, bn: str, dtype: Any, device: Any, loss: str,
                       adapter: Any, bn_batch: int | None, bn_batches: int, lr: float | None) -> _Context:
    setup = _Setup(model, data, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter, bn_batch=bn_batch,
                   bn_batches=bn_batches, seed=int(options.get("seed", 0)))
    s = setup.state(model, "model")
    if options.get("at", "record") != "record":
        raise AnalysisError("the notebook functions measure at the model's own parameters (at='record')")
    return _Context(setup, [s, s], options, lr)


# ---------------------------------------------------------------------------------------------- functions
def interpolate(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor], data: Any, *,
                alphas: Any = None, bn: str = "train", loss: str = "cross_entropy", dtype: Any = "float32",
                device: Any = None, model: nn.Module | None = None, adapter: Any = None, bn_batch: int | None = None,
                bn_batches: int = 4, seed: int = 0, height: str = "start", convex_tol: float = 0.01,
                xtol: float = 1e-5) -> Curve:
    """Loss and accuracy along the straight line from ``a`` to ``b`` (models or state dicts), and its valley floor.

    ``alphas``: grid as for ``--alphas`` (``"0:1:21"`` default, ``"-0.5:1.5:41"``, or a sequence). Buffers
    (BatchNorm running statistics) are interpolated with the parameters. ``model``: the architecture when ``a``
    and ``b`` are state dicts (default: ``a`` itself). The floor is the analyzer's ``floor`` metric (bounded Brent
    below the grid spacing to ``xtol``), present when the grid holds 0 and 1.
    """
    template = model if model is not None else a
    if not isinstance(template, nn.Module):
        raise AnalysisError("a and b are state dicts: pass model= (an nn.Module of the same architecture)")
    setup = _Setup(template, data, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter, bn_batch=bn_batch,
                   bn_batches=bn_batches, seed=seed)
    al = parse_alphas(alphas)
    ctx = _Context(setup, [setup.state(a, "a"), setup.state(b, "b")], {"alphas": al}, None)
    row = ctx.run("interpolation", alphas=al)
    floor = None
    if 0.0 in al and 1.0 in al:
        f = ctx.run("floor", alphas=al, height=height, convex_tol=convex_tol, xtol=xtol)
        floor = Floor(a_star=float(f["a_star"]), loss=float(f["floor_loss"]), height=float(f["height"]),
                      acc=float(f["floor_acc"]), interior=bool(f["interior"]), convex=bool(f["convex"]), row=dict(f))
    return Curve(alphas=np.asarray(al, dtype=np.float64), loss=np.asarray(row["loss"]), acc=np.asarray(row["acc"]), floor=floor)


def hessian_top(model: nn.Module, data: Any, *, k: int = 1, vectors: bool = False, bn: str = "train",
                loss: str = "cross_entropy", dtype: Any = "float32", device: Any = None, adapter: Any = None,
                bn_batch: int | None = None, bn_batches: int = 4, **options: Any) -> TopEigen:
    """Top ``k`` eigenvalues of the Hessian of the mean loss over ``data`` at ``model``'s parameters (Lanczos).

    ``vectors=True`` also returns the eigenvectors, shape (k, n_params), in ``model.named_parameters()`` order.
    Options of the ``hessian_top`` metric: ``iters`` (100), ``tol`` (1e-4), ``seed``, ``hvp``, ``operator``
    (``"ggn"`` for the Gauss-Newton matrix), ``eig_method``, ``eig_which``.
    """
    opts = {**options, "k": int(k), "store_vectors": bool(vectors)}
    ctx = _curvature_context(model, data, opts, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter,
                             bn_batch=bn_batch, bn_batches=bn_batches, lr=None)
    row = ctx.run("hessian_top", **opts)
    vec = None
    if vectors:
        vec = np.asarray(row["eigenvectors"]).reshape(int(k), ctx.n_params)
    return TopEigen(eigenvalues=np.asarray(row["eigenvalues"]), residuals=np.asarray(row["residuals"]), eigenvectors=vec,
                    loss=float(row["loss"]), converged=bool(row["converged"]), row=dict(row))


def hessian_trace(model: nn.Module, data: Any, *, probes: int = 30, method: str = "hutch++", bn: str = "train",
                  loss: str = "cross_entropy", dtype: Any = "float32", device: Any = None, adapter: Any = None,
                  bn_batch: int | None = None, bn_batches: int = 4, **options: Any) -> Trace:
    """Hessian trace at ``model``'s parameters by Hutch++ (``method="hutchinson"``: Hutchinson) with ``probes``
    Hessian-vector products; with at least as many products as parameters Hutch++ is exact up to rounding."""
    opts = {**options, "probes": int(probes), "trace_method": method}
    ctx = _curvature_context(model, data, opts, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter,
                             bn_batch=bn_batch, bn_batches=bn_batches, lr=None)
    row = ctx.run("hessian_trace", **opts)
    return Trace(trace=float(row["trace"]), se=float(row["trace_se"]), per_param=float(row["trace_per_param"]),
                 loss=float(row["loss"]), row=dict(row))


def hessian_esd(model: nn.Module, data: Any, *, probes: int = 3, iters: int = 40, grid: Any = 201, bn: str = "train",
                loss: str = "cross_entropy", dtype: Any = "float32", device: Any = None, adapter: Any = None,
                bn_batch: int | None = None, bn_batches: int = 4, **options: Any) -> Density:
    """Hessian eigenvalue density by stochastic Lanczos quadrature: ``probes`` random starts, ``iters`` Lanczos
    steps each, Gaussian-broadened on ``grid`` (a point count or ``"lo:hi:count"``; options ``esd_width``,
    ``esd_sigma``)."""
    opts = {**options, "esd_probes": int(probes), "esd_iters": int(iters), "esd_grid": grid}
    ctx = _curvature_context(model, data, opts, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter,
                             bn_batch=bn_batch, bn_batches=bn_batches, lr=None)
    row = ctx.run("hessian_esd", **opts)
    g = np.linspace(row["grid_lo"], row["grid_hi"], len(row["density"]))
    return Density(grid=g, density=np.asarray(row["density"]), nodes=np.asarray(row["nodes"]),
                   weights=np.asarray(row["weights"]), moment1=float(row["moment1"]), moment2=float(row["moment2"]),
                   row=dict(row))


def sharpness(model: nn.Module, data: Any, *, eps: float = 1e-3, lr: float | None = None, bn: str = "train",
              loss: str = "cross_entropy", dtype: Any = "float32", device: Any = None, adapter: Any = None,
              bn_batch: int | None = None, bn_batches: int = 4, **options: Any) -> Sharpness:
    """Keskar's ε-sharpness (box of relative size ``eps``), the Gaussian-perturbation loss increase and λ_max;
    with ``lr`` also the edge-of-stability ratio λ_max·lr/2. Options: ``ascent_steps``, ``noise_scale``,
    ``noise_draws``, ``iters``, ``tol``, ``seed``."""
    opts = {**options, "eps": float(eps)}
    ctx = _curvature_context(model, data, opts, bn=bn, dtype=dtype, device=device, loss=loss, adapter=adapter,
                             bn_batch=bn_batch, bn_batches=bn_batches, lr=lr)
    row = ctx.run("sharpness", **opts)
    return Sharpness(eps_sharpness=float(row["eps_sharpness"]), eps_increase=float(row["eps_increase"]),
                     gauss_increase=float(row["gauss_increase"]), gauss_se=float(row["gauss_se"]),
                     lambda_max=float(row["lambda_max"]), eos_ratio=float(row["eos_ratio"]), loss=float(row["loss"]),
                     row=dict(row))
