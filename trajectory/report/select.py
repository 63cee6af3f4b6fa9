"""Which configuration (table) of each metric a report uses.

A results file may hold several configurations of one metric side by side (say ``--eval subset:2000`` and
``--eval train``, or two alpha grids). A report draws one per metric, chosen by a fixed rule so that the same
files always give the same report, and so that the figures agree with each other (the floor marked on an
interpolation curve is the floor computed from that curve):

1. ``--config PREFIX`` (repeatable) pins a metric to the tables whose config hash starts with PREFIX.
2. ``--eval SPEC`` (``subset:2000``, ``train``, ``test``, ``minibatch``) drops tables evaluated on other data;
   tables of parameter-only metrics (``geometry``) have no evaluation data and are always kept.
3. Empty tables are ignored.
4. ``floor`` is chosen first, then ``interpolation``, ``barriers``, ``geometry`` and the rest by name. Among the
   remaining candidates of a metric the winner is the one that agrees best with the tables already chosen
   (its ``requires`` hashes, and theirs), then the one with most rows, then the most recently updated, then the
   smallest hash.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..analysis.results import Table

__all__ = ["METRIC_ORDER", "eval_label", "describe_config", "select_tables"]

#: Order in which metrics are chosen; later metrics follow the ``requires`` links of earlier ones.
METRIC_ORDER = ("floor", "interpolation", "barriers", "geometry")


def eval_label(config: Mapping[str, Any]) -> str | None:
    """``subset:2000``, ``train``, ``test`` or ``minibatch``; None for metrics that use no data."""
    shared = config.get("shared") or {}
    ev = shared.get("eval")
    if not isinstance(ev, Mapping):
        return None
    kind = str(ev.get("kind", "?"))
    return f"subset:{ev.get('n')}" if kind == "subset" else kind


def describe_config(config: Mapping[str, Any]) -> str:
    """A short human description of a table's configuration: evaluation data, BN policy, dtype, options."""
    parts: list[str] = []
    ev = eval_label(config)
    shared = config.get("shared") or {}
    if ev is None:
        parts.append("parameters only")
    else:
        parts += [f"eval={ev}", f"bn={shared.get('bn', '?')}", str(shared.get("dtype", "")), str(shared.get("loss", ""))]
    for k, v in sorted((config.get("options") or {}).items()):
        if k == "alphas" and isinstance(v, list) and v:
            parts.append(f"alphas={v[0]:g}..{v[-1]:g} ({len(v)})")
        elif not isinstance(v, (list, dict)):
            parts.append(f"{k}={v}")
    return " ".join(p for p in parts if p)


def _links(table: Table, chosen: Mapping[str, Table]) -> tuple[int, int]:
    """(agreements, disagreements) between ``table`` and the tables chosen so far, through ``requires``."""
    agree = disagree = 0
    for metric, h in (table.config.get("requires") or {}).items():
        if metric in chosen:
            if chosen[metric].hash == h:
                agree += 1
            else:
                disagree += 1
    for other in chosen.values():
        h = (other.config.get("requires") or {}).get(table.metric)
        if h is not None:
            if h == table.hash:
                agree += 1
            else:
                disagree += 1
    return agree, disagree


def select_tables(
    tables: Iterable[Table], *, eval: str | None = None, configs: Sequence[str] = ()
) -> tuple[dict[str, Table], dict[str, list[Table]], list[str]]:
    """Choose one table per metric by the module's rule.

    Returns ``(chosen, unused, notes)``: the chosen table per metric, the other non-empty candidates per metric
    (listed in the report's provenance), and notes such as "floor: no table evaluated on subset:500".
    """
    by_metric: dict[str, list[Table]] = {}
    for t in tables:
        by_metric.setdefault(t.metric, []).append(t)
    prefixes = [p.strip().lower() for p in configs if p.strip()]
    notes: list[str] = []
    candidates: dict[str, list[Table]] = {}
    for metric, group in by_metric.items():
        pinned = [t for t in group if any(t.hash.startswith(p) for p in prefixes)]
        cands = pinned or group
        if eval is not None:
            kept = [t for t in cands if eval_label(t.config) in (None, eval)]
            if not kept:
                notes.append(f"{metric}: no table evaluated on {eval} (have: "
                             f"{', '.join(sorted({str(eval_label(t.config)) for t in cands}))})")
            cands = kept
        nonempty = [t for t in cands if len(t)]
        if cands and not nonempty:
            notes.append(f"{metric}: the table is empty (no rows computed yet)")
        if nonempty:
            candidates[metric] = nonempty
    order = [m for m in METRIC_ORDER if m in candidates] + sorted(m for m in candidates if m not in METRIC_ORDER)
    chosen: dict[str, Table] = {}
    for metric in order:
        def score(t: Table) -> tuple:
            agree, disagree = _links(t, chosen)
            return (-disagree, agree, len(t), str(t.updated), [-ord(c) for c in t.hash])

        chosen[metric] = max(candidates[metric], key=score)
    unused = {m: [t for t in candidates[m] if t is not chosen[m]] for m in order}
    return chosen, {m: ts for m, ts in unused.items() if ts}, notes
