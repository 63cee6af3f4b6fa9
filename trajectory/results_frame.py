"""Results files as pandas DataFrames: ``trajectory.Results("run.results.h5").to_pandas("interpolation")``.

``pd.DataFrame(table.arrays())`` fails on array columns (an interpolation curve per pair, k eigenvalues per pair).
:meth:`Results.to_pandas` returns *long* format instead: one row per pair (× span) × array element, with the
scalar columns repeated, so ``df.groupby("pair")``, ``df.pivot(...)`` and seaborn work directly.

Columns: the table's keys (``pair``, and ``span`` for barriers), ``step_a``, ``step_b``, ``run`` (which
analysis run computed the row), then for the exploded array columns ``element`` (the position in the array) and
a named axis where one exists (``alpha`` for interpolation curves, ``point`` (0..1 along the floor path) for barriers'
``path_loss``, ``x`` (eigenvalue) for ``hessian_esd``'s ``density``, ``k`` (1-based) for per-eigenpair columns), then
every column. A table whose array columns have different lengths (``hessian_esd``: ``density`` on the grid,
``nodes``/``weights`` per Lanczos step) explodes one group per call: ``arrays="nodes"`` picks the group holding
that column; the other group's columns are left out. Tables without array columns give one row per pair.

The configuration is in ``df.attrs``: ``metric``, ``config`` (the table's configuration: options, evaluation data,
BatchNorm policy, ...), ``config_hash``, ``version``, ``results`` (the path) and ``archive`` (the archive's path and
provenance as recorded in the results file). A file with several configurations of one metric needs ``config=``
(a hash prefix, as ``sgdwalk show`` prints) unless all are wanted: ``config="all"`` concatenates them with a
``config`` column and puts every configuration under ``df.attrs["configs"]``.

Needs pandas: ``pip install sgdwalk[pandas]``. Reads through :class:`trajectory.analysis.results.ResultsFile`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .analysis.errors import ResultsError

__all__ = ["Results"]

_AXES = {"interpolation": "alpha", "barriers": "point", "hessian_esd": "x"}


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("Results.to_pandas needs pandas: pip install sgdwalk[pandas]") from None
    return pandas


class Results:
    """A results file written by ``sgdwalk analyze``, read once (read-only; the file is not kept open)."""

    def __init__(self, path: str | os.PathLike):
        from .analysis.results import ResultsFile

        self.path = os.fspath(path)
        with ResultsFile(self.path, "r") as f:
            self.attrs: dict[str, Any] = dict(f.attrs)
            self._tables = {key: t for key, t in sorted(f.tables.items())}

    @property
    def metrics(self) -> list[str]:
        """Metrics with at least one table, in file order."""
        return list(dict.fromkeys(m for m, _ in self._tables))

    def tables(self, metric: str) -> list[Any]:
        """The :class:`~trajectory.analysis.results.Table` objects of ``metric`` (one per configuration)."""
        found = [t for (m, _), t in self._tables.items() if m == metric]
        if not found:
            have = ", ".join(self.metrics) or "none"
            raise ResultsError(f"{self.path} has no {metric!r} rows (metrics: {have}); run sgdwalk analyze --metric {metric}")
        return found

    def _select(self, metric: str, config: str | None) -> list[Any]:
        tables = self.tables(metric)
        if config == "all":
            return tables
        if config is not None:
            tables = [t for t in tables if t.hash.startswith(str(config))]
            if len(tables) != 1:
                raise ResultsError(f"config {config!r} matches {len(tables)} {metric} tables in {self.path}; give a longer hash prefix")
            return tables
        if len(tables) > 1:
            hashes = ", ".join(t.hash[:12] for t in tables)
            raise ResultsError(f"{self.path} holds {len(tables)} configurations of {metric} ({hashes}); pass config=HASH or config='all'")
        return tables

    def to_pandas(self, metric: str, *, arrays: str | None = None, config: str | None = None) -> Any:
        """Long-format DataFrame of ``metric``'s rows (see the module docstring), configuration in ``df.attrs``."""
        pd = _pandas()
        tables = self._select(metric, config)
        frames = [self._frame(pd, t, arrays) for t in tables]
        if len(frames) == 1:
            df = frames[0]
        else:
            for t, f in zip(tables, frames):
                f.insert(0, "config", t.hash)
            df = pd.concat(frames, ignore_index=True)
        t0 = tables[0]
        df.attrs = {"metric": metric, "version": t0.version, "results": self.path,
                    "archive": {"path": self.attrs.get("archive_path", ""), "provenance": self.attrs.get("archive_provenance", "")}}
        if len(tables) == 1:
            df.attrs.update(config=t0.config, config_hash=t0.hash)
        else:
            df.attrs["configs"] = {t.hash: t.config for t in tables}
        return df

    # ------------------------------------------------------------------ one table
    def _frame(self, pd: Any, table: Any, arrays: str | None) -> Any:
        cols = table.arrays()
        n = len(cols[table.keys[0]])
        fixed = [*table.keys, "step_a", "step_b", "run"]
        scalar = {k: v for k, v in cols.items() if k not in fixed and v.ndim == 1}
        vector = {k: v for k, v in cols.items() if k not in fixed and v.ndim > 1}
        groups: dict[int, list[str]] = {}
        for k, v in vector.items():
            groups.setdefault(int(np.prod(v.shape[1:])), []).append(k)
        if arrays is not None:
            if arrays not in vector:
                raise ResultsError(f"{table.metric} has no array column {arrays!r}; array columns: {', '.join(vector) or 'none'}")
            chosen = next(g for g in groups.values() if arrays in g)
        else:
            chosen = next(iter(groups.values()), [])
        if not chosen:
            data = {k: cols[k] for k in fixed}
            data.update(scalar)
            return pd.DataFrame(data)
        m = int(np.prod(vector[chosen[0]].shape[1:]))
        data = {k: np.repeat(cols[k], m) for k in fixed}
        element = np.tile(np.arange(m), n)
        data["element"] = element
        axis = self._axis(table, chosen, cols, m, n)
        if axis is not None:
            data[axis[0]] = axis[1]
        for k in chosen:
            data[k] = vector[k].reshape(n, m).reshape(-1)
        for k, v in scalar.items():
            data[k] = np.repeat(v, m)
        return pd.DataFrame(data)

    @staticmethod
    def _axis(table: Any, chosen: list[str], cols: dict, m: int, n: int) -> tuple[str, np.ndarray] | None:
        metric = table.metric
        options = table.config.get("options", {}) if isinstance(table.config, dict) else {}
        if metric == "interpolation" and len(options.get("alphas", [])) == m:
            return "alpha", np.tile(np.asarray(options["alphas"], dtype=np.float64), n)
        if metric == "barriers" and "path_loss" in chosen:
            return "point", np.tile(np.linspace(0.0, 1.0, m), n)
        if metric == "hessian_esd" and "density" in chosen and "grid_lo" in cols:
            lo, hi = cols["grid_lo"].astype(np.float64), cols["grid_hi"].astype(np.float64)
            return "x", (lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, m)[None, :]).reshape(-1)
        if "eigenvalues" in chosen or "cos_top" in chosen:
            return "k", np.tile(np.arange(1, m + 1), n)
        return None
