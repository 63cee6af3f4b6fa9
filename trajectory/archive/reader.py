"""The archive reader, :class:`Trajectory`: everything the analyzer needs, and nothing it must not do.

It opens archives read-only in HDF5 SWMR mode, so it can follow a file another process is
still writing (call :meth:`Trajectory.refresh`) and opens files whose writer was killed.
Rows are decoded lazily; a sequential sweep costs one disk row per record because the last
decoded row of each dataset is kept and the XOR chain continues from it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/zstd HDF5 filters the datasets use)
import numpy as np
import torch

from ..errors import ArchiveError, ArchiveFormatError, ArchiveVersionError, LayoutMismatchError
from . import format as fmt
from .codecs import Codec, bits_to_values, get_codec
from .layout import BUFFERS, BUFFERS_INT, PARAMS, ROW_DATASETS, Layout
from .recovery import check_not_truncated

__all__ = ["Trajectory", "Pair"]


@dataclass
class Pair:
    """Two consecutive records: the update from ``step_a`` to ``step_b``.

    ``batch_indices`` are the minibatch sample indices of the update leaving ``step_a`` (empty
    when they were not recorded); ``span = step_b - step_a`` is 1 for an exact single SGD step.
    """

    index: int
    step_a: int
    step_b: int
    params_a: torch.Tensor
    params_b: torch.Tensor
    batch_indices: np.ndarray

    @property
    def span(self) -> int:
        return self.step_b - self.step_a


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class _RowReader:
    """Decodes rows of one row dataset, continuing XOR chains from the last row it decoded."""

    def __init__(self, dset: h5py.Dataset):
        self.dset = dset
        self.logical = np.dtype(dset.attrs.get("logical_dtype", str(dset.dtype)))
        self.transform = str(dset.attrs.get("transform", "none"))
        self.chunk_rows = dset.chunks[0] if dset.chunks else 1
        self._block_codec = Codec("", self.transform, "none")
        self._last: tuple[int, np.ndarray] | None = None  # (row index, un-XOR-ed disk bits)

    def _bits(self, i: int) -> np.ndarray:
        """Un-XOR-ed disk row i (still in disk dtype)."""
        if self.transform.endswith("xor"):
            start = i - i % self.chunk_rows
            last = self._last
            if last is not None and last[0] == i:
                return last[1]
            if last is not None and last[0] == i - 1 and i != start:
                bits = np.bitwise_xor(last[1], self.dset[i])
            else:
                block = self.dset[start : i + 1]
                bits = np.bitwise_xor.reduce(block, axis=0) if len(block) > 1 else block[0]
        else:
            bits = self.dset[i]
        self._last = (i, bits)
        return bits

    def row(self, i: int) -> np.ndarray:
        return bits_to_values(self._bits(i), self.transform, self.logical)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) decoded in bulk (reads from the chunk boundary when XOR-ed)."""
        if stop <= start:
            return np.empty((0, self.dset.shape[1]), dtype=self.logical)
        if not self.transform.endswith("xor"):
            return self._block_codec.decode(self.dset[start:stop], self.logical)
        out = np.empty((stop - start, self.dset.shape[1]), dtype=self.logical)
        pos = start
        while pos < stop:
            cstart = pos - pos % self.chunk_rows
            cend = min(cstart + self.chunk_rows, stop)
            block = self._block_codec.decode(self.dset[cstart:cend], self.logical)
            out[pos - start : cend - start] = block[pos - cstart :]
            pos = cend
        return out


class Trajectory:
    """Read-only view of a recorded trajectory archive.

    >>> traj = Trajectory("run.h5")
    >>> len(traj), traj.steps[:3]
    >>> theta = traj.params(0)                  # 1-D tensor, bit-exact for lossless archives
    >>> model = traj.build_model(); traj.load_into(model, 5)
    >>> for pair in traj.pairs(): ...

    Parameters
    ----------
    path : str or PathLike
    locking : bool, optional
        Passed to h5py; ``False`` on network file systems whose locks do not work.
    """

    def __init__(self, path: str | os.PathLike, *, locking: bool | None = None):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ArchiveError(f"no such archive: {self.path}")
        if os.path.isdir(self.path):
            raise ArchiveError(f"{self.path} is a directory, not an archive file")
        kw = {} if locking is None else {"locking": locking}
        truncated = check_not_truncated(self.path)
        if truncated:
            raise ArchiveFormatError(f"{self.path} is truncated ({truncated}); re-record it or restore a complete copy")
        try:
            self._file = h5py.File(self.path, "r", libver="latest", swmr=True, **kw)
        except OSError as err:
            msg = _first_line(err)
            if "signature" in msg or "superblock" in msg or "truncated" in msg or "EOF" in msg:
                raise ArchiveFormatError(
                    f"{self.path} is not a readable HDF5 file (truncated or foreign: {msg}); re-record or restore it"
                ) from None
            if "lock" in msg.lower():
                raise ArchiveError(
                    f"{self.path} is locked by a writer that has not flushed yet ({msg}); wait for its first flush or pass locking=False"
                ) from None
            raise ArchiveFormatError(f"cannot open {self.path} as an archive: {msg}") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise
        self.layout = Layout.from_table(self._file[fmt.LAYOUT][()])
        self.codec = get_codec(str(self._file.attrs["codec"]))
        self._rows = {d: _RowReader(self._file[d]) for d in ROW_DATASETS if d in self._file}
        self._load_meta()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        f = self._file
        if f.attrs.get("format") != fmt.FORMAT_NAME:
            raise ArchiveFormatError(f"{self.path} is an HDF5 file but not an sgdwalk trajectory archive (no format attribute)")
        version = int(f.attrs.get("format_version", -1))
        if version > fmt.FORMAT_VERSION:
            raise ArchiveVersionError(
                f"{self.path} uses archive format v{version}, newer than v{fmt.FORMAT_VERSION} read by this sgdwalk; upgrade sgdwalk"
            )
        if version < 1:
            raise ArchiveFormatError(f"{self.path} has an invalid format_version {version}")
        for name in fmt.REQUIRED_DATASETS:
            if name not in f:
                raise ArchiveFormatError(f"{self.path} lacks the required dataset '{name}'; the file is damaged or incomplete")
        if "codec" not in f.attrs:
            raise ArchiveFormatError(f"{self.path} lacks the 'codec' attribute; the file is damaged")
        try:
            get_codec(str(f.attrs["codec"]))
        except ValueError:
            raise ArchiveVersionError(f"{self.path} uses codec {f.attrs['codec']!r} unknown to this sgdwalk; upgrade sgdwalk") from None

    def _load_meta(self) -> None:
        f = self._file
        n = f[fmt.STEPS].shape[0]
        for d in self._rows:
            n = min(n, f[d].shape[0])
        self._n = n
        self._steps = f[fmt.STEPS][:n].astype(np.int64)
        self._batch_step = f[fmt.BATCH_STEP][()]
        nb = len(self._batch_step)
        ends = f[fmt.BATCH_END][:nb]
        nb = min(nb, len(ends))
        self._batch_step, self._batch_end = self._batch_step[:nb], ends[:nb]
        self._scalars_raw = None

    def refresh(self) -> int:
        """See records a live writer flushed since opening (SWMR); returns the new record count."""
        for reader in self._rows.values():
            reader.dset.refresh()
        for name in (fmt.STEPS, fmt.RECORD_TIME, fmt.NONFINITE, fmt.BATCH_STEP, fmt.BATCH_END, fmt.BATCH_INDICES, fmt.SCALARS):
            self._file[name].refresh()
        self._load_meta()
        return self._n

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"Trajectory({self.path!r}, records={self._n}, params={self.n_params}, codec={self.codec.name!r})"

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def file(self) -> h5py.File:
        """The underlying read-only h5py file, for anything this class does not wrap."""
        return self._file

    @property
    def steps(self) -> np.ndarray:
        """Optimizer step of each record (number of updates applied before the recorded state)."""
        return self._steps

    @property
    def n_params(self) -> int:
        return self.layout.sizes[PARAMS]

    @property
    def n_buffers(self) -> int:
        return self.layout.sizes[BUFFERS] + self.layout.sizes[BUFFERS_INT]

    @property
    def lossy(self) -> bool:
        return bool(self._file.attrs.get("lossy", False))

    @property
    def closed_cleanly(self) -> bool:
        """False while a writer is still running or after it was killed; records up to its last flush are valid."""
        return bool(self._file.attrs.get("closed_cleanly", False))

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes, with JSON-encoded ones decoded."""
        out = {}
        for k, v in self._file.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v
        return out

    def index_of_step(self, step: int) -> int:
        """Record index holding the state after ``step`` updates; KeyError if not recorded."""
        i = int(np.searchsorted(self._steps, step))
        if i < self._n and self._steps[i] == step:
            return i
        raise KeyError(f"step {step} is not recorded in {self.path}")

    def _check_index(self, i: int) -> int:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"record {i} out of range: {self.path} holds {self._n} records")
        return i

    # ------------------------------------------------------------------ rows
    def _row(self, dataset: str, i: int) -> torch.Tensor:
        i = self._check_index(i)
        if dataset not in self._rows:
            dtype = torch.int64 if dataset == BUFFERS_INT else torch.float32
            return torch.empty(0, dtype=dtype)
        return torch.from_numpy(np.array(self._rows[dataset].row(i), copy=True))

    def params(self, i: int) -> torch.Tensor:
        """Parameters of record ``i`` as one flat tensor in layout order (a fresh copy)."""
        return self._row(PARAMS, i)

    def buffers(self, i: int) -> torch.Tensor:
        """Floating buffers (e.g. BatchNorm running statistics) of record ``i``, flat."""
        return self._row(BUFFERS, i)

    def int_buffers(self, i: int) -> torch.Tensor:
        """Integer buffers (e.g. BatchNorm ``num_batches_tracked``) of record ``i``, flat int64."""
        return self._row(BUFFERS_INT, i)

    def params_block(self, start: int, stop: int) -> torch.Tensor:
        """Parameters of records [start, stop) as a 2-D tensor, decoded chunk by chunk."""
        start, stop = max(0, start), min(stop, self._n)
        return torch.from_numpy(self._rows[PARAMS].rows(start, stop))

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Record ``i`` as a state dict (names, shapes and dtypes of the recorded model)."""
        out: dict[str, torch.Tensor] = {}
        for d, get in ((PARAMS, self.params), (BUFFERS, self.buffers), (BUFFERS_INT, self.int_buffers)):
            if self.layout.sizes[d]:
                out.update(self.layout.unflatten(get(i), d))
        return {e.name: out[e.name] for e in self.layout.entries}

    def load_into(self, model: torch.nn.Module, i: int) -> torch.nn.Module:
        """Copy record ``i`` into ``model`` in place (any device); raise if the layout does not match."""
        self.layout.check_module(model)
        state = self.state_dict(i)
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in state.items():
                targets[name].copy_(value)
        return model

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise a one-line :class:`LayoutMismatchError` unless ``model`` matches the archive."""
        self.layout.check_module(model)

    # ------------------------------------------------------------------ batches and scalars
    def batch_indices(self, i: int) -> np.ndarray:
        """Minibatch sample indices of the update leaving record ``i`` (empty array if not recorded)."""
        step = int(self._steps[self._check_index(i)])
        return self.batch_indices_at_step(step)

    def batch_indices_at_step(self, step: int) -> np.ndarray:
        j = int(np.searchsorted(self._batch_step, step))
        if j >= len(self._batch_step) or self._batch_step[j] != step:
            return np.empty(0, dtype=np.int64)
        start = int(self._batch_end[j - 1]) if j else 0
        return self._file[fmt.BATCH_INDICES][start : int(self._batch_end[j])].astype(np.int64)

    @property
    def batch_steps(self) -> np.ndarray:
        """Steps whose update's minibatch indices are stored."""
        return self._batch_step

    def _scalar_table(self) -> np.ndarray:
        if self._scalars_raw is None:
            self._scalars_raw = self._file[fmt.SCALARS][()]
        return self._scalars_raw

    @property
    def scalar_names(self) -> list[str]:
        return sorted({n.decode() for n in np.unique(self._scalar_table()["name"])})

    def scalar_history(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one scalar at every step where the trainer passed it."""
        t = self._scalar_table()
        sel = t[t["name"] == name.encode()]
        return sel["step"].astype(np.int64), sel["value"].astype(np.float64)

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """Each scalar aligned to the records (NaN where the update leaving a record had none)."""
        out = {}
        for name in self.scalar_names:
            steps, values = self.scalar_history(name)
            col = np.full(self._n, np.nan)
            pos = np.searchsorted(self._steps, steps)
            ok = (pos < self._n) & (self._steps[np.minimum(pos, self._n - 1)] == steps) if self._n else np.zeros(0, bool)
            col[pos[ok]] = values[ok]
            out[name] = col
        return out

    @property
    def nonfinite(self) -> np.ndarray:
        """Number of NaN/Inf values in each record's rows."""
        return self._file[fmt.NONFINITE][: self._n].astype(np.int64)

    # ------------------------------------------------------------------ pairs
    def pairs(self, *, single_steps: bool = False, start: int = 0, stop: int | None = None) -> Iterator[Pair]:
        """Consecutive records (i, i+1) with their parameters and the leaving minibatch.

        ``single_steps=True`` keeps only pairs one optimizer step apart (exact SGD updates, as
        sparse-pair schedules produce); otherwise pairs span whatever the schedule recorded.
        """
        stop = self._n - 1 if stop is None else min(stop, self._n - 1)
        if start >= stop:
            return
        last_i, last = -1, None  # the b side of the previous pair is the a side of the next
        for i in range(start, stop):
            step_a, step_b = int(self._steps[i]), int(self._steps[i + 1])
            if single_steps and step_b != step_a + 1:
                continue
            a = last if last_i == i else self.params(i)
            b = self.params(i + 1)
            last_i, last = i + 1, b
            yield Pair(i, step_a, step_b, a, b, self.batch_indices(i))

    # ------------------------------------------------------------------ specs
    def _spec(self, key: str):
        from ..specs import Spec

        text = self._file.attrs.get(key, "")
        if isinstance(text, bytes):
            text = text.decode()
        if not text:
            raise ArchiveFormatError(f"{self.path} records no {key.replace('_', ' ')}; pass --model/--data explicitly")
        return Spec.from_json(text)

    @property
    def model_spec(self):
        return self._spec("model_spec")

    @property
    def data_spec(self):
        return self._spec("data_spec")

    def build_model(self, *, trusted: bool = False, **overrides: Any) -> torch.nn.Module:
        """Rebuild the recorded model from its stored spec (only sgdwalk's zoo unless ``trusted``)."""
        model = self.model_spec.build(trusted=trusted, **overrides)
        self.check_model(model)
        return model

    def build_dataset(self, split: str = "train", *, trusted: bool = False, **overrides: Any):
        """Rebuild the recorded training (or test) data from its stored spec."""
        return self.data_spec.build(trusted=trusted, split=split, **overrides)
