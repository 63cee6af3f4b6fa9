"""Run-level summaries of a results file: the table printed by ``sgdwalk analyze``/``sgdwalk show``."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from .errors import AnalysisError, MetricError
from .heights import height_split
from .metric import get_metric
from .results import ResultsFile, Table

__all__ = ["summarize_tables", "summarize_file", "format_summary"]


def _describe(cfg: dict) -> str:
    shared = cfg.get("shared")
    parts = []
    if shared:
        ev = shared.get("eval", {})
        kind = ev.get("kind", "?")
        parts.append(f"eval={kind}:{ev['n']}" if kind == "subset" else f"eval={kind}")
        parts.append(f"bn={shared.get('bn')}")
        if "bn_batch" in shared:  # BatchNorm batch (train groups / recompute batches) and recompute batch count
            parts.append(f"bn_batch={shared['bn_batch']}" + (f"x{shared['bn_batches']}" if "bn_batches" in shared else ""))
        if shared.get("noise"):
            parts.append(f"noise={shared['noise']}")
        parts.append(shared.get("dtype", ""))
    if not shared:
        parts.append("parameters only")
    opts = cfg.get("options", {})
    if opts.get("significance"):
        parts.append(f"significance={opts['significance']:g}se")
    if "alphas" in opts and cfg.get("metric") == "interpolation":
        al = opts["alphas"]
        parts.append(f"alphas={al[0]:g}..{al[-1]:g}({len(al)})")
    return " ".join(p for p in parts if p)


def _metric_for(t: Table) -> Any:
    """The metric configured as the table was computed (its stored options, e.g. the interpolation grid, which
    the summary needs to read a = 0); the defaults when the stored options no longer validate."""
    cls = get_metric(t.metric)
    opts = t.config.get("options", {}) if isinstance(t.config, dict) else {}
    try:
        return cls(**{k: v for k, v in opts.items() if k in cls.defaults})
    except (AnalysisError, TypeError, ValueError):
        return cls()


def summarize_tables(store: ResultsFile, tables: Sequence[Table]) -> dict[str, Any]:
    out = {
        "results": os.path.abspath(store.path),
        "archive": store.attrs.get("archive_path", ""),
        "archive_id": store.attrs.get("archive_id", ""),
        "tables": [],
    }
    for t in tables:
        arr = t.arrays()
        entry: dict[str, Any] = {
            "metric": t.metric,
            "config_hash": t.hash[:16],
            "describe": _describe(t.config),
            "config": t.config,
            "rows": len(t),
            "rows_computed": t.rows_computed,
            "step_min": int(arr["step_a"].min()) if len(t) else None,
            "step_max": int(arr["step_b"].max()) if len(t) else None,
        }
        try:
            entry["summary"] = _metric_for(t).summarize(arr) if len(t) else {}
            if t.metric == "floor" and len(t) and "interior" in arr:
                entry["summary"].update(height_split(arr))
        except MetricError:
            entry["summary"] = {"note": f"metric {t.metric!r} is not installed here; rows only"}
        out["tables"].append(entry)
    return out


def summarize_file(path: str | os.PathLike) -> dict[str, Any]:
    store = ResultsFile(path, "r")
    return summarize_tables(store, [t for _, t in sorted(store.tables.items())])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


_LABELS = {
    "convex_interior_fraction": "convex+interior",
    "convex_fraction": "convex",
    "interior_fraction": "interior",
    "median_height": "median height (all)",
    "median_height_se": "median height se",
    "median_loss_se": "median loss se",
    "interior_pairs": "interior pairs",
    "median_interior_height": "median interior height",
    "descent_pairs": "descent steps",
    "median_descent_step": "median descent step",
    "floor_peaks_above_tol": "floor peaks above tol",
    "median_a_star": "median a*",
    "nonfinite_pairs": "nonfinite",
    "median_step_length": "median step",
    "final_dist_init": "final dist from θ0",
    "median_cos_prev": "median cos(prev)",
    "median_loss_start": "median L(θt)",
}


def _summary_text(summary: dict) -> str:
    parts = []
    for k, v in summary.items():
        if k == "pairs":
            continue
        if isinstance(v, dict):
            inner = ", ".join(f"{_LABELS.get(a, a.replace('_', ' '))} {_fmt(b)}" for a, b in v.items() if a != "spans")
            parts.append(f"{k.replace('span', 'span ')}: {inner}")
        elif k == "nonfinite_pairs" and not v:
            continue
        else:
            parts.append(f"{_LABELS.get(k, k.replace('_', ' '))} {_fmt(v)}")
    return "; ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"results {summary['results']}  (archive {summary.get('archive', '?')})"]
    header = f"{'metric':<14} {'config':<16} {'rows':>6} {'steps':>13}  settings / summary"
    lines.append(header)
    lines.append("-" * len(header))
    for t in summary["tables"]:
        steps = f"{t['step_min']}..{t['step_max']}" if t["rows"] else "-"
        lines.append(f"{t['metric']:<14} {t['config_hash']:<16} {t['rows']:>6} {steps:>13}  {t['describe']}")
        text = _summary_text(t.get("summary", {}))
        if text:
            lines.append(f"{'':<53}{text}")
    return "\n".join(lines)


def _clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def to_json(summary: dict[str, Any]) -> str:
    """Strict JSON (NaN and infinities become null)."""
    return json.dumps(_clean(summary), indent=2, default=str, allow_nan=False)
