"""The archive reader, :class:`Trajectory`: everything the analyzer needs, and nothing it must not do.

A complete archive is opened without SWMR (a damaged one then fails at once); a file a writer still holds,
or whose writer was killed, is opened in SWMR-read mode with bounded metadata retries, so a reader can
follow a live writer (call :meth:`Trajectory.refresh`) and read every flushed record of a killed one
(:mod:`trajectory.archive.safety`). Opening validates the structure (steps, batch offsets, widths, dtypes,
transform, declared sizes); reads verify each chunk's Fletcher32 checksum, and a corrupt chunk is one
line naming the dataset and records. Rows are decoded a chunk row-block at a time and the decoded blocks
are kept (``cache_bytes``), so sequential and nearby random reads decompress each chunk once.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/zstd HDF5 filters the datasets use)
import numpy as np
import torch

from ..errors import ArchiveError, ArchiveFormatError, ArchiveVersionError, LayoutMismatchError, SgdwalkError
from . import format as fmt
from .codecs import Codec, bits_to_values, get_codec
from .layout import BUFFERS, BUFFERS_INT, PARAMS, ROW_DATASETS, Layout
from .layout import FLOAT_DTYPE_NAMES, LAYOUT_DTYPE, LAYOUT_DTYPE_NAMES
from .safety import open_h5_readonly, refuse_foreign_storage
from ..textsafe import MAX_JSON_CHARS, load_json, safe

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


#: Decoded rows kept per row dataset by default (bytes). A sequential sweep decodes each chunk row-block once
#: and serves every row of it from here; a block larger than this falls back to decoding row by row.
DEFAULT_CACHE_BYTES = 512 << 20


class _RowReader:
    """Decodes rows of one row dataset a whole chunk row-block at a time, keeping recent blocks decoded.

    Why blocks: HDF5 decompresses a whole chunk to return any part of it, and the default chunk cache (1 MiB)
    is smaller than one chunk (~4 MiB), so reading row by row decompressed every chunk once per row in it
    (8-64 times). Reading the chunk-aligned row range ``[start, start + chunk_rows)`` in one ``read_direct``
    decompresses each chunk exactly once; the XOR chain is then undone in place, row after row (O(1) per
    row), and the decoded block answers every later read of its rows from memory.
    """

    def __init__(self, dset: h5py.Dataset, path: str, logical: np.dtype, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.dset = dset
        self.path = path
        self.name = dset.name.lstrip("/")
        self.logical = np.dtype(logical)  # from the layout table; the dataset's attribute must agree (validated)
        self.transform = str(dset.attrs.get("transform", "none"))
        self.chunk_rows = dset.chunks[0] if dset.chunks else 1
        self._block_codec = Codec("", self.transform, "none")
        self._last: tuple[int, np.ndarray] | None = None  # (row index, un-XOR-ed disk bits): per-row fallback
        block_bytes = self.chunk_rows * max(1, dset.shape[1]) * max(dset.dtype.itemsize, self.logical.itemsize)
        self.max_blocks = int(cache_bytes // block_bytes) if cache_bytes > 0 else 0
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.steps: np.ndarray | None = None  # set by Trajectory, to name steps in corruption errors

    # ------------------------------------------------------------------ errors
    def corrupt(self, start: int, stop: int, err: BaseException) -> ArchiveFormatError:
        """One line naming the dataset and records whose stored chunk failed to decode (checksum or filter)."""
        where = f"records {start}-{stop - 1}" if stop - start > 1 else f"record {start}"
        steps = self.steps
        if steps is not None and 0 <= start < len(steps):
            last = min(stop, len(steps)) - 1
            where += f" (steps {int(steps[start])}-{int(steps[last])})"
        return ArchiveFormatError(
            f"{self.path}: dataset '{self.name}' {where} cannot be read, the stored chunk is corrupt "
            f"({_first_line(err)[:160]}); restore a good copy or re-record"
        )

    def _read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        try:
            if out is None:
                return self.dset[start:stop]
            self.dset.read_direct(out, np.s_[start:stop])
            return out
        except (OSError, ValueError, RuntimeError) as err:
            raise self.corrupt(start, stop, err) from None

    # ------------------------------------------------------------------ blocks
    def _block(self, cstart: int, n_valid: int) -> np.ndarray:
        """Decoded rows [cstart, min(cstart + chunk_rows, n_valid)) of one chunk row-block (cached)."""
        want = min(cstart + self.chunk_rows, n_valid) - cstart
        block = self._blocks.get(cstart)
        if block is not None and block.shape[0] >= want:
            self._blocks.move_to_end(cstart)
            return block
        raw = np.empty((want, self.dset.shape[1]), dtype=self.dset.dtype)
        self._read(cstart, cstart + want, raw)
        if self.transform.endswith("xor"):
            for r in range(1, want):  # undo the XOR chain in place: one pass, O(1) per row
                np.bitwise_xor(raw[r], raw[r - 1], out=raw[r])
        block = bits_to_values(raw, self.transform, self.logical) if self.logical.kind == "f" else raw
        self._blocks[cstart] = block
        self._blocks.move_to_end(cstart)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return block

    def drop_cache(self) -> None:
        self._blocks.clear()
        self._last = None

    # ------------------------------------------------------------------ per-row fallback (blocks too large)
    def _bits(self, i: int) -> np.ndarray:
        """Un-XOR-ed disk row i (still in disk dtype), continuing the chain from the previous row read."""
        if self.transform.endswith("xor"):
            start = i - i % self.chunk_rows
            last = self._last
            if last is not None and last[0] == i:
                return last[1]
            if last is not None and last[0] == i - 1 and i != start:
                bits = np.bitwise_xor(last[1], self._read(i, i + 1)[0])
            else:
                block = self._read(start, i + 1)
                bits = np.bitwise_xor.reduce(block, axis=0) if len(block) > 1 else block[0]
        else:
            bits = self._read(i, i + 1)[0]
        self._last = (i, bits)
        return bits

    def row(self, i: int, n_valid: int) -> np.ndarray:
        """Decoded row i (a view into a cached block, or a fresh array on the fallback path)."""
        if self.max_blocks:
            cstart = i - i % self.chunk_rows
            return self._block(cstart, n_valid)[i - cstart]
        return bits_to_values(self._bits(i), self.transform, self.logical)

    def rows(self, start: int, stop: int, n_valid: int) -> np.ndarray:
        """Rows [start, stop) decoded in bulk (reads from the chunk boundary when XOR-ed)."""
        if stop <= start:
            return np.empty((0, self.dset.shape[1]), dtype=self.logical)
        out = np.empty((stop - start, self.dset.shape[1]), dtype=self.logical)
        pos = start
        while pos < stop:
            cstart = pos - pos % self.chunk_rows
            cend = min(cstart + self.chunk_rows, stop)
            if self.max_blocks:
                block = self._block(cstart, n_valid)
            else:
                block = self._block_codec.decode(self._read(cstart, cend), self.logical)
            out[pos - start : cend - start] = block[pos - cstart : cend - cstart]
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

    def __init__(self, path: str | os.PathLike, *, locking: bool | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = os.fspath(path)
        self._file = open_h5_readonly(self.path, locking=locking)
        try:
            refuse_foreign_storage(self._file, self.path)
            self._attrs = self._decode_attrs()  # read once, now: damaged attribute storage fails here, in one line
            self._caps: dict[str, int] = {}  # stored lengths of datasets an unclean writer declared longer
            self._validate()
            self.layout = self._read_layout()
            self.codec = get_codec(str(self._file.attrs["codec"]))
            self._check_rows()
            self._rows = {
                d: _RowReader(self._file[d], self.path, self.layout.storage_dtype(d), cache_bytes)
                for d in ROW_DATASETS if d in self._file
            }
            self._optimizer_keys = self._check_optimizer()
            self._opt_rows = {
                k: _RowReader(self._file[fmt.optimizer_dataset(k)], self.path, self.layout.storage_dtype(PARAMS), cache_bytes)
                for k in self._optimizer_keys
            }
            self._load_meta()
        except SgdwalkError:
            self._file.close()
            raise
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as err:
            self._file.close()  # h5py's report of damaged metadata (bad checksum, unreadable object header)
            raise ArchiveFormatError(
                f"{self.path}: damaged HDF5 metadata ({_first_line(err)[:160]}); restore a good copy or re-record"
            ) from None
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------ validation
    def _fail(self, what: str) -> ArchiveFormatError:
        return ArchiveFormatError(f"{self.path}: {what}; the archive is damaged or was not written by sgdwalk")

    def _validate(self) -> None:
        """Root attributes and the presence and kind of every required dataset (cheap: no data read)."""
        f = self._file
        fmt_name = f.attrs.get("format")
        if isinstance(fmt_name, bytes):
            fmt_name = fmt_name.decode(errors="replace")
        if fmt_name != fmt.FORMAT_NAME:
            raise ArchiveFormatError(f"{self.path} is an HDF5 file but not an sgdwalk trajectory archive (no format attribute)")
        raw_version = f.attrs.get("format_version", None)
        try:
            if isinstance(raw_version, (str, bytes, float, np.floating)) or np.ndim(raw_version) != 0:
                raise TypeError
            version = int(raw_version)
        except (TypeError, ValueError, OverflowError):
            raise ArchiveFormatError(f"{self.path} has an invalid format_version {safe(raw_version, 40)}; the archive is damaged") from None
        if version > fmt.FORMAT_VERSION:
            raise ArchiveVersionError(
                f"{self.path} uses archive format v{version}, newer than v{fmt.FORMAT_VERSION} read by this sgdwalk; upgrade sgdwalk"
            )
        if version < 1:
            raise ArchiveFormatError(f"{self.path} has an invalid format_version {version}")
        for name in fmt.REQUIRED_DATASETS:
            if name not in f:
                raise ArchiveFormatError(f"{self.path} lacks the required dataset '{name}'; the file is damaged or incomplete")
            if not isinstance(f[name], h5py.Dataset):
                raise self._fail(f"'{name}' is not a dataset")
        if "codec" not in f.attrs:
            raise ArchiveFormatError(f"{self.path} lacks the 'codec' attribute; the file is damaged")
        try:
            get_codec(str(f.attrs["codec"]))
        except ValueError:
            raise ArchiveVersionError(
                f"{self.path} uses codec {safe(f.attrs['codec'], 60)} unknown to this sgdwalk; upgrade sgdwalk"
            ) from None
        for name, dtype in fmt.BOOKKEEPING_DTYPES.items():
            d = f[name]
            if d.ndim != 1:
                raise self._fail(f"dataset '{name}' has {d.ndim} dimensions, expected 1")
            if d.dtype != dtype:
                raise self._fail(f"dataset '{name}' has dtype {d.dtype}, expected {np.dtype(dtype)}")
            self._check_declared(name, d)

    def _check_declared(self, name: str, d: h5py.Dataset) -> None:
        """A declared length must be backed by stored chunks (checked before anything is allocated for it).

        Counting chunks walks the chunk index, so it is done only when the declared size is suspicious: more
        raw bytes than 16x the file (compression of real trajectories stays far below that).
        """
        declared = int(np.prod(d.shape, dtype=np.float64)) * d.dtype.itemsize if d.shape else 0
        if declared <= 16 * max(1, os.path.getsize(self.path)):
            return
        if d.chunks is None:
            limit = d.id.get_storage_size() // max(1, d.dtype.itemsize)
        else:
            per_row_block = 1
            for extent, chunk in zip(d.shape[1:], d.chunks[1:]):
                per_row_block *= -(-extent // chunk) if extent else 1
            limit = -(-d.id.get_num_chunks() // per_row_block) * d.chunks[0]
        if d.shape and d.shape[0] > limit:
            if not self.closed_cleanly:  # a writer that failed or was killed mid-flush: use what is stored
                self._caps[name] = int(limit)
                return
            raise self._fail(f"dataset '{name}' declares {d.shape[0]} entries but stores at most {limit}")

    def _read_layout(self) -> Layout:
        d = self._file[fmt.LAYOUT]
        if d.ndim != 1 or d.dtype != LAYOUT_DTYPE:
            raise self._fail("the layout table has the wrong shape or dtype")
        if d.shape[0] > fmt.MAX_LAYOUT_ENTRIES:
            raise self._fail(f"the layout table declares {d.shape[0]} entries")
        table = self._read_meta(fmt.LAYOUT, d)
        try:
            layout = Layout.from_table(table)
        except (ValueError, UnicodeDecodeError):
            raise self._fail("the layout table holds an unreadable entry") from None
        pos = dict.fromkeys(ROW_DATASETS, 0)
        for e in layout.entries:
            if e.dataset not in pos:
                raise self._fail(f"layout entry {safe(e.name, 60)} names an unknown row dataset {safe(e.dataset, 20)}")
            if e.dtype not in LAYOUT_DTYPE_NAMES:
                raise self._fail(f"layout entry {safe(e.name, 60)} has an unknown dtype {safe(e.dtype, 20)}")
            kind_ok = (e.dtype in FLOAT_DTYPE_NAMES) != (e.dataset == BUFFERS_INT)
            if not kind_ok:
                raise self._fail(f"layout entry {safe(e.name, 60)} of dtype {e.dtype} cannot live in row dataset {e.dataset}")
            if e.numel < 0 or e.offset != pos[e.dataset] or int(np.prod(e.shape, dtype=np.int64)) != e.numel or any(s < 0 for s in e.shape):
                raise self._fail(f"layout entry {safe(e.name, 60)} has an inconsistent offset, size or shape")
            pos[e.dataset] += e.numel
        if layout.sizes[PARAMS] <= 0 or sum(layout.sizes.values()) > fmt.MAX_ROW_VALUES:
            raise self._fail(f"the layout declares {layout.sizes[PARAMS]} parameters")
        return layout

    def _check_rows(self) -> None:
        """Row datasets: width equal to the layout total, dtypes and transform as the layout and codec say."""
        f = self._file
        for d in ROW_DATASETS:
            size = self.layout.sizes[d]
            if d not in f:
                if size:
                    raise ArchiveFormatError(f"{self.path} lacks the required dataset '{d}'; the file is damaged or incomplete")
                continue
            ds = f[d]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
                raise self._fail(f"dataset '{d}' is not a 2-D row dataset")
            if ds.shape[1] != size:
                raise self._fail(f"dataset '{d}' rows hold {ds.shape[1]} values but the layout says {size}")
            logical = self.layout.storage_dtype(d)
            stored_logical = ds.attrs.get("logical_dtype", None)
            if stored_logical is not None and str(stored_logical if not isinstance(stored_logical, bytes) else stored_logical.decode()) != str(logical):
                raise self._fail(f"dataset '{d}' says logical dtype {safe(stored_logical, 20)}, the layout says {logical}")
            transform = ds.attrs.get("transform", None)
            if isinstance(transform, bytes):
                transform = transform.decode(errors="replace")
            if logical.kind == "f":
                expected = self.codec.transform
                if transform is None and expected != "none":
                    raise self._fail(f"dataset '{d}' lacks its 'transform' attribute (codec {self.codec.name} needs '{expected}')")
                if transform is not None and str(transform) != expected:
                    raise self._fail(f"dataset '{d}' has transform {safe(transform, 20)} but codec {self.codec.name} uses '{expected}'")
            elif transform not in (None, "none"):
                raise self._fail(f"dataset '{d}' holds integers but has transform {safe(transform, 20)}")
            disk = self.codec.disk_dtype(logical) if d != BUFFERS_INT else np.dtype("int64")
            if ds.dtype != disk:
                raise self._fail(f"dataset '{d}' is stored as {ds.dtype}, codec {self.codec.name} stores {disk}")
            if ds.chunks is None:
                raise self._fail(f"dataset '{d}' is not chunked")
            self._check_declared(d, ds)

    def _check_optimizer(self) -> tuple[str, ...]:
        """The optimizer-state keys the ``optimizer_state`` attribute lists, each dataset checked like ``params``."""
        f = self._file
        raw = self._attrs.get(fmt.OPTIMIZER_STATE_ATTR, None)
        if raw is None or (isinstance(raw, str) and raw == ""):
            return ()
        if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
            raise self._fail(f"attribute '{fmt.OPTIMIZER_STATE_ATTR}' is not a JSON list of names")
        keys = tuple(raw)
        for k in keys:
            if k not in fmt.OPTIMIZER_KEYS:
                raise self._fail(f"attribute '{fmt.OPTIMIZER_STATE_ATTR}' lists an unknown key {safe(k, 40)}")
        if len(set(keys)) != len(keys):
            raise self._fail(f"attribute '{fmt.OPTIMIZER_STATE_ATTR}' lists a key twice")
        if not keys:
            return ()
        size = self.layout.sizes[PARAMS]
        logical = self.layout.storage_dtype(PARAMS)
        disk = self.codec.disk_dtype(logical)
        for k in keys:
            name = fmt.optimizer_dataset(k)
            if name not in f:
                raise self._fail(f"attribute '{fmt.OPTIMIZER_STATE_ATTR}' lists '{k}' but dataset '{name}' is missing")
            ds = f[name]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
                raise self._fail(f"dataset '{name}' is not a 2-D row dataset")
            if ds.shape[1] != size:
                raise self._fail(f"dataset '{name}' rows hold {ds.shape[1]} values but the layout has {size} parameters")
            if ds.dtype != disk:
                raise self._fail(f"dataset '{name}' is stored as {ds.dtype}, codec {self.codec.name} stores {disk}")
            stored_logical = ds.attrs.get("logical_dtype", None)
            if isinstance(stored_logical, bytes):
                stored_logical = stored_logical.decode(errors="replace")
            if str(stored_logical) != str(logical):
                raise self._fail(f"dataset '{name}' says logical dtype {safe(stored_logical, 20)}, params are {logical}")
            transform = ds.attrs.get("transform", None)
            if isinstance(transform, bytes):
                transform = transform.decode(errors="replace")
            if str(transform) != self.codec.transform:
                raise self._fail(f"dataset '{name}' has transform {safe(transform, 20)} but codec {self.codec.name} uses '{self.codec.transform}'")
            if ds.chunks is None:
                raise self._fail(f"dataset '{name}' is not chunked")
            self._check_declared(name, ds)
        name = fmt.OPTIMIZER_STEP
        if name not in f:
            raise self._fail(f"attribute '{fmt.OPTIMIZER_STATE_ATTR}' lists {list(keys)} but dataset '{name}' is missing")
        ds = f[name]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            raise self._fail(f"dataset '{name}' is not 1-D")
        if ds.dtype != np.dtype("<f8"):
            raise self._fail(f"dataset '{name}' has dtype {ds.dtype}, expected float64")
        self._check_declared(name, ds)
        return keys

    def _read_meta(self, name: str, d: h5py.Dataset, stop: int | None = None) -> np.ndarray:
        """Read a bookkeeping dataset (or its first ``stop`` entries); a corrupt chunk is one line."""
        try:
            return d[()] if stop is None else d[:stop]
        except (OSError, ValueError, RuntimeError) as err:
            raise ArchiveFormatError(
                f"{self.path}: dataset '{name}' cannot be read, a stored chunk is corrupt ({_first_line(err)[:160]}); "
                "restore a good copy or re-record"
            ) from None

    def _len(self, name: str) -> int:
        return min(self._file[name].shape[0], self._caps.get(name, 1 << 62))

    def _load_meta(self) -> None:
        """Record count, steps and batch offsets, validated.

        A cleanly closed archive must be exactly consistent. A file whose writer was killed or hit a write error
        may have had a dataset's new length reach the disk without its data (HDF5 writes the extent early in
        SWMR mode); for such a file the records are the longest consistent prefix, which is everything up to
        the writer's last successful flush.
        """
        f = self._file
        clean = self.closed_cleanly
        n = self._len(fmt.STEPS)
        for d in self._rows:
            n = min(n, self._len(d))
        opt_names = [fmt.optimizer_dataset(k) for k in self._optimizer_keys]
        opt_names += [fmt.OPTIMIZER_STEP] if self._optimizer_keys else []
        for name in (fmt.RECORD_TIME, fmt.NONFINITE, *opt_names):
            if self._len(name) < n:
                if clean:
                    raise self._fail(f"dataset '{name}' has {f[name].shape[0]} entries for {n} records")
                n = self._len(name)
        steps = self._read_meta(fmt.STEPS, f[fmt.STEPS], n).astype(np.int64)
        if n and steps[0] < 0:
            if clean:
                raise self._fail(f"record 0 has a negative step {int(steps[0])}")
            n, steps = 0, steps[:0]
        if n > 1:
            bad = np.flatnonzero(np.diff(steps) <= 0)
            if len(bad):
                i = int(bad[0])
                if clean:
                    raise self._fail(f"steps are not strictly increasing (record {i + 1} has step {int(steps[i + 1])} after {int(steps[i])})")
                n, steps = i + 1, steps[: i + 1]
        if clean:
            stored = self._attrs.get("n_records", None)
            if stored is not None and np.ndim(stored) == 0 and not isinstance(stored, (str, bytes)) and int(stored) != n:
                raise self._fail(f"it was closed with {int(stored)} records but holds {n}")
        nb = min(self._len(fmt.BATCH_STEP), self._len(fmt.BATCH_END))
        batch_step = self._read_meta(fmt.BATCH_STEP, f[fmt.BATCH_STEP], nb).astype(np.int64)
        ends = self._read_meta(fmt.BATCH_END, f[fmt.BATCH_END], nb).astype(np.int64)
        n_indices = self._len(fmt.BATCH_INDICES)
        if nb:
            ok = (batch_step >= 0) & (ends >= 0) & (ends <= n_indices)
            ok[1:] &= (np.diff(batch_step) > 0) & (np.diff(ends) >= 0)
            if not ok.all():
                first_bad = int(np.flatnonzero(~ok)[0])
                if not clean:
                    nb = first_bad
                    batch_step, ends = batch_step[:nb], ends[:nb]
                elif batch_step[first_bad] < 0 or (first_bad and batch_step[first_bad] <= batch_step[first_bad - 1]):
                    raise self._fail("batches/step is not strictly increasing from a non-negative step")
                elif ends[first_bad] > n_indices:
                    raise self._fail(f"batches/end points past the {n_indices} stored indices")
                else:
                    raise self._fail("batches/end is not non-decreasing from 0")
        if clean:
            for name in opt_names:
                if self._len(name) != n:
                    raise self._fail(f"dataset '{name}' has {f[name].shape[0]} entries for {n} records")
        self._state_step = self._read_meta(fmt.OPTIMIZER_STEP, f[fmt.OPTIMIZER_STEP], n) if opt_names else None
        self._n = n
        self._steps = steps
        self._batch_step, self._batch_end = batch_step, ends
        self._scalars_raw = None
        if not hasattr(self, "data_size"):
            #: Number of training samples when known (set by whoever built the data): batch indices are then
            #: checked against it, as they are always checked to be non-negative.
            self.data_size: int | None = None
        for reader in (*self._rows.values(), *self._opt_rows.values()):
            reader.steps = steps

    def refresh(self) -> int:
        """See records a live writer flushed since opening (SWMR); returns the new record count.

        A complete (cleanly closed) archive is opened without SWMR and cannot change: this is then a no-op.
        """
        if not self._file.swmr_mode:
            return self._n
        try:
            for reader in (*self._rows.values(), *self._opt_rows.values()):
                reader.dset.refresh()
            if self._optimizer_keys:
                self._file[fmt.OPTIMIZER_STEP].refresh()
            for name in (fmt.STEPS, fmt.RECORD_TIME, fmt.NONFINITE, fmt.BATCH_STEP, fmt.BATCH_END, fmt.BATCH_INDICES, fmt.SCALARS):
                self._file[name].refresh()
        except (OSError, RuntimeError) as err:
            raise ArchiveFormatError(f"{self.path}: cannot refresh ({_first_line(err)[:160]})") from None
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
    def checksums(self) -> bool:
        """True when every dataset's chunks carry an HDF5 Fletcher32 checksum (archives written before them do not)."""
        f = self._file
        names = [d for d in ROW_DATASETS if d in f] + list(fmt.BOOKKEEPING_DTYPES)
        if self._optimizer_keys:
            names += [fmt.optimizer_dataset(k) for k in self._optimizer_keys] + [fmt.OPTIMIZER_STEP]
        return all(bool(f[n].fletcher32) for n in names)

    @property
    def uuid(self) -> str | None:
        """The archive's random ``archive_uuid`` (None for archives written before UUIDs)."""
        v = self._attrs.get(fmt.ARCHIVE_UUID)
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        return str(v) if v else None

    @property
    def lossy(self) -> bool:
        return bool(self._attrs.get("lossy", False))

    @property
    def closed_cleanly(self) -> bool:
        """False while a writer is still running or after it was killed; records up to its last flush are valid."""
        return bool(self._attrs.get("closed_cleanly", False))

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes, with JSON-encoded ones decoded (read when the archive was opened)."""
        return dict(self._attrs)

    def _decode_attrs(self) -> dict[str, Any]:
        out = {}
        for k, v in self._file.attrs.items():
            if isinstance(v, bytes):
                v = v.decode(errors="replace")
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and v[:1] in "{[" and len(v) <= MAX_JSON_CHARS:
                try:
                    v = load_json(v, f"attribute {k}")
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
        return torch.from_numpy(np.array(self._rows[dataset].row(i, self._n), copy=True))

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
        return torch.from_numpy(self._rows[PARAMS].rows(start, stop, self._n))

    # ------------------------------------------------------------------ optimizer state
    @property
    def optimizer_state_keys(self) -> tuple[str, ...]:
        """Recorded optimizer-state keys (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``[, ``max_exp_avg_sq``]); empty when none."""
        return self._optimizer_keys

    def _no_optimizer_state(self) -> ArchiveError:
        return ArchiveError(
            f"{self.path} records no optimizer state; record it with Recorder(..., optimizer=opt, optimizer_state=True) "
            "or `sgdwalk train --record-optimizer-state`"
        )

    def optimizer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Optimizer state at record ``i`` (when params row ``i`` was taken): flat vectors in params layout order.

        Keys are :attr:`optimizer_state_keys` plus ``"step"``, a 0-d float64 tensor (Adam's ``state['step']``,
        NaN for optimizers without a step count). Parameters without state hold 0; so does every parameter at a
        record taken before the optimizer's first step. Raises :class:`ArchiveError` when nothing was recorded.
        """
        if not self._optimizer_keys:
            raise self._no_optimizer_state()
        i = self._check_index(i)
        out = {k: torch.from_numpy(np.array(r.row(i, self._n), copy=True)) for k, r in self._opt_rows.items()}
        out["step"] = torch.tensor(float(self._state_step[i]), dtype=torch.float64)
        return out

    def optimizer_state_block(self, key: str, start: int, stop: int) -> torch.Tensor:
        """One optimizer-state key at records [start, stop) as a 2-D tensor, decoded chunk by chunk."""
        if not self._optimizer_keys:
            raise self._no_optimizer_state()
        if key not in self._opt_rows:
            raise ArchiveError(f"{self.path} records optimizer state {list(self._optimizer_keys)}, not {safe(key, 40)}")
        start, stop = max(0, start), min(stop, self._n)
        return torch.from_numpy(self._opt_rows[key].rows(start, stop, self._n))

    @property
    def optimizer_state_steps(self) -> np.ndarray:
        """``optimizer/state_step`` of every record (float64; NaN for optimizers without a step count)."""
        if not self._optimizer_keys:
            raise self._no_optimizer_state()
        return np.asarray(self._state_step, dtype=np.float64)

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
        stop = int(self._batch_end[j])
        try:
            idx = self._file[fmt.BATCH_INDICES][start:stop].astype(np.int64)
        except (OSError, ValueError, RuntimeError) as err:
            raise ArchiveFormatError(
                f"{self.path}: dataset 'batches/indices' entries {start}-{stop - 1} (step {step}) cannot be read, "
                f"the stored chunk is corrupt ({_first_line(err)[:160]}); restore a good copy or re-record"
            ) from None
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or (self.data_size is not None and hi >= self.data_size):
                bad = lo if lo < 0 else hi
                size = "" if self.data_size is None else f" of {self.data_size} training samples"
                raise ArchiveFormatError(
                    f"{self.path}: the minibatch of step {step} holds sample index {bad}, outside the data set{size}; "
                    "the archive is damaged or belongs to other data"
                )
        return idx

    @property
    def batch_steps(self) -> np.ndarray:
        """Steps whose update's minibatch indices are stored."""
        return self._batch_step

    def _scalar_table(self) -> np.ndarray:
        if self._scalars_raw is None:
            self._scalars_raw = self._read_meta(fmt.SCALARS, self._file[fmt.SCALARS])
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
        return self._read_meta(fmt.NONFINITE, self._file[fmt.NONFINITE], self._n).astype(np.int64)

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
