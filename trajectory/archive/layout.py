"""The layout table: how a flat row of an archive maps back to ``model.state_dict()``.

An archive stores every record as flat rows (one for parameters, one for floating buffers, one
for integer buffers) because flat rows compress well, read in one call, and are exactly what the
analyzer stacks and interpolates. The layout table is the only thing needed to turn a row back
into named tensors, so it is stored in the archive as a plain compound dataset that any HDF5
reader can use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from ..errors import LayoutMismatchError

__all__ = ["LayoutEntry", "Layout", "PARAMS", "BUFFERS", "BUFFERS_INT", "ROW_DATASETS", "LAYOUT_DTYPE", "LAYOUT_DTYPE_NAMES",
           "FLOAT_DTYPE_NAMES"]

#: Names of the three row datasets; every layout entry lives in exactly one of them.
PARAMS = "params"
BUFFERS = "buffers"
BUFFERS_INT = "buffers_int"
ROW_DATASETS = (PARAMS, BUFFERS, BUFFERS_INT)

# torch dtype <-> the string stored in the layout table.
_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}

# Widest float first: the storage dtype of a float row is the widest dtype it holds, so the
# upcast is exact and the values read back bit-exact after the cast to each entry's own dtype.
_FLOAT_WIDTH = {"float64": 3, "float32": 2, "float16": 1, "bfloat16": 1}

_MAX_NAME = 256
_TABLE_DTYPE = np.dtype(
    [
        ("name", f"S{_MAX_NAME}"),
        ("dataset", "S16"),
        ("dtype", "S16"),
        ("shape", "S64"),
        ("offset", "<i8"),
        ("numel", "<i8"),
    ]
)

#: The stored layout table's compound dtype and the tensor dtype names it may hold (readers validate both).
LAYOUT_DTYPE = _TABLE_DTYPE
LAYOUT_DTYPE_NAMES = frozenset(_DTYPES)
FLOAT_DTYPE_NAMES = frozenset(_FLOAT_WIDTH)


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of the state dict: where it sits in which row dataset, and its shape/dtype."""

    name: str
    dataset: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def stop(self) -> int:
        return self.offset + self.numel


class Layout:
    """Ordered map from state-dict names to slices of the flat rows.

    Build it with :meth:`from_module`; it follows ``state_dict()`` order, puts parameters in the
    ``params`` row, floating buffers in ``buffers`` and integer/bool buffers (BatchNorm's
    ``num_batches_tracked``) in ``buffers_int``. Tied parameters (one tensor under two names)
    are stored once, under the first name, as ``named_parameters()`` does.
    """

    def __init__(self, entries: Iterable[LayoutEntry]):
        self.entries: tuple[LayoutEntry, ...] = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}
        self.sizes = {d: sum(e.numel for e in self.entries if e.dataset == d) for d in ROW_DATASETS}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, model: torch.nn.Module) -> "Layout":
        param_names = {name for name, _ in model.named_parameters()}
        buffer_names = {name for name, _ in model.named_buffers()}
        entries: list[LayoutEntry] = []
        offsets = dict.fromkeys(ROW_DATASETS, 0)
        # keep_vars keeps Parameters as such; state_dict() already drops tied duplicates' aliases
        # only for parameters registered twice, so we deduplicate by name sets instead.
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in param_names:
                ds = PARAMS
            elif name in buffer_names:
                ds = BUFFERS if tensor.is_floating_point() else BUFFERS_INT
            else:  # extra state or a non-persistent oddity: it is not a tensor we can row-store
                continue
            if tensor.is_complex():
                raise LayoutMismatchError(
                    f"state dict entry {name!r} is complex ({tensor.dtype}); sgdwalk archives store real tensors only"
                )
            if len(name) > _MAX_NAME:
                raise LayoutMismatchError(f"state dict name longer than {_MAX_NAME} characters: {name[:60]}...")
            dtype = _DTYPE_NAMES.get(tensor.dtype)
            if dtype is None:
                raise LayoutMismatchError(f"state dict entry {name!r} has unsupported dtype {tensor.dtype}")
            n = tensor.numel()
            entries.append(LayoutEntry(name, ds, dtype, tuple(tensor.shape), offsets[ds], n))
            offsets[ds] += n
        if not any(e.dataset == PARAMS for e in entries):
            raise LayoutMismatchError("the model has no parameters to record")
        return cls(entries)

    # ------------------------------------------------------------------ storage
    def storage_dtype(self, dataset: str) -> np.dtype:
        """Widest dtype among a row's entries: the exact, lossless on-disk dtype of that row."""
        kinds = [e.dtype for e in self.entries if e.dataset == dataset]
        if dataset == BUFFERS_INT:
            return np.dtype("int64")
        if not kinds:
            return np.dtype("float32")
        widest = max(kinds, key=lambda k: _FLOAT_WIDTH[k])
        if widest == "bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            widest = "float32"
        if widest == "float16" and any(k == "bfloat16" for k in kinds):
            widest = "float32"
        return np.dtype(widest)

    def to_table(self) -> np.ndarray:
        table = np.zeros(len(self.entries), dtype=_TABLE_DTYPE)
        for i, e in enumerate(self.entries):
            table[i] = (
                e.name.encode(),
                e.dataset.encode(),
                e.dtype.encode(),
                ",".join(map(str, e.shape)).encode(),
                e.offset,
                e.numel,
            )
        return table

    @classmethod
    def from_table(cls, table: np.ndarray) -> "Layout":
        entries = []
        for row in table:
            shape_text = row["shape"].decode()
            shape = tuple(int(s) for s in shape_text.split(",")) if shape_text else ()
            entries.append(
                LayoutEntry(
                    row["name"].decode(),
                    row["dataset"].decode(),
                    row["dtype"].decode(),
                    shape,
                    int(row["offset"]),
                    int(row["numel"]),
                )
            )
        return cls(entries)

    # ------------------------------------------------------------------ mapping
    def names(self, dataset: str | None = None) -> list[str]:
        return [e.name for e in self.entries if dataset is None or e.dataset == dataset]

    def __getitem__(self, name: str) -> LayoutEntry:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.entries == other.entries

    def __repr__(self) -> str:
        return (
            f"Layout({len(self.entries)} entries, params={self.sizes[PARAMS]}, "
            f"buffers={self.sizes[BUFFERS]}, buffers_int={self.sizes[BUFFERS_INT]})"
        )

    def check_module(self, model: torch.nn.Module) -> None:
        """Raise :class:`LayoutMismatchError` (one line) unless ``model`` has exactly this layout."""
        try:
            other = Layout.from_module(model)
        except LayoutMismatchError:
            raise
        if other == self:
            return
        mine, theirs = {e.name: e for e in self.entries}, {e.name: e for e in other.entries}
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        if missing or extra:
            raise LayoutMismatchError(
                f"model does not match the archive: {len(missing)} archived tensors missing from the model "
                f"(e.g. {missing[:2]}), {len(extra)} model tensors not in the archive (e.g. {extra[:2]}); "
                "build the model with the archive's model spec"
            )
        for n, e in mine.items():
            o = theirs[n]
            if o.shape != e.shape:
                raise LayoutMismatchError(
                    f"model does not match the archive: {n!r} has shape {list(o.shape)} in the model but "
                    f"{list(e.shape)} in the archive; build the model with the archive's model spec"
                )
            if o.dtype != e.dtype:
                raise LayoutMismatchError(
                    f"model does not match the archive: {n!r} is {o.dtype} in the model but {e.dtype} in the "
                    "archive; cast the model (e.g. model.to(torch.float32)) before loading"
                )
        raise LayoutMismatchError("model does not match the archive: state-dict order differs")

    def flatten(self, tensors: Mapping[str, torch.Tensor], dataset: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate the named tensors of one row dataset into a flat vector (on their device)."""
        parts = [tensors[e.name].detach().reshape(-1) for e in self.entries if e.dataset == dataset]
        dtype = _DTYPES.get(str(self.storage_dtype(dataset)), torch.float32)
        if not parts:
            return torch.empty(0, dtype=dtype) if out is None else out
        parts = [p if p.dtype == dtype else p.to(dtype) for p in parts]
        if out is None:
            return torch.cat(parts)
        return torch.cat(parts, out=out)

    def unflatten(self, row: torch.Tensor, dataset: str) -> dict[str, torch.Tensor]:
        """Split a flat row back into named tensors with their own shapes and dtypes (views where possible)."""
        if row.numel() != self.sizes[dataset]:
            raise LayoutMismatchError(
                f"row of dataset {dataset!r} has {row.numel()} values but the layout expects {self.sizes[dataset]}"
            )
        out = {}
        for e in self.entries:
            if e.dataset != dataset:
                continue
            t = row[e.offset : e.stop].view(e.shape)
            out[e.name] = t if t.dtype == e.torch_dtype else t.to(e.torch_dtype)
        return out
