"""``sgdwalk verify``: read every chunk of an archive and check every invariant, listing the bad records.

Opening an archive already validates its structure (:class:`~trajectory.Trajectory`); reads verify each chunk's
Fletcher32 checksum as they go. ``verify`` goes further and reads *everything* once, so damage is found before an
analysis trips over it: every chunk of every dataset (row datasets one chunk row-block at a time, so a failure
names the records it holds), the recorded NaN/Inf counts against the decoded rows, and the minibatch indices.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ArchiveError
from . import format as fmt
from .layout import ROW_DATASETS

__all__ = ["verify_archive", "format_verify"]


def verify_archive(path: str | os.PathLike, *, data_size: int | None = None) -> dict[str, Any]:
    """Check an archive completely; return a JSON-ready report (``ok`` is False when anything is wrong).

    Raises :class:`~trajectory.errors.ArchiveError` (one line) when the archive cannot be opened at all.
    ``data_size`` (number of training samples), when given, bounds the stored minibatch indices.
    """
    from .reader import Trajectory

    path = os.fspath(path)
    problems: list[dict[str, Any]] = []
    with Trajectory(path, cache_bytes=0) as traj:
        n = len(traj)
        steps = traj.steps
        f = traj.file

        opt_rows = {fmt.optimizer_dataset(k): r for k, r in traj._opt_rows.items()}
        record_sets = set(ROW_DATASETS) | set(opt_rows) | {fmt.OPTIMIZER_STEP}

        def bad(dataset: str, start: int, stop: int, error: str) -> None:
            stop = min(stop, n) if dataset in record_sets else stop
            entry: dict[str, Any] = {"dataset": dataset, "first": int(start), "last": int(stop - 1), "error": error}
            if dataset in record_sets and n and start < n:
                entry["steps"] = [int(steps[start]), int(steps[max(start, stop - 1)])]
            problems.append(entry)

        nonfinite = None
        try:
            nonfinite = traj.nonfinite
        except ArchiveError as err:
            bad(fmt.NONFINITE, 0, n, str(err))
        counts = np.zeros(n, dtype=np.int64)
        for d, reader in traj._rows.items():
            rows = reader.chunk_rows
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                try:
                    block = reader.rows(start, stop, n)
                except ArchiveError as err:
                    bad(d, start, stop, str(err))
                    continue
                if block.dtype.kind == "f":
                    counts[start:stop] += block.shape[1] - np.count_nonzero(np.isfinite(block), axis=1)
        for d, reader in opt_rows.items():  # optimizer state: checksums only (nonfinite counts the state-dict rows)
            for start in range(0, n, reader.chunk_rows):
                stop = min(start + reader.chunk_rows, n)
                try:
                    reader.rows(start, stop, n)
                except ArchiveError as err:
                    bad(d, start, stop, str(err))
        if nonfinite is not None:
            for i in np.flatnonzero(nonfinite != counts):
                if not any(p["dataset"] in ROW_DATASETS and p["first"] <= i <= p["last"] for p in problems):
                    bad(fmt.NONFINITE, int(i), int(i) + 1,
                        f"record {int(i)} (step {int(steps[i])}) holds {int(counts[i])} NaN/Inf values but the archive recorded {int(nonfinite[i])}")
        for name in (fmt.RECORD_TIME, fmt.BATCH_INDICES, fmt.SCALARS) + ((fmt.OPTIMIZER_STEP,) if opt_rows else ()):
            d = f[name]
            chunk = d.chunks[0] if d.chunks else max(1, d.shape[0])
            for start in range(0, d.shape[0], chunk):
                try:
                    part = d[start : start + chunk]
                except (OSError, ValueError, RuntimeError) as err:
                    bad(name, start, min(start + chunk, d.shape[0]), f"stored chunk is corrupt ({' '.join(str(err).split())[:160]})")
                    continue
                if name == fmt.BATCH_INDICES and part.size:
                    low = part < 0
                    high = part >= data_size if data_size is not None else np.zeros_like(low)
                    if low.any() or high.any():
                        k = int(np.flatnonzero(low | high)[0])
                        bad(name, start + k, start + k + 1, f"sample index {int(part[k])} is outside the data set")
        info = {
            "path": path,
            "records": n,
            "checksums": traj.checksums,
            "closed_cleanly": traj.closed_cleanly,
            "archive_uuid": traj.uuid,
        }
    info["problems"] = problems
    info["ok"] = not problems
    return info


def format_verify(report: dict[str, Any]) -> str:
    """Human-readable lines: one summary, then one line per problem."""
    from ..textsafe import escape

    what = "every chunk checksum verified" if report["checksums"] else "NO CHECKSUMS (archive written before them: corruption of chunk data cannot be detected)"
    if report["ok"]:
        return f"ok: {escape(report['path'])}: {report['records']} records, {what}"
    lines = [f"DAMAGED: {escape(report['path'])}: {len(report['problems'])} problem(s) in {report['records']} records ({what})"]
    for p in report["problems"]:
        where = f"{p['first']}-{p['last']}" if p["last"] > p["first"] else f"{p['first']}"
        record_sets = (*ROW_DATASETS, fmt.NONFINITE, fmt.OPTIMIZER_STEP)
        unit = "records" if p["dataset"] in record_sets or p["dataset"].startswith(fmt.OPTIMIZER_GROUP + "/") else "entries"
        steps = f" (steps {p['steps'][0]}-{p['steps'][1]})" if p.get("steps") else ""
        lines.append(f"bad: {p['dataset']} {unit} {where}{steps}: {escape(p['error'])}")
    return "\n".join(lines)
