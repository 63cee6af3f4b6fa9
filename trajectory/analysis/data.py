"""Evaluation data: datasets rebuilt from specs, materialised once as tensors kept on the device."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import AnalysisError

__all__ = ["materialize", "fingerprint", "subset_indices"]


def materialize(dataset: Any, *, what: str = "dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a map-style dataset as two tensors (inputs, labels), in dataset order.

    ``TensorDataset``-like objects (a ``tensors`` attribute) are used directly; anything else is
    read once through a DataLoader (default collation).
    """
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        x, y = tensors[0], tensors[1]
    else:
        try:
            n = len(dataset)
        except TypeError:
            raise AnalysisError(f"the {what} has no length; the analyzer needs a map-style dataset") from None
        xs, ys = [], []
        for xb, yb in DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0):
            xs.append(torch.as_tensor(xb))
            ys.append(torch.as_tensor(yb))
        if not xs:
            raise AnalysisError(f"the {what} is empty")
        x, y = torch.cat(xs), torch.cat(ys)
        if len(x) != n:
            raise AnalysisError(f"the {what} yielded {len(x)} items but reports length {n}")
    if len(x) == 0:
        raise AnalysisError(f"the {what} is empty")
    return x, y


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes (shape and dtype included): identifies evaluation data in a config."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of ``n`` of ``n_total`` samples (all of them when n >= n_total), sorted."""
    if n >= n_total:
        return np.arange(n_total)
    g = torch.Generator().manual_seed(int(seed))
    return np.sort(torch.randperm(n_total, generator=g)[:n].numpy())
