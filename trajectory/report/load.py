"""Results files into plain arrays per run: the only place the report touches HDF5.

Figures and the HTML page work on :class:`Run` objects (numpy arrays per metric, the configuration used, the
provenance, a label), never on files, so they can be tested and used from a notebook on any data, and a results
file is opened exactly once per report. Reading goes through :class:`trajectory.analysis.ResultsFile`, which
refuses files that are not results files or are of a newer format version.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..analysis.results import ResultsFile, Table
from .errors import ReportError
from .labels import format_hyperparameters, hyperparameters, run_stem, short_labels
from .select import describe_config, eval_label, select_tables

__all__ = ["MetricData", "Run", "load_run", "load_runs", "as_runs"]


@dataclass
class MetricData:
    """The rows of one metric under the configuration the report uses, as arrays in key order."""

    metric: str
    hash: str
    config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    updated: str = ""

    @property
    def rows(self) -> int:
        return int(len(self.arrays.get("pair", ())))

    @property
    def describe(self) -> str:
        return describe_config(self.config)

    @property
    def eval(self) -> str | None:
        return eval_label(self.config)

    def __getitem__(self, column: str) -> np.ndarray:
        return self.arrays[column]


@dataclass
class Run:
    """One results file, reduced to what a report draws: one :class:`MetricData` per metric, plus provenance."""

    path: str
    attrs: dict[str, Any]
    provenance: dict[str, Any]
    metrics: dict[str, MetricData]
    hyper: dict[str, Any]
    label: str = ""
    full_label: str = ""
    unused: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # metric -> [(hash, describe, rows)]
    notes: list[str] = field(default_factory=list)

    def has(self, metric: str) -> bool:
        return metric in self.metrics and self.metrics[metric].rows > 0

    def get(self, metric: str) -> MetricData | None:
        return self.metrics.get(metric) if self.has(metric) else None

    @property
    def loss_name(self) -> str:
        """The evaluated loss of this run's tables: ``cross_entropy`` or ``mse``."""
        for m in self.metrics.values():
            loss = (m.config.get("shared") or {}).get("loss")
            if loss:
                return str(loss)
        return "cross_entropy"


def _table_data(t: Table) -> MetricData:
    return MetricData(t.metric, t.hash, dict(t.config), t.arrays(), str(t.updated))


def _provenance(attrs: Mapping[str, Any]) -> dict[str, Any]:
    raw = attrs.get("archive_provenance")
    if raw is None:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return dict(value) if isinstance(value, Mapping) else {}


def load_run(path: str | os.PathLike, *, eval: str | None = None, configs: Sequence[str] = ()) -> Run:
    """Read one results file and pick one configuration per metric (rule: :mod:`trajectory.report.select`).

    Raises :class:`trajectory.analysis.ResultsError` (an :class:`~trajectory.errors.SgdwalkError`) for a missing
    file or one that is not a results file. The run's label is its file name until :func:`load_runs` labels it.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ReportError(f"{p} is a directory, not a results file (results files are written by sgdwalk analyze)")
    store = ResultsFile(p, "r")
    chosen, unused, notes = select_tables(store.tables.values(), eval=eval, configs=configs)
    metrics = {m: _table_data(t) for m, t in chosen.items()}
    geo = metrics.get("geometry")
    prov = _provenance(store.attrs)
    hyper = hyperparameters(prov, geo.arrays.get("lr") if geo is not None else None)
    run = Run(
        path=os.path.abspath(p), attrs=dict(store.attrs), provenance=prov, metrics=metrics, hyper=hyper,
        unused={m: [(t.hash, describe_config(t.config), len(t)) for t in ts] for m, ts in unused.items()},
        notes=list(notes),
    )
    run.label = run_stem(p)
    run.full_label = format_hyperparameters(hyper) or run.label
    if not prov:
        run.notes.append("no archive_provenance attribute (file written before sgdwalk 0.1): labelled by file name"
                         + (" and the recorded lr" if "lr" in hyper else ""))
    return run


def load_runs(paths: Sequence[str | os.PathLike], *, eval: str | None = None, configs: Sequence[str] = ()) -> list[Run]:
    """Load several results files and give them short labels that tell them apart (:mod:`.labels`)."""
    if not paths:
        raise ReportError("no results files given")
    runs = [load_run(p, eval=eval, configs=configs) for p in paths]
    for prefix in configs:
        pre = prefix.strip().lower()
        if not any(m.hash.startswith(pre) or any(h.startswith(pre) for h, _, _ in r.unused.get(name, []))
                   for r in runs for name, m in r.metrics.items()):
            raise ReportError(f"--config {prefix!r} matches no non-empty table in the results files given "
                              "(sgdwalk show RESULTS lists the config hashes)")
    for run, label in zip(runs, short_labels([r.hyper for r in runs], [r.path for r in runs])):
        run.label = label
    return runs


def as_runs(runs: Sequence[Run | str | os.PathLike] | Run | str | os.PathLike) -> list[Run]:
    """Runs as given, or loaded (and labelled together) from paths: figure functions accept either."""
    if isinstance(runs, (Run, str, os.PathLike)):
        runs = [runs]
    items = list(runs)
    if all(isinstance(r, Run) for r in items):
        return items  # type: ignore[return-value]
    if any(isinstance(r, Run) for r in items):
        raise ReportError("give either Run objects or results file paths, not both")
    return load_runs(items)  # type: ignore[arg-type]
