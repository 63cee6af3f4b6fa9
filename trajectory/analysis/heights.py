"""Heights above the valley floor, split by where the floor lies (issue 13).

A pair whose floor is interior (a* strictly inside (0, 1), below both ends) has a height in the paper's sense:
how far the update climbed above the valley floor it crossed. A pair whose floor is an end of its segment
(a* = 1 for a plain descent step, a* = 0 when the step went uphill) has no floor inside the segment; its
"height" L(θ_t) − L(θ(a*)) is just the step's loss decrease (or 0). Pooling the two mixes two quantities, so
summaries and the report show them apart: ``interior`` heights and ``descent`` steps.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["height_groups", "height_split"]


def height_groups(rows: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(heights of interior-floor pairs, heights of the other finite pairs: descent steps), from floor rows."""
    h = np.asarray(rows["height"], dtype=np.float64)
    ok = np.isfinite(h) & ~np.asarray(rows["nonfinite"], dtype=bool)
    interior = np.asarray(rows["interior"], dtype=bool)
    return h[ok & interior], h[ok & ~interior]


def height_split(rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Summary entries: counts and medians of interior heights and of descent steps (NaN when a group is empty)."""
    inner, descent = height_groups(rows)
    med = lambda v: float(np.median(v)) if len(v) else float("nan")  # noqa: E731
    return {"interior_pairs": int(len(inner)), "median_interior_height": med(inner),
            "descent_pairs": int(len(descent)), "median_descent_step": med(descent)}
