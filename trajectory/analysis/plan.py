"""Plan: which metrics run (with their dependencies), under which configuration, on which units, in which levels.

Why a module of its own: the configuration of a metric decides whether rows already in a results file are
reused, so it must be computed in one place, from the run's settings only, never from how the run evaluates
(device placement, evaluation strategy, batching: those go to :func:`~trajectory.analysis.replay.strategy_record`,
outside the hash). Nothing here touches tensors or the archive's records; :mod:`.replay` evaluates and
:mod:`.run` schedules.

The configuration of a metric (canonical JSON, sha256 = ``config_hash``; docs/results.md)::

    {"metric": name, "version": v, "options": {...minus unit_options},
     "shared": {eval, bn, dtype, loss, model, data, data_fingerprint, [minibatch], [bn_batch, ...]},  # uses_data
     "requires": {dep: config_hash(dep)}}                                                          # requires
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import AnalysisError, MetricError
from .metric import Metric, get_metric
from .options import EvalSpec, bn_seed, pair_spans, select_pairs
from .results import Table, canonical_json, config_hash

__all__ = ["metric_closure", "check_options", "select", "shared_config", "Plan", "make_plan", "levels", "missing_units",
           "results_info", "PROVENANCE_ATTRS"]


def metric_closure(names: Sequence[str]) -> list[type[Metric]]:
    """The metric classes to run, dependencies first (topological order); unknown names and cycles fail."""
    order: list[type[Metric]] = []
    seen: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if seen.get(name) == "done":
            return
        if seen.get(name) == "active":
            raise MetricError(f"metric dependency cycle: {' -> '.join(chain + (name,))}")
        seen[name] = "active"
        cls = get_metric(name)
        for dep in cls.requires:
            visit(dep, chain + (name,))
        seen[name] = "done"
        order.append(cls)

    for n in names:
        visit(n, ())
    return order


def check_options(classes: Sequence[type[Metric]], opts: Mapping[str, Any]) -> None:
    """An option no selected metric reads is a typo, not something to ignore."""
    known = {k for c in classes for k in c.defaults} | {"alphas", "spans"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise AnalysisError(f"unknown option {unknown[0]!r} for metrics {', '.join(c.name for c in classes)}; known: {', '.join(sorted(known))}")


def select(steps: np.ndarray, steps_spec: Any, steps_text: Any, eval_kind: str, path: str, *, warn: bool = True) -> tuple[list[int], np.ndarray]:
    """Selected pairs and the single-update mask (pairs one optimizer step apart); warns about mixed chords."""
    pairs = select_pairs(steps, steps_spec)
    if not pairs:
        raise AnalysisError(f"--steps {steps_text!r} selects no pair of {path}")
    single = pair_spans(steps) == 1  # pairs that are one SGD update (not chords across sparse records)
    n_chords = int((~single[pairs]).sum())
    if warn and n_chords and n_chords < len(pairs):
        warnings.warn(
            f"{n_chords} of the {len(pairs)} selected pairs span more than one optimizer step (sparse records between "
            f"dense ones): their curves are chords across several updates, not single SGD updates, and summaries mix "
            f"both; --steps updates keeps the single updates" + ("; under --eval minibatch those pairs have no minibatch "
            f"of their own and get NaN rows" if eval_kind == "minibatch" else ""), stacklevel=3)
    return pairs, single


def shared_config(eval_spec: EvalSpec, bn_eff: str, dtype: str, loss: str, model_id: str, data_id: str, fingerprint: str,
                  *, bn_batch: int, bn_batches: int, subset_seed: int, noise: str = "crn") -> dict[str, Any]:
    """The settings every data-using metric's rows depend on (part of their configuration hash).

    Changing a key or a value here changes every hash and makes existing results files unusable: the
    fixtures of tests/test_results_reuse.py guard it."""
    shared: dict[str, Any] = {
        "eval": eval_spec.to_dict(),
        "bn": bn_eff,
        "dtype": dtype,
        "loss": loss,
        "model": model_id,
        "data": data_id,
        "data_fingerprint": fingerprint,
    }
    if eval_spec.kind == "minibatch":
        shared["minibatch"] = "single-update pairs only"  # rows of multi-step pairs are NaN (changed in 0.1)
    if bn_eff == "train" and eval_spec.kind != "minibatch":
        shared["bn_batch"] = int(bn_batch)
        # issue 13: true batches of bn_batch from a seeded permutation (remainder dropped), not consecutive chunks
        shared["bn_groups"] = {"rule": "seeded permutation, true batches, remainder dropped", "seed": bn_seed(subset_seed)}
    if noise != "crn":  # the default (common random numbers) adds nothing, so default hashes stay
        shared["noise"] = noise
    if bn_eff == "recompute":
        shared.update(bn_batch=int(bn_batch), bn_batches=int(bn_batches), bn_seed=int(subset_seed) + 1)
    return shared


@dataclass
class Plan:
    """Metric instances (dependency order), their configurations, and the dependency levels."""

    instances: dict[str, Metric]
    configs: dict[str, dict[str, Any]]
    levels: list[list[str]] = field(default_factory=list)

    def tables(self, store: Any) -> dict[str, Table]:
        """The table of each metric under its configuration in ``store`` (existing rows included)."""
        return {n: store.table(n, self.configs[n], inst.keys, inst.version) for n, inst in self.instances.items()}


def make_plan(classes: Sequence[type[Metric]], opts: Mapping[str, Any], shared: Mapping[str, Any]) -> Plan:
    """Instantiate the metrics (options validated) and compute their configurations (dependencies first)."""
    instances: dict[str, Metric] = {}
    configs: dict[str, dict] = {}
    for cls in classes:
        inst = cls(**opts)
        cfg: dict[str, Any] = {
            "metric": cls.name,
            "version": cls.version,
            "options": {k: v for k, v in inst.options.items() if k not in cls.unit_options
                        and not (k in getattr(cls, "hash_if_set", ()) and v == cls.defaults.get(k))},
        }
        if cls.uses_data:
            cfg["shared"] = dict(shared)
        if cls.requires:
            cfg["requires"] = {d: config_hash(configs[d]) for d in cls.requires}
        instances[cls.name], configs[cls.name] = inst, cfg
    return Plan(instances, configs, levels(instances))


def levels(instances: Mapping[str, Metric]) -> list[list[str]]:
    """Metrics grouped by dependency depth: level 0 needs nothing, level k reads only levels < k."""
    level: dict[str, int] = {}
    for name, inst in instances.items():  # instances are in dependency order
        level[name] = 1 + max((level[d] for d in inst.requires if d in level), default=-1)
    out: list[list[str]] = [[] for _ in range(max(level.values()) + 1)] if level else []
    for name, lv in level.items():
        out[lv].append(name)
    return out


def missing_units(instances: Mapping[str, Metric], tables: Mapping[str, Table], pairs: Sequence[int]) -> tuple[dict[str, list[tuple[int, ...]]], dict[str, int]]:
    """Per metric: the units whose rows the results file lacks, and how many it already has (reused)."""
    pending: dict[str, list[tuple[int, ...]]] = {}
    reused: dict[str, int] = {}
    for name, inst in instances.items():
        units = inst.units(pairs)
        pending[name] = [u for u in units if tuple(u) not in tables[name].rows]
        reused[name] = len(units) - len(pending[name])
    return pending, reused


#: archive root attributes copied into the results file, so reports can label runs by their
#: hyperparameters without the archive at hand (results stay readable after archives move or go)
PROVENANCE_ATTRS = (
    "created", "model_spec", "data_spec", "model_class", "metadata", "optimizer", "seed", "schedule",
    "argv", "codec", "lossy", "sgdwalk_version", "torch_version",
)


def results_info(traj: Any) -> dict[str, Any]:
    """Root attributes of the results file describing the archive (path, created, records, provenance)."""
    import os

    attrs = traj.attrs
    return {
        "archive_path": os.path.abspath(traj.path),
        "archive_created": str(attrs.get("created", "")),
        "archive_records": len(traj),
        "archive_provenance": canonical_json({k: attrs[k] for k in PROVENANCE_ATTRS if k in attrs}),
    }
