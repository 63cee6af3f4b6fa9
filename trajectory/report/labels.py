"""Run labels from hyperparameters: what tells the runs of one report apart.

A legend entry "b.results.h5" says nothing; "lr=0.3 b=32" says why the curves differ. The hyperparameters come
from the results file's ``archive_provenance`` attribute (the archive's metadata, optimizer and specs, copied at
analysis time), which older files lack: then the learning rate falls back to the ``geometry`` table's recorded
``lr`` column and the label to the file name. Short labels name only the hyperparameters that differ between the
runs of a report (a single run shows its learning rate and batch size); the full label names all of them.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["HYPERPARAMETERS", "hyperparameters", "format_hyperparameters", "short_labels", "run_stem"]

#: Hyperparameter keys in label order, with their short names.
HYPERPARAMETERS: dict[str, str] = {
    "lr": "lr",
    "batch_size": "b",
    "momentum": "mom",
    "weight_decay": "wd",
    "lr_drop": "drop",
    "steps": "steps",
    "seed": "seed",
    "model": "model",
    "data": "data",
}


class SpecText(str):
    """``mlp(hidden=[32, 32], ...)``: a model/data spec as label text that remembers its factory and kwargs, so a
    short label can name only the kwargs that differ between runs."""

    name: str
    kwargs: dict[str, str]

    @classmethod
    def make(cls, name: str, kwargs: Mapping[str, Any]) -> "SpecText":
        items = {k: json.dumps(v, sort_keys=True) for k, v in sorted(kwargs.items())}
        inner = ", ".join(f"{k}={v}" for k, v in items.items())
        out = cls(f"{name}({inner})" if inner else name)
        out.name, out.kwargs = name, items
        return out


def _spec_text(spec: Any) -> str | None:
    """``mlp(hidden=[32, 32], ...)`` from a spec mapping {target, kwargs} (or its JSON text)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return spec
    if not isinstance(spec, Mapping) or "target" not in spec:
        return None if spec is None else str(spec)
    return SpecText.make(str(spec["target"]).rsplit(":", 1)[-1], spec.get("kwargs") or {})


def _spec_diff(specs: Sequence[Any]) -> list[str]:
    """Per run, its spec reduced to what differs from the others: the factory name if it differs, then the kwargs
    whose values differ (``hidden=[16]``)."""
    if not all(isinstance(s, SpecText) for s in specs):
        return [str(s) if s is not None else "" for s in specs]
    names_differ = len({s.name for s in specs}) > 1
    keys = sorted({k for s in specs for k in s.kwargs})
    differ = [k for k in keys if len({s.kwargs.get(k) for s in specs}) > 1]
    out = []
    for s in specs:
        inner = ", ".join(f"{k}={s.kwargs[k]}" for k in differ if k in s.kwargs)
        out.append(f"{s.name}({inner})" if inner else (s.name if names_differ else ""))
    return out


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def _seed(value: Any) -> Any:
    """The recorded seed; -1 (the recorder's "no seed given") and non-integers are not a seed."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        return None
    return int(value)


def _class_name(value: Any) -> str | None:
    """``SmallCNN`` from ``train_own.SmallCNN``: what an own-loop archive without a model spec recorded."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value.rsplit(".", 1)[-1]


def hyperparameters(provenance: Mapping[str, Any], geometry_lr: np.ndarray | None = None) -> dict[str, Any]:
    """The run's hyperparameters (keys of :data:`HYPERPARAMETERS`, those known) from its provenance.

    ``metadata`` (written by ``sgdwalk train`` or a user's ``Recorder(metadata=...)``; the Recorder adds
    ``batch_size`` from its RecordingBatchSampler) wins over the recorded optimizer's settings; the learning rate
    falls back to the first finite recorded ``lr`` of the geometry table. Archives of an own training loop show
    what they recorded: no ``seed`` when none was given (stored as -1), the model class when there is no model
    spec, no ``data`` when there is no data spec.
    """
    meta = provenance.get("metadata") if isinstance(provenance.get("metadata"), Mapping) else {}
    opt = provenance.get("optimizer") if isinstance(provenance.get("optimizer"), Mapping) else {}
    groups = opt.get("param_groups") if isinstance(opt.get("param_groups"), list) else []
    group0 = groups[0] if groups and isinstance(groups[0], Mapping) else {}
    defaults = opt.get("defaults") if isinstance(opt.get("defaults"), Mapping) else {}
    lr = _first(meta.get("lr"), group0.get("lr"), defaults.get("lr"))
    if lr is None and geometry_lr is not None:
        finite = np.asarray(geometry_lr, dtype=float)
        finite = finite[np.isfinite(finite)]
        lr = float(finite[0]) if len(finite) else None
    drop = meta.get("lr_drop")
    out: dict[str, Any] = {
        "lr": lr,
        "batch_size": _first(meta.get("batch_size"), meta.get("batch")),
        "momentum": _first(meta.get("momentum"), group0.get("momentum"), defaults.get("momentum")),
        "weight_decay": _first(meta.get("weight_decay"), group0.get("weight_decay"), defaults.get("weight_decay")),
        "lr_drop": drop if drop else None,
        "steps": meta.get("steps"),
        "seed": _seed(provenance.get("seed")),
        "model": _spec_text(provenance.get("model_spec")) or _class_name(provenance.get("model_class")),
        "data": _spec_text(provenance.get("data_spec")) or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    return str(v)


def format_hyperparameters(hyper: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """``lr=0.1 b=64 ...`` for ``keys`` (default: all known, in :data:`HYPERPARAMETERS` order)."""
    keys = [k for k in HYPERPARAMETERS if k in hyper] if keys is None else [k for k in keys if k in hyper]
    return " ".join(f"{HYPERPARAMETERS.get(k, k)}={_value(hyper[k])}" for k in keys)


def run_stem(path: str) -> str:
    """``run`` from ``/x/run.results.h5``: the file name a run falls back to as its label."""
    name = os.path.basename(path)
    for suffix in (".h5", ".hdf5"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len(".results")] if name.endswith(".results") else name


def short_labels(hypers: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[str]:
    """One distinct short label per run: the hyperparameters that differ, else the file names."""
    n = len(hypers)
    if n == 1:
        text = format_hyperparameters(hypers[0], ["lr", "batch_size"])
        return [text or run_stem(paths[0])]
    differing = [k for k in HYPERPARAMETERS if len({_value(h[k]) if k in h else None for h in hypers}) > 1]
    reduced = [dict(h) for h in hypers]
    for k in ("model", "data"):
        if k in differing:
            for h, text in zip(reduced, _spec_diff([h.get(k) for h in hypers])):
                if text:
                    h[k] = text
                else:
                    h.pop(k, None)
    labels = [format_hyperparameters(h, differing) for h in reduced]
    if not any(labels):
        labels = [run_stem(p) for p in paths]
    elif len(set(labels)) < n or not all(labels):  # same hyperparameters (or unknown): add the file name
        labels = [f"{lab} ({run_stem(p)})" if lab else run_stem(p) for lab, p in zip(labels, paths)]
    if len(set(labels)) < n:  # the same file name in different directories
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return labels
