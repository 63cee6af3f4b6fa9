"""The metric plug-in interface and registry.

A metric is a small class: it says which work units it has (one per pair by default), computes
rows for a batch of units through the replay context it is handed, and optionally summarises its
rows. It never opens an archive: the context (:class:`trajectory.analysis.replay.ReplayContext`)
hands it state vectors and evaluates losses with the run's data, device, precision and BatchNorm
policy, and the engine stores its rows with resume for free. See docs/analysis.md.

Registering a third-party metric (no change to sgdwalk)::

    # pyproject.toml of your package
    [project.entry-points."sgdwalk.metrics"]
    midloss = "mypkg.metrics:MidLoss"

after which ``sgdwalk analyze run.h5 --metric midloss`` runs it. In-process, ``register_metric(MidLoss)``
does the same.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .errors import MetricError

__all__ = ["Metric", "register_metric", "get_metric", "available_metrics", "ENTRY_POINT_GROUP", "DEFAULT_METRICS"]

ENTRY_POINT_GROUP = "sgdwalk.metrics"

#: Metrics that ``sgdwalk analyze`` runs when no --metric is given.
DEFAULT_METRICS = ("interpolation", "floor", "geometry", "barriers")

_BUILTIN = {
    "interpolation": "trajectory.analysis.metrics.interpolation:Interpolation",
    "floor": "trajectory.analysis.metrics.floor:Floor",
    "geometry": "trajectory.analysis.metrics.geometry:Geometry",
    "barriers": "trajectory.analysis.metrics.barriers:Barriers",
    "hessian_top": "trajectory.analysis.metrics.curvature:HessianTop",
    "hessian_trace": "trajectory.analysis.metrics.curvature:HessianTrace",
    "hessian_esd": "trajectory.analysis.metrics.curvature:HessianESD",
    "sharpness": "trajectory.analysis.metrics.curvature:Sharpness",
    "update_alignment": "trajectory.analysis.metrics.curvature:UpdateAlignment",
    "gradients": "trajectory.analysis.metrics.gradients:Gradients",
    "eigen_split": "trajectory.analysis.metrics.eigen_split:EigenSplit",
    "per_layer": "trajectory.analysis.metrics.per_layer:PerLayer",
    "optimizer": "trajectory.analysis.metrics.optimizer:OptimizerMetric",
}
_REGISTERED: dict[str, type] = {}


class Metric:
    """Base class of every metric (built-in or plug-in).

    Class attributes
    ----------------
    name : str
        Registry name (``--metric NAME``) and results group name.
    version : int
        Bump when the computation changes; part of the configuration hash, so old rows are not reused.
    requires : tuple of str
        Metrics whose rows this one reads through ``ctx.rows(name, pairs)``; the engine runs them first
        (same evaluation settings) and their configuration hashes become part of this one's.
    defaults : dict
        The options this metric reads, with default values (JSON-serialisable). Options come from a
        namespace shared by all metrics (``alphas``, ``spans``, ...); each metric keeps the keys it declares.
    keys : tuple of str
        ``("pair",)`` for one row per pair, ``("pair", "span")`` for one row per pair and span.
    unit_options : tuple of str
        Options that only select *which* units exist (e.g. ``spans`` of barriers) and do not change any
        row's values; they are left out of the configuration hash, so adding a span reuses the table.
    uses_data : bool
        False for metrics that never evaluate a loss (their configuration then ignores data/BN/dtype).

    Methods to implement: :meth:`compute`; optionally :meth:`validate`, :meth:`units`, :meth:`needs`,
    :meth:`summarize`, :meth:`cost` (for the progress estimate).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    requires: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    keys: ClassVar[tuple[str, ...]] = ("pair",)
    unit_options: ClassVar[tuple[str, ...]] = ()
    uses_data: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self.options: dict[str, Any] = {k: options.get(k, v) for k, v in self.defaults.items()}
        self.validate()

    def validate(self) -> None:
        """Check and normalise ``self.options`` (raise AnalysisError with one line on bad values)."""

    def units(self, pairs: Sequence[int]) -> list[tuple[int, ...]]:
        """Work units for the selected pairs (record indices i of pairs (i, i+1)); keys of the rows."""
        return [(int(p),) for p in pairs]

    def needs(self, unit: tuple[int, ...]) -> Sequence[int]:
        """Pairs whose rows of every required metric must exist before ``unit`` can be computed."""
        return (unit[0],)

    def compute(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
        """One dict of column values per unit, in order. Values: numbers, bools or fixed-length 1-D arrays."""
        raise NotImplementedError

    def summarize(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Run-level summary of this metric's rows (column name -> array), for ``sgdwalk show``."""
        return {}

    def cost(self, ctx: Any, units: Sequence[tuple[int, ...]]) -> float | None:
        """Expected work of computing ``units``, in sample-forward equivalents, or None when unknown.

        One sample through the model at one point is 1; a gradient costs about 3, a Hessian-vector product
        about 5. ``ctx.eval_size`` is the number of samples of one model evaluation. Used only for the
        up-front estimate and the progress bar's total (the bar then corrects itself with the work really
        reported through ``ctx.evaluator.on_samples``), never for results; an estimate within 2x is plenty.
        """
        return None


def register_metric(cls: type) -> type:
    """Register a Metric subclass in this process (usable as a class decorator)."""
    _check_metric_class(cls, getattr(cls, "name", "?"))
    _REGISTERED[cls.name] = cls
    return cls


def _check_metric_class(obj: Any, name: str) -> type:
    if not (isinstance(obj, type) and issubclass(obj, Metric)):
        raise MetricError(f"metric {name!r} is {obj!r}, not a subclass of trajectory.analysis.Metric")
    if not obj.name:
        raise MetricError(f"metric class {obj.__qualname__} has no name")
    return obj


def _entry_points() -> dict[str, Any]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python < 3.10 API
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


def available_metrics() -> dict[str, str]:
    """Metric name -> where it comes from (built-in target, 'registered', or the entry point's value). Imports nothing."""
    out = dict(_BUILTIN)
    for name, ep in _entry_points().items():
        out.setdefault(name, f"{ep.value} (entry point)")
    for name in _REGISTERED:
        out[name] = "registered"
    return out


def get_metric(name: str) -> type[Metric]:
    """The Metric class registered under ``name`` (built-ins, register_metric, then entry points)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        mod, _, attr = _BUILTIN[name].partition(":")
        return getattr(importlib.import_module(mod), attr)
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as err:  # a broken plug-in must not crash with a traceback
            raise MetricError(f"cannot load metric plug-in {name!r} ({eps[name].value}): {type(err).__name__}: {' '.join(str(err).split())}") from err
        cls = _check_metric_class(obj, name)
        if cls.name != name:
            raise MetricError(f"entry point {name!r} loads metric class named {cls.name!r}; the names must agree")
        return cls
    known = ", ".join(sorted(available_metrics()))
    raise MetricError(f"unknown metric {name!r}; available: {known} (plug-ins register under the entry point group '{ENTRY_POINT_GROUP}')")
