"""What an archive holds, in one dict: the data behind ``sgdwalk info``.

:func:`archive_info` reads only bookkeeping (steps, counts, scalars, attributes), never parameter
rows, so it is fast on archives of any size. :func:`format_info` renders the dict as the text table
the CLI prints; ``sgdwalk info --json`` prints the dict itself.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .layout import BUFFERS, BUFFERS_INT, PARAMS, ROW_DATASETS

__all__ = ["archive_info", "format_info"]


def _spec_dict(value: Any) -> dict[str, Any] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {"target": value, "kwargs": {}}
    return value if isinstance(value, dict) else {"target": str(value), "kwargs": {}}


def _number(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def archive_info(source: Any) -> dict[str, Any]:
    """Summary of an archive (a path or an open :class:`~trajectory.Trajectory`) as a JSON-ready dict.

    Keys: ``path``, ``format``, ``format_version``, ``records``, ``first_step``, ``last_step``,
    ``schedule``, ``parameters``, ``buffers`` (``float``, ``int``), ``file_bytes``, ``raw_bytes``
    (records x row bytes), ``row_bytes``, ``compression_ratio``, ``codec``, ``lossy``,
    ``closed_cleanly``, ``checksums`` (every chunk carries a Fletcher32 checksum), ``archive_uuid`` (or None), ``nonfinite`` (``records``, ``first_step``, ``values``), ``batches``
    (``records_with_batch``, ``single_step_pairs``, ``replayable_pairs``), ``scalars`` (name ->
    ``count``, ``first_step``, ``first``, ``last_step``, ``last``), ``model_spec``, ``data_spec``,
    ``model_class``, ``optimizer``, ``optimizer_state`` (recorded optimizer-state keys, [] when none), ``seed``, ``versions``, ``created``, ``argv``, ``metadata``.
    Non-finite scalar values are reported as ``None`` (JSON has no NaN).
    """
    from .reader import Trajectory

    if isinstance(source, Trajectory):
        return _info(source)
    with Trajectory(source) as traj:
        return _info(traj)


def _info(traj: Any) -> dict[str, Any]:
    attrs = traj.attrs
    layout = traj.layout
    n = len(traj)
    steps = traj.steps
    row_bytes = 0
    for d in ROW_DATASETS:
        if layout.sizes[d]:
            row_bytes += layout.sizes[d] * layout.storage_dtype(d).itemsize
    opt_keys = list(traj.optimizer_state_keys)
    if opt_keys:  # optimizer-state rows are params-sized rows too (plus 8 bytes of state_step)
        row_bytes += len(opt_keys) * layout.sizes[PARAMS] * layout.storage_dtype(PARAMS).itemsize + 8
    file_bytes = os.path.getsize(traj.path)
    raw_bytes = n * row_bytes

    nonfinite = traj.nonfinite
    bad = np.flatnonzero(nonfinite > 0)

    batch_steps = np.asarray(traj.batch_steps, dtype=np.int64)
    has_batch = np.isin(steps, batch_steps) if n else np.zeros(0, bool)
    single = (np.diff(steps) == 1) if n > 1 else np.zeros(0, bool)
    replayable = single & has_batch[:-1] if n > 1 else np.zeros(0, bool)

    scalars: dict[str, Any] = {}
    for name in traj.scalar_names:
        s_steps, values = traj.scalar_history(name)
        if len(s_steps) == 0:
            continue
        order = np.argsort(s_steps, kind="stable")
        s_steps, values = s_steps[order], values[order]
        scalars[name] = {
            "count": int(len(s_steps)),
            "first_step": int(s_steps[0]),
            "first": _number(values[0]),
            "last_step": int(s_steps[-1]),
            "last": _number(values[-1]),
            "nonfinite": int(np.count_nonzero(~np.isfinite(values))),
        }

    schedule = attrs.get("schedule")
    optimizer = attrs.get("optimizer") or None
    seed = attrs.get("seed")
    seed = None if seed is None or int(seed) < 0 else int(seed)
    version_keys = ("sgdwalk_version", "torch_version", "h5py_version", "hdf5_version", "python_version")
    versions = {k[: -len("_version")]: str(attrs[k]) for k in version_keys if k in attrs}
    return {
        "path": traj.path,
        "format": attrs.get("format"),
        "format_version": int(attrs.get("format_version", 0)),
        "records": n,
        "first_step": int(steps[0]) if n else None,
        "last_step": int(steps[-1]) if n else None,
        "schedule": schedule if isinstance(schedule, dict) else (schedule or None),
        "parameters": int(layout.sizes[PARAMS]),
        "buffers": {"float": int(layout.sizes[BUFFERS]), "int": int(layout.sizes[BUFFERS_INT])},
        "tensors": len(layout),
        "file_bytes": int(file_bytes),
        "row_bytes": int(row_bytes),
        "raw_bytes": int(raw_bytes),
        "compression_ratio": round(raw_bytes / file_bytes, 3) if file_bytes and raw_bytes else None,
        "codec": traj.codec.name,
        "lossy": bool(traj.lossy),
        "closed_cleanly": bool(traj.closed_cleanly),
        "checksums": bool(traj.checksums),
        "archive_uuid": traj.uuid,
        "nonfinite": {
            "records": int(len(bad)),
            "first_step": int(steps[bad[0]]) if len(bad) else None,
            "values": int(nonfinite.sum()) if n else 0,
        },
        "batches": {
            "records_with_batch": int(has_batch.sum()),
            "single_step_pairs": int(single.sum()),
            "replayable_pairs": int(replayable.sum()),
        },
        "scalars": scalars,
        "model_spec": _spec_dict(attrs.get("model_spec")),
        "data_spec": _spec_dict(attrs.get("data_spec")),
        "model_class": attrs.get("model_class") or None,
        "optimizer": optimizer if isinstance(optimizer, dict) else (optimizer or None),
        "optimizer_state": opt_keys,
        "seed": seed,
        "versions": versions,
        "created": attrs.get("created"),
        "argv": attrs.get("argv") if isinstance(attrs.get("argv"), list) else None,
        "metadata": attrs.get("metadata") if isinstance(attrs.get("metadata"), dict) else (attrs.get("metadata") or {}),
    }


# ------------------------------------------------------------------------------------ text rendering
def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _schedule_text(s: Any) -> str:
    if not isinstance(s, dict):
        return str(s) if s else "-"
    kind = s.get("kind")
    if kind == "every":
        k, start = s.get("k", 1), s.get("start", 0)
        text = "every step" if k == 1 else f"every {k} steps"
        return text + (f" from {start}" if start else "")
    if kind == "steps":
        st = s.get("steps", [])
        return f"steps {', '.join(map(str, st[:8]))}{' ...' if len(st) > 8 else ''}"
    if kind == "pairs":
        parts = []
        if s.get("at"):
            at = s["at"]
            parts.append(f"pairs at {', '.join(map(str, at[:8]))}{' ...' if len(at) > 8 else ''}")
        if s.get("period"):
            parts.append(f"pairs every {s['period']}" + (f" from {s['offset']}" if s.get("offset") else ""))
        return "; ".join(parts) or "pairs"
    if kind == "windows":
        return ", ".join(f"[{a}, {'end' if b is None else b}) every {k}" for a, b, k in s.get("windows", []))
    if kind == "union":
        return " + ".join(_schedule_text(m) for m in s.get("members", []))
    return json.dumps(s, sort_keys=True)


def _spec_text(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "-"
    kwargs = spec.get("kwargs") or {}
    return f"{spec.get('target')} {json.dumps(kwargs, sort_keys=True)}" if kwargs else str(spec.get("target"))


def _value(v: Any) -> str:
    if v is None:
        return "nan/inf"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _optimizer_text(opt: Any) -> str:
    if not isinstance(opt, dict):
        return str(opt) if opt else "-"
    cls = str(opt.get("class", "?")).rsplit(".", 1)[-1]
    groups = opt.get("param_groups") or [opt.get("defaults") or {}]
    g = groups[0] if groups else {}
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps")
    shown = ", ".join(f"{k}={g[k]}" for k in keys if k in g)
    more = f" ({len(groups)} param groups)" if len(groups) > 1 else ""
    return f"{cls}({shown}){more}"


def format_info(info: dict[str, Any]) -> str:
    """Render :func:`archive_info`'s dict as an aligned, human-readable table."""
    rows: list[tuple[str, str]] = []
    warnings: list[str] = []
    if info["lossy"]:
        warnings.append(
            f"LOSSY ARCHIVE: codec {info['codec']} rounds the stored values; records are not bit-exact "
            "and replayed updates will not match exactly"
        )
    if not info["closed_cleanly"]:
        warnings.append(
            "NOT CLOSED CLEANLY: the writer is still running or was killed; records up to its last flush are valid"
        )
    nf = info["nonfinite"]
    if nf["records"]:
        warnings.append(f"NON-FINITE VALUES: {nf['records']} record(s) contain NaN/Inf, the first at step {nf['first_step']}")

    rows.append(("archive", info["path"]))
    rows.append(("format", f"{info['format']} v{info['format_version']}"))
    if info["records"]:
        rows.append(("records", f"{info['records']} (steps {info['first_step']} to {info['last_step']})"))
    else:
        rows.append(("records", "0"))
    rows.append(("schedule", _schedule_text(info["schedule"])))
    b = info["buffers"]
    rows.append(("parameters", f"{info['parameters']:,} values ({info['tensors']} state-dict tensors in all)"))
    rows.append(("buffers", f"{b['float']:,} float, {b['int']:,} int"))
    ratio = info["compression_ratio"]
    rows.append(("codec", f"{info['codec']} ({'LOSSY' if info['lossy'] else 'lossless'})"))
    rows.append(
        (
            "size",
            f"{_bytes(info['file_bytes'])} on disk, {_bytes(info['raw_bytes'])} raw"
            + (f", ratio {ratio:.2f}x" if ratio else ""),
        )
    )
    rows.append(("closed cleanly", "yes" if info["closed_cleanly"] else "NO"))
    rows.append(
        ("checksums", "Fletcher32 on every chunk, verified on read" if info.get("checksums")
         else "none (written before checksums: corrupt chunk data cannot be detected)")
    )
    rows.append(("archive uuid", info.get("archive_uuid") or "none (written before archive UUIDs)"))
    rows.append(
        ("non-finite", "none" if not nf["records"] else f"{nf['records']} record(s), first at step {nf['first_step']}")
    )
    bt = info["batches"]
    rows.append(
        (
            "batch indices",
            f"{bt['records_with_batch']} of {info['records']} records; "
            f"{bt['replayable_pairs']} of {bt['single_step_pairs']} single-step pairs replayable",
        )
    )
    for name, s in info["scalars"].items():
        rows.append(
            (
                f"scalar {name}",
                f"{_value(s['first'])} (step {s['first_step']}) -> {_value(s['last'])} (step {s['last_step']}), {s['count']} values",
            )
        )
    rows.append(("model", _spec_text(info["model_spec"])))
    if info.get("model_class"):
        rows.append(("model class", info["model_class"]))
    rows.append(("data", _spec_text(info["data_spec"])))
    rows.append(("optimizer", _optimizer_text(info["optimizer"])))
    if info.get("optimizer_state"):
        rows.append(("optimizer state", ", ".join(info["optimizer_state"])))
    rows.append(("seed", "-" if info["seed"] is None else str(info["seed"])))
    rows.append(("created", str(info["created"] or "-")))
    if info["versions"]:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())))
    for k, v in (info["metadata"] or {}).items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        rows.append((f"meta {k}", text))

    width = max(len(k) for k, _ in rows)
    lines = [f"!! {w}" for w in warnings]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
