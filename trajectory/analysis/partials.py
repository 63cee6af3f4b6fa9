"""Partial results files of distributed runs (``RESULTS.part-<rank>``): naming, discovery, folding in.

A module of its own because both runners need it: the torchrun runner writes partial files, and the
single-process runner folds in those an interrupted distributed run left behind before it computes
anything. Keeping it apart from :mod:`.distributed` keeps :mod:`.run` free of torch.distributed.
"""
from __future__ import annotations

import glob
import os

from .results import ResultsFile

__all__ = ["PART_SUFFIX", "part_path", "partial_files", "merge_partials"]

PART_SUFFIX = ".part-"


def part_path(out_path: str | os.PathLike, rank: int) -> str:
    """Partial results file of ``rank`` for the results file ``out_path``."""
    return f"{os.fspath(out_path)}{PART_SUFFIX}{int(rank)}"


def partial_files(out_path: str | os.PathLike) -> list[str]:
    """Every partial file left next to ``out_path`` (by any world size), sorted by rank."""
    base = os.fspath(out_path) + PART_SUFFIX
    found = [p for p in glob.glob(glob.escape(base) + "*") if p[len(base):].isdigit()]
    return sorted(found, key=lambda p: int(p[len(base):]))


def merge_partials(final: ResultsFile) -> int:
    """Fold every partial file of ``final`` into it, flush atomically, then delete the partial files.

    Idempotent: a partial file whose rows are already in ``final`` (a crash between the flush and the
    deletion) adds nothing. Returns the number of rows taken."""
    parts = partial_files(final.path)
    taken = 0
    for p in parts:
        taken += final.merge_from(ResultsFile(p, "r"))
    if taken or final.dirty:
        final.flush()
    for p in parts:
        os.unlink(p)
    return taken
