"""The chunked archive writer: whole chunks in, SWMR-safe file out.

Appending single rows into compressed chunks re-compresses the whole chunk on every row once the
chunk no longer fits HDF5's chunk cache (283 rows/s of 60 KB and 25 rows/s of 5.9 MB measured with
a 1 MiB cache, 2.8x to 6x slower than this writer with HDF5 2.0's 8 MiB default; docs/performance.md), so the writer keeps the open chunk's rows in memory and writes a
chunk's worth at once. A periodic :meth:`ArchiveWriter.flush` also writes the open, partial chunk
so that a process killed at any moment leaves every record up to the last flush readable; the
file is in HDF5 SWMR mode from the first flush on, which keeps it consistent for readers while it
grows and after a crash.

This class is synchronous and single-threaded; :class:`trajectory.Recorder` runs it on a
background thread.
"""
from __future__ import annotations

import json
import uuid
import os
import time
from typing import Any, Mapping, Sequence

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/zstd HDF5 filters the datasets use)
import numpy as np

from ..errors import ArchiveExistsError, ArchiveFormatError, LayoutMismatchError
from . import format as fmt
from .codecs import META_FILTER, Codec, get_codec, _filter_kwargs
from .layout import BUFFERS, BUFFERS_INT, PARAMS, ROW_DATASETS, Layout

__all__ = ["ArchiveWriter", "open_mode"]


def open_mode(path: str | os.PathLike, mode: str) -> str:
    """Validate ``mode`` the h5py way: 'x'/'w-' refuse an existing path, 'w' overwrites, 'a' appends."""
    if mode not in ("x", "w-", "w", "a"):
        raise ValueError(f"mode must be 'x' (create, refuse existing), 'w' (overwrite) or 'a' (append), not {mode!r}")
    if mode in ("x", "w-") and os.path.exists(path):
        raise ArchiveExistsError(
            f"{os.fspath(path)} already exists; pass mode='w' (--overwrite) to replace it or mode='a' (--append) to extend it"
        )
    if mode == "a" and not os.path.exists(path):
        return "x"
    return mode


class _RowStore:
    """One row dataset plus the rows of its open chunk (kept in logical dtype)."""

    def __init__(self, dset: h5py.Dataset, codec: Codec, logical: np.dtype, n_rows: int):
        self.dset = dset
        self.codec = codec
        self.logical = np.dtype(logical)
        self.chunk_rows = dset.chunks[0]
        self.n_cols = dset.shape[1]
        self.pending = np.empty((self.chunk_rows, self.n_cols), dtype=self.logical)
        self.chunk_start = n_rows - n_rows % self.chunk_rows
        self.n_pending = n_rows - self.chunk_start
        if self.n_pending:  # appending into a partial chunk: reload its rows to keep XOR chains intact
            disk = dset[self.chunk_start : n_rows]
            self.pending[: self.n_pending] = codec.decode(disk, self.logical)
        self.written = n_rows  # rows on disk (possibly in a partial chunk)

    def add(self, row: np.ndarray) -> bool:
        """Buffer one row; return True when the open chunk is full."""
        self.pending[self.n_pending] = row
        self.n_pending += 1
        return self.n_pending == self.chunk_rows

    def write(self) -> None:
        """Write the open chunk (whole, or partial at a flush); start a new one if it is full."""
        if self.chunk_start + self.n_pending == self.written:
            return
        end = self.chunk_start + self.n_pending
        if self.dset.shape[0] < end:
            self.dset.resize(end, axis=0)
        self.dset[self.chunk_start : end] = self.codec.encode(self.pending[: self.n_pending])
        self.written = end
        if self.n_pending == self.chunk_rows:
            self.chunk_start = end
            self.n_pending = 0


class _Column:
    """A 1-D extendable bookkeeping dataset fed in bulk at each flush."""

    def __init__(self, dset: h5py.Dataset):
        self.dset = dset
        self.pending: list[Any] = []

    def add(self, value: Any) -> None:
        self.pending.append(value)

    def extend(self, values: np.ndarray) -> None:
        self.pending.append(np.asarray(values))

    def write(self) -> None:
        if not self.pending:
            return
        if self.dset.dtype.names is not None or np.isscalar(self.pending[0]) or isinstance(self.pending[0], tuple):
            data = np.array(self.pending, dtype=self.dset.dtype)
        else:
            data = np.concatenate(self.pending).astype(self.dset.dtype, copy=False)
        self.pending = []
        n = self.dset.shape[0]
        self.dset.resize(n + len(data), axis=0)
        self.dset[n:] = data


class ArchiveWriter:
    """Create (or append to) an archive and write records, batches and scalars in whole chunks.

    Parameters
    ----------
    path : str or PathLike
    layout : Layout
        How each record's flat rows map to the state dict.
    mode : {'x', 'w', 'a'}
        'x' refuses an existing path, 'w' overwrites it, 'a' appends to an archive with the same layout.
    codec : str
        Name of the row codec (see :mod:`trajectory.archive.codecs`).
    attrs : mapping
        Root attributes (provenance) written at creation; values that are dicts/lists are stored as JSON.
    locking : bool or None
        Passed to h5py; ``False`` for network file systems without working locks.
    optimizer_keys : sequence of str
        Optimizer-state keys (``format.OPTIMIZER_KEYS``) recorded with every record as ``optimizer/<key>``
        rows shaped like ``params``, plus ``optimizer/state_step``; empty (default) records none. Appending
        requires the archive's keys to be the same.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Layout,
        *,
        mode: str = "x",
        codec: str = "",
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int | None = None,
        locking: bool | None = None,
        optimizer_keys: Sequence[str] = (),
    ):
        self.path = os.fspath(path)
        self.optimizer_keys: tuple[str, ...] = tuple(optimizer_keys)
        unknown = [k for k in self.optimizer_keys if k not in fmt.OPTIMIZER_KEYS]
        if unknown or len(set(self.optimizer_keys)) != len(self.optimizer_keys):
            raise ValueError(f"optimizer_keys must be distinct names among {list(fmt.OPTIMIZER_KEYS)}, not {list(self.optimizer_keys)}")
        mode = open_mode(self.path, mode)
        kw = {} if locking is None else {"locking": locking}
        self._open_kw = kw
        self._appending = mode == "a"
        if self._appending:
            self.file = self._open_for_append(kw)
            try:
                self._check_appendable(layout)
            except BaseException:
                self.file.close()  # a refused append leaves the archive closed and untouched
                raise
            self.codec = get_codec(self.file.attrs["codec"])
        else:
            from .codecs import DEFAULT_CODEC

            self.codec = get_codec(codec or DEFAULT_CODEC)
            self.file = h5py.File(self.path, "w", libver="latest", **kw)
            try:
                self._create(layout, attrs or {}, chunk_rows)
            except BaseException:
                self.file.close()
                raise
        self.layout = layout
        f = self.file
        n = f[fmt.STEPS].shape[0]
        self.rows = {
            d: _RowStore(f[d], self.codec, layout.storage_dtype(d), n) for d in ROW_DATASETS if d in f
        }
        # Optimizer state rows: same codec, chunking and checksums as params, written and flushed with them.
        self.opt_rows = {
            k: _RowStore(f[fmt.optimizer_dataset(k)], self.codec, layout.storage_dtype(PARAMS), n) for k in self.optimizer_keys
        }
        self.state_step = _Column(f[fmt.OPTIMIZER_STEP]) if self.optimizer_keys else None
        self.steps = _Column(f[fmt.STEPS])
        self.times = _Column(f[fmt.RECORD_TIME])
        self.nonfinite = _Column(f[fmt.NONFINITE])
        self.batch_step = _Column(f[fmt.BATCH_STEP])
        self.batch_end = _Column(f[fmt.BATCH_END])
        self.batch_indices = _Column(f[fmt.BATCH_INDICES])
        self.scalars = _Column(f[fmt.SCALARS])
        self._batch_total = int(f[fmt.BATCH_END][-1]) if f[fmt.BATCH_END].shape[0] else 0
        self.n_records = n
        self.last_step = int(f[fmt.STEPS][-1]) if n else None
        self._swmr = False
        self._failed: BaseException | None = None
        self.closed = False

    def _open_for_append(self, kw: dict[str, Any]) -> h5py.File:
        """Open r+; if a killed writer left HDF5's write flags set, clear them (as h5clear -s) and retry."""
        from .recovery import clear_write_flags

        for attempt in range(2):
            try:
                return h5py.File(self.path, "r+", libver="latest", **kw)
            except OSError as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                if attempt == 0 and "already open for write" in msg:
                    try:
                        if clear_write_flags(self.path):
                            continue
                    except (RuntimeError, ValueError) as why:
                        msg = str(why)
                raise ArchiveFormatError(f"cannot append to {self.path}: {msg}") from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ creation
    def _create(self, layout: Layout, attrs: Mapping[str, Any], chunk_rows: int | None) -> None:
        f = self.file
        f.attrs["format"] = fmt.FORMAT_NAME
        f.attrs["format_version"] = fmt.FORMAT_VERSION
        f.attrs["codec"] = self.codec.name
        f.attrs["lossy"] = self.codec.lossy
        for k, v in attrs.items():
            if isinstance(v, (dict, list, tuple)):
                v = json.dumps(v, sort_keys=True)
            elif v is None:
                v = ""
            elif isinstance(v, str):
                v = str(v)  # plain str: h5py cannot store str subclasses such as torch's TorchVersion
            f.attrs[k] = v
        f.attrs[fmt.ARCHIVE_UUID] = str(uuid.uuid4())  # the run's identity: never shared by two archives
        table = layout.to_table()
        f.create_dataset(fmt.LAYOUT, data=table, chunks=(max(1, len(table)),), fletcher32=True)
        for d in ROW_DATASETS:
            n_values = layout.sizes[d]
            if n_values == 0:
                continue
            logical = layout.storage_dtype(d)
            disk = self.codec.disk_dtype(logical)
            chunks = fmt.chunk_shape(n_values, logical.itemsize, chunk_rows)
            kwargs = self.codec.h5_kwargs() if d != BUFFERS_INT else _filter_kwargs(META_FILTER, None)
            ds = f.create_dataset(
                d, shape=(0, n_values), maxshape=(None, n_values), dtype=disk, chunks=chunks, fletcher32=True, **kwargs
            )
            ds.attrs["logical_dtype"] = str(logical)
            ds.attrs["transform"] = self.codec.transform if logical.kind == "f" else "none"
        meta = _filter_kwargs(META_FILTER, None)
        if self.optimizer_keys:
            f.attrs[fmt.OPTIMIZER_STATE_ATTR] = json.dumps(list(self.optimizer_keys))
            n_values = layout.sizes[PARAMS]
            logical = layout.storage_dtype(PARAMS)
            chunks = fmt.chunk_shape(n_values, logical.itemsize, chunk_rows)
            for key in self.optimizer_keys:
                ds = f.create_dataset(
                    fmt.optimizer_dataset(key), shape=(0, n_values), maxshape=(None, n_values),
                    dtype=self.codec.disk_dtype(logical), chunks=chunks, fletcher32=True, **self.codec.h5_kwargs(),
                )
                ds.attrs["logical_dtype"] = str(logical)
                ds.attrs["transform"] = self.codec.transform
            f.create_dataset(fmt.OPTIMIZER_STEP, shape=(0,), maxshape=(None,), dtype="<f8", chunks=(fmt.META_CHUNK,),
                             fletcher32=True, **meta)
        for name, dtype in (
            (fmt.STEPS, "<i8"),
            (fmt.RECORD_TIME, "<f8"),
            (fmt.NONFINITE, "<i8"),
            (fmt.BATCH_STEP, "<i8"),
            (fmt.BATCH_END, "<i8"),
            (fmt.BATCH_INDICES, "<i8"),
            (fmt.SCALARS, fmt.SCALAR_DTYPE),
        ):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(fmt.META_CHUNK,), fletcher32=True, **meta)

    def _check_appendable(self, layout: Layout) -> None:
        f = self.file
        if f.attrs.get("format") != fmt.FORMAT_NAME:
            raise ArchiveFormatError(f"cannot append to {self.path}: it is not an sgdwalk archive")
        if int(f.attrs.get("format_version", 0)) != fmt.FORMAT_VERSION:
            raise ArchiveFormatError(
                f"cannot append to {self.path}: format version {f.attrs.get('format_version')} != {fmt.FORMAT_VERSION}"
            )
        if Layout.from_table(f[fmt.LAYOUT][()]) != layout:
            raise LayoutMismatchError(f"cannot append to {self.path}: the model's layout differs from the archive's")
        stored = self._stored_optimizer_keys()
        if stored != self.optimizer_keys:
            have = f"records optimizer state {list(stored)}" if stored else "records no optimizer state"
            want = f"optimizer state {list(self.optimizer_keys)}" if self.optimizer_keys else "no optimizer state"
            raise ArchiveFormatError(
                f"cannot append to {self.path}: it {have} but this run records {want}; "
                "record the same optimizer state as the archive or start a new archive"
            )
        n = f[fmt.STEPS].shape[0]  # a killed writer may have left rows past the last complete record
        for d in ROW_DATASETS:
            if d in f and f[d].shape[0] != n:
                f[d].resize(n, axis=0)
        for d in [fmt.optimizer_dataset(k) for k in stored] + ([fmt.OPTIMIZER_STEP] if stored else []):
            if f[d].shape[0] < n:  # flushes write these before steps, so only damage makes them shorter
                raise ArchiveFormatError(f"cannot append to {self.path}: dataset '{d}' holds fewer rows than its {n} records")
            if f[d].shape[0] != n:
                f[d].resize(n, axis=0)
        if "closed_cleanly" in f.attrs:
            del f.attrs["closed_cleanly"]

    def _stored_optimizer_keys(self) -> tuple[str, ...]:
        """The optimizer-state keys an existing archive lists (empty when it records none)."""
        raw = self.file.attrs.get(fmt.OPTIMIZER_STATE_ATTR, "")
        if isinstance(raw, bytes):
            raw = raw.decode(errors="replace")
        try:
            keys = json.loads(raw) if raw else []
        except (TypeError, ValueError):
            keys = None
        if not isinstance(keys, list) or not all(isinstance(k, str) and k in fmt.OPTIMIZER_KEYS for k in keys):
            raise ArchiveFormatError(f"cannot append to {self.path}: its '{fmt.OPTIMIZER_STATE_ATTR}' attribute is damaged")
        for k in keys:
            if fmt.optimizer_dataset(k) not in self.file or (fmt.OPTIMIZER_STEP not in self.file):
                raise ArchiveFormatError(f"cannot append to {self.path}: it lists optimizer state '{k}' but lacks its dataset")
        return tuple(keys)

    # ------------------------------------------------------------------ writing
    def add_record(
        self,
        step: int,
        rows: Mapping[str, np.ndarray],
        wall_time: float | None = None,
        optimizer_rows: Mapping[str, np.ndarray] | None = None,
        state_step: float = float("nan"),
    ) -> None:
        """Queue one record; full chunks are written at once, partial ones at :meth:`flush`.

        ``optimizer_rows`` (key -> flat row in params layout) and ``state_step`` are required exactly when
        the writer records optimizer state; they do not count towards ``nonfinite`` (which stays the count
        of the state-dict rows, as readers that ignore the optimizer datasets expect).
        """
        if self._failed is not None:
            raise self._failed
        if self.optimizer_keys and (optimizer_rows is None or any(k not in optimizer_rows for k in self.optimizer_keys)):
            raise ValueError(f"this archive records optimizer state {list(self.optimizer_keys)}: pass every key's row")
        if self.last_step is not None and step <= self.last_step:
            raise ArchiveFormatError(
                f"record for step {step} is not after the archive's last step {self.last_step}; steps must increase"
            )
        full = False
        bad = 0
        for d, store in self.rows.items():
            row = rows[d]
            if row.dtype.kind == "f":
                bad += int(row.size - np.count_nonzero(np.isfinite(row)))
            full |= store.add(row)
        if self.optimizer_keys:
            for k, store in self.opt_rows.items():
                full |= store.add(optimizer_rows[k])
            self.state_step.add(float(state_step))
        self.steps.add(step)
        self.times.add(time.time() if wall_time is None else wall_time)
        self.nonfinite.add(bad)
        self.n_records += 1
        self.last_step = step
        if full:
            self.flush()

    def add_batch(self, step: int, indices: np.ndarray) -> None:
        """Minibatch sample indices of the update that leaves the state at ``step``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._batch_total += indices.size
        self.batch_step.add(step)
        self.batch_end.add(self._batch_total)
        self.batch_indices.extend(indices)

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            encoded = name.encode()
            if len(encoded) > fmt.SCALAR_NAME_BYTES:
                raise ValueError(f"scalar name longer than {fmt.SCALAR_NAME_BYTES} bytes: {name[:40]}...")
            self.scalars.add((step, encoded, float(value)))

    def flush(self) -> None:
        """Write everything buffered and make it durable and visible to SWMR readers.

        Order matters for readers and crash safety: row data first, then the bookkeeping columns,
        and ``steps`` last, because readers take the number of complete records from ``steps``.
        After any write error (disk full, I/O error) the writer is *failed*: it writes nothing more, so
        ``steps`` never grows past rows whose data did not reach the file (no phantom records).
        """
        if self._failed is not None:
            raise self._failed
        try:
            for store in (*self.rows.values(), *self.opt_rows.values()):
                store.write()
            cols = [self.times, self.nonfinite, self.batch_indices, self.batch_end, self.batch_step, self.scalars]
            for col in cols + ([self.state_step] if self.state_step is not None else []):
                col.write()
            self.file.flush()  # every row and column durable before steps says they exist
            self.steps.write()
            if not self._swmr:
                self.file.swmr_mode = True  # from here on the file stays consistent even if we are killed
                self._swmr = True
            self.file.flush()
        except BaseException as err:
            self._fail(err)
            raise

    def _fail(self, err: BaseException) -> None:
        """Stop writing for good after a write error, leaving the file as a killed writer would.

        HDF5 cannot close a file whose flush failed (it retries the writes, and in HDF5 2.0 closing the
        datasets then crashes the interpreter). The file's descriptor is therefore pointed at /dev/null:
        later writes (the close) are discarded, and the file on disk keeps every record up to the last
        successful flush, readable like the file of a writer killed at that moment.
        """
        if self._failed is None:
            self._failed = err if isinstance(err, Exception) else RuntimeError(str(err))
        try:
            fd = self.file.id.get_vfd_handle()
        except Exception:
            return
        if isinstance(fd, int) and fd >= 0:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)

    def close(self, compact: bool = True) -> None:
        """Flush, close, and mark the archive as cleanly closed (readers report unclean ones).

        With ``compact`` (default), an archive whose file holds more than 3% dead space (see
        :mod:`trajectory.archive.compact`) is then rewritten without it.
        """
        if self.closed:
            return
        self.closed = True
        if self._failed is not None:
            self._close_failed()
            raise self._failed
        try:
            self.flush()
        except BaseException:
            self._close_failed()
            raise
        self.file.close()
        # SWMR forbids attribute writes, so the clean-close mark is set in a short second open.
        with h5py.File(self.path, "r+", libver="latest", **self._open_kw) as f:
            f.attrs["closed_cleanly"] = True
            f.attrs["n_records"] = int(f[fmt.STEPS].shape[0])
        if compact:
            from .compact import compact_if_wasteful

            compact_if_wasteful(self.path)

    def _close_failed(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass  # the descriptor points at /dev/null; nothing more can reach the file

    def abort(self) -> None:
        """Close without the clean-close mark (used when the writer thread itself failed)."""
        if self.closed:
            return
        self.closed = True
        if self._failed is None:
            try:
                self.flush()
            except BaseException:
                pass
        self._close_failed()
