"""State the curvature metrics share within one analysis run, and only within it.

Two things are worth sharing between metrics of one run:

* the measured HVP mode and chunk (:mod:`.autotune`): timed once, on the first curvature unit;
* top eigenpairs: ``sharpness`` needs the top Hessian eigenvalue that ``hessian_top`` (default options) computes
  at the same point with the same Lanczos options and the same seeded start vector, so whichever runs first
  computes it and the other reuses it instead of running Lanczos again.

The cache hangs off an object that lives exactly as long as the run (the run's evaluator) in a
:class:`weakref.WeakKeyDictionary`, so it goes away with the run and never leaks into the next one. It is
bounded: at most ``max_entries`` eigen results, and their eigenvectors (the only large part) within
``vector_bytes``; older entries lose their vectors first (their eigenvalues and residuals stay usable for
consumers that need no vectors, like ``sharpness``), then whole entries go, oldest first.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Hashable

import torch

from .linalg import EigenResult

__all__ = ["RunCache", "run_cache", "fingerprint"]

VECTOR_BYTES = 256 << 20
MAX_ENTRIES = 4096


class RunCache:
    """Per-run shared curvature state (see the module docstring)."""

    def __init__(self, vector_bytes: int = VECTOR_BYTES, max_entries: int = MAX_ENTRIES):
        self.vector_bytes = int(vector_bytes)
        self.max_entries = int(max_entries)
        self.choices: dict[Hashable, dict[str, Any]] = {}
        self._eigen: OrderedDict[Hashable, EigenResult] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _bytes(self) -> int:
        return sum(r.vectors.numel() * r.vectors.element_size() for r in self._eigen.values() if r.vectors is not None)

    def get_eigen(self, key: Hashable, need_vectors: bool) -> EigenResult | None:
        """The stored result for ``key`` (None if absent, or if vectors are needed and were dropped)."""
        r = self._eigen.get(key)
        if r is None or (need_vectors and r.vectors is None):
            self.misses += 1
            return None
        self._eigen.move_to_end(key)
        self.hits += 1
        return r

    def put_eigen(self, key: Hashable, result: EigenResult) -> None:
        """Store a result, then shed vectors and entries (oldest first) until within the bounds."""
        self._eigen[key] = result
        self._eigen.move_to_end(key)
        while len(self._eigen) > self.max_entries:
            self._eigen.popitem(last=False)
        total = self._bytes()
        for k in list(self._eigen):
            if total <= self.vector_bytes:
                break
            r = self._eigen[k]
            if r.vectors is not None:
                total -= r.vectors.numel() * r.vectors.element_size()
                self._eigen[k] = replace(r, vectors=None)

    def __len__(self) -> int:
        return len(self._eigen)


_CACHES: "weakref.WeakKeyDictionary[Any, RunCache]" = weakref.WeakKeyDictionary()


def run_cache(owner: Any) -> RunCache:
    """The cache of the run that ``owner`` (the run's evaluator) belongs to; a fresh, unshared one when the
    owner cannot be weakly referenced (nothing is then shared, which is always correct)."""
    try:
        cache = _CACHES.get(owner)
        if cache is None:
            cache = _CACHES[owner] = RunCache()
        return cache
    except TypeError:
        return RunCache()


def fingerprint(p: torch.Tensor) -> tuple:
    """A cheap identity of a parameter vector (size, dtype, device, sum and a strided sum of squares): part of the
    eigen cache key, so a result is reused only at the point it was computed for."""
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return (flat.numel(), str(flat.dtype), str(flat.device), float(flat.double().sum()),
            float(flat[::step].double().square().sum()))
