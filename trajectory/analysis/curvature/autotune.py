"""Choose how an :class:`~.objective.Objective` computes Hessian-vector products, by timing the candidates.

Double backprop (``rev``) and forward-over-reverse (``fwd``) give the same products to float rounding, and so
does any cut of the data into chunks (only the summation order changes), so the fastest may be chosen per model
and device without changing a stored value beyond rounding. Which is fastest depends on the model (convolutions,
BatchNorm, tiny MLPs dominated by Python overhead) and the device, hence a measurement rather than a rule.

:func:`measure` times one product over one chunk of the data for each (mode, chunk) candidate, after a warm-up
per mode, and returns the choice with the measured rates (sample-HVPs per second). The analyzer does this once
per run, on the first curvature unit, and records the result (see ``choice()`` of the curvature metrics).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .objective import HVP_MODES, Objective

__all__ = ["measure", "chunk_candidates", "apply"]

#: stop trying larger chunks of a mode once one product over a chunk takes longer than this (seconds)
SLOW_S = 2.0
#: a timing longer than this is not repeated (repeats only tame the noise of short timings)
QUICK_S = 0.25


def chunk_candidates(obj: Objective) -> list[int]:
    """Chunk sizes worth timing: the memory-budget default, a quarter and four times it (within the data).
    Only the current cut where the batches may not change (BatchNorm 'train', sharded data)."""
    if not obj.rechunkable:
        return [obj.chunk]
    c0 = obj.default_chunk()
    cands = {max(1, min(obj.n_data, c)) for c in (c0 // 4, c0, 4 * c0) if c >= 16 or c == c0}
    return sorted(cands)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(obj: Objective, p: torch.Tensor, v: torch.Tensor, s: int, e: int, mode: str) -> float:
    """Seconds of one product over samples s:e; for ``rev`` with kept graphs (:attr:`Objective.keeps_graph`) the
    amortised cost, one double-backward pass through a graph built beforehand (untimed)."""
    kept = mode == "rev" and obj.operator == "hessian" and obj.keeps_graph
    if kept:
        q, g = obj._rev_graph(p, s, e)
    _sync(obj.device)
    t = time.perf_counter()
    if kept:
        obj._rev_apply(q, g, v, keep=True)
    else:
        obj.batch_products(p, v, s, e, mode)
    _sync(obj.device)
    return time.perf_counter() - t


def measure(obj: Objective, p: torch.Tensor, *, modes: Sequence[str] = HVP_MODES, chunks: Sequence[int] | None = None,
            reps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Time one product over the first ``chunk`` samples per (mode, chunk) candidate; return the fastest per sample.

    Returns ``{"hvp": mode, "chunk": samples, "by": "auto", "device": ..., "rates": {"mode/chunk": sample-HVPs/s},
    "samples_per_s": best rate, "kept_graph": whether rev keeps its gradient graphs}``. Candidates that run out of device memory are skipped. The products are not
    counted in ``obj.hvps`` nor reported as progress (they are overhead, a few products once per run). Under
    the GGN operator the mode does not matter; only chunks are timed."""
    p = p.detach()
    chunks = list(chunks) if chunks is not None else chunk_candidates(obj)
    if obj.bn == "train" or not obj.rechunkable:
        s0, e0 = obj.batches[0]
        chunks = [e0 - s0]
    else:
        s0 = 0
    modes = list(modes) if obj.operator == "hessian" else [obj.hvp_mode]
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((1, p.numel()), generator=gen, dtype=torch.float64).to(p.device, p.dtype)
    rates: dict[str, float] = {}
    for mode in modes:
        try:
            _time_once(obj, p, v, s0, s0 + min(chunks), mode)  # warm-up (allocator, torch.func set-up)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        for c in chunks:
            try:
                t = _time_once(obj, p, v, s0, s0 + c, mode)
                for _ in range(max(1, reps) - 1):
                    if t > QUICK_S:  # long enough to be a stable timing: don't pay for repeats
                        break
                    t = min(t, _time_once(obj, p, v, s0, s0 + c, mode))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            rates[f"{mode}/{c}"] = c / max(t, 1e-9)
            if t > SLOW_S:
                break
    if not rates:  # nothing fitted: keep what the objective had
        return {"hvp": obj.hvp_mode, "chunk": obj.chunk, "by": "default", "device": str(obj.device), "rates": {},
                "samples_per_s": None}
    best = max(rates, key=rates.__getitem__)
    mode, c = best.split("/")
    return {"hvp": mode, "chunk": int(c), "by": "auto", "device": str(obj.device),
            "rates": {k: round(r, 3) for k, r in rates.items()}, "samples_per_s": round(rates[best], 3),
            "kept_graph": bool(obj.operator == "hessian" and obj.keeps_graph)}


def apply(obj: Objective, choice: dict[str, Any]) -> Objective:
    """Set the objective's HVP mode and (where its batches may change) chunk from a :func:`measure` result."""
    if obj.operator == "hessian" and choice.get("hvp") in HVP_MODES:
        obj.hvp_mode = choice["hvp"]
    c = choice.get("chunk")
    if c and obj.rechunkable and obj.chunk != min(int(c), obj.n_data):
        obj.rechunk(int(c))
    return obj
