"""Evaluation data: datasets rebuilt from specs, materialised once as tensors kept on the device."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import AnalysisError

__all__ = ["materialize", "fingerprint", "subset_indices", "DEFAULT_SUBSET"]

#: n of the default evaluation data ``subset:2000`` (trajectory.analysis.DEFAULT_EVAL); see :func:`subset_indices`.
DEFAULT_SUBSET = 2000


def materialize(dataset: Any, *, what: str = "dataset", adapter: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a map-style dataset as two tensors (inputs, labels), in dataset order.

    Items may be ``(x, y)`` pairs, dicts with a ``labels``/``label`` key (Hugging Face style: the other
    numeric fields, in sorted key order, are stacked into one (N, K, ...) input tensor, which the
    ``huggingface`` adapter's wrapped model unpacks), or anything ``adapter.batch`` maps (an
    :class:`~trajectory.adapters.Adapter` or its name). ``TensorDataset``-like objects (a ``tensors``
    attribute) are used directly; anything else is read once in dataset order.
    """
    tensors = getattr(dataset, "tensors", None)
    if adapter is None and isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        x, y = tensors[0], tensors[1]
    else:
        try:
            n = len(dataset)
        except TypeError:
            raise AnalysisError(f"the {what} has no length; the analyzer needs a map-style dataset") from None
        if n == 0:
            raise AnalysisError(f"the {what} is empty")
        from ..adapters import get_adapter
        from ..errors import SpecError

        ad = get_adapter(adapter)
        xs, ys = [], []
        try:
            for xb, yb in DataLoader(range(n), batch_size=256, shuffle=False, num_workers=0, collate_fn=lambda ids: _batch(dataset, ids, ad)):
                xs.append(xb)
                ys.append(yb)
        except SpecError as err:
            raise AnalysisError(f"the {what}: {' '.join(str(err).split())}") from None
        x, y = torch.cat(xs), torch.cat(ys)
        if len(x) != n:
            raise AnalysisError(f"the {what} yielded {len(x)} items but reports length {n}")
    if len(x) == 0:
        raise AnalysisError(f"the {what} is empty")
    return x, y


def _batch(dataset: Any, ids: list[int], adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``ids`` of ``dataset`` collated (default collation) and mapped to (inputs, labels) by ``adapter``."""
    from torch.utils.data import default_collate

    items = [dataset[i] for i in ids]
    if isinstance(items[0], dict):  # drop fields default_collate cannot stack (strings, ragged lists)
        keep = [k for k in items[0] if _collatable(items[0][k])]
        items = [{k: it[k] for k in keep} for it in items]
    try:
        batch = default_collate(items)
    except (TypeError, RuntimeError) as err:
        from ..errors import SpecError

        raise SpecError(f"its items cannot be batched ({' '.join(str(err).split())}); items must be (x, y) pairs or dicts of equal-shape fields") from None
    x, y = adapter.batch(batch)
    return torch.as_tensor(x), torch.as_tensor(y)


def _collatable(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    if isinstance(value, (list, tuple)):
        try:
            torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return False
    return True


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes (shape and dtype included): identifies evaluation data in a config."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of ``n`` of ``n_total`` samples, sorted.

    An explicit ``n`` larger than the split is refused: the configuration would record ``subset:n`` for
    data that holds fewer samples. The default (``subset:2000``, :data:`DEFAULT_SUBSET`) on a smaller split
    takes every sample, as ``--eval train`` does. ``n == n_total`` gives every sample.
    """
    if n > n_total and n != DEFAULT_SUBSET:
        raise AnalysisError(
            f"--eval subset:{n} asks for more samples than the training split holds ({n_total}); "
            f"use --eval subset:{n_total} or --eval train"
        )
    if n >= n_total:
        return np.arange(n_total)
    g = torch.Generator().manual_seed(int(seed))
    return np.sort(torch.randperm(n_total, generator=g)[:n].numpy())
