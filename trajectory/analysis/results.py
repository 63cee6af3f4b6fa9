"""The results file: an HDF5 file of per-pair rows, one group per (metric, configuration).

Schema v1 (documented in docs/results.md)::

    /                       attrs: format="sgdwalk-results", format_version=1, archive_id, archive_path,
                                   archive_created, archive_records, archive_provenance, sgdwalk_version,
                                   runs, updated
    /metrics/<metric>/<hash16>/   attrs: metric, metric_version, config (canonical JSON), config_hash
                                   (sha256 hex of config), keys (JSON list), columns (JSON list),
                                   rows_computed, created, updated
        pair    (n,) int64   record index i of the pair (i, i+1)
        span    (n,) int64   only for ("pair", "span") metrics
        step_a  (n,) int64   step of record i
        step_b  (n,) int64   step of record i+1 (i+span for span rows)
        run     (n,) int64   which analyze run (1, 2, ...) computed the row
        <column> (n,) or (n, w)   the metric's values

Durability: the whole file is rewritten to a temporary file next to it, fsynced and atomically
renamed over the old one (write-then-rename) at every flush, so a killed process always leaves
the previous complete file; at most the rows since the last flush are lost. Results files are
small (rows of numbers), so rewriting is cheap. One writer at a time is enforced with an flock on
``RESULTS.lock`` through the ``filelock`` library; the lock file is never deleted, because unlinking a held
lock file lets a waiter lock the orphaned inode while a newcomer locks a fresh file at the same path.

Reading validates (docs/results.md, "Validation"): no external links or virtual/external storage, column lengths
agree, keys are sane and, when the archive is known, pair indices and steps agree with it; a group whose value
columns are missing or malformed is incomplete and its rows are never reused.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import stat
import time
import warnings
from typing import Any, Iterable, Mapping

import filelock
import h5py
import numpy as np

from .. import __version__
from ..textsafe import MAX_JSON_CHARS, escape, load_json, one_line, safe
from .errors import ResultsError, ResultsLockedError, ResultsMismatchError
from .identity import ArchiveIdentity, is_legacy_id, legacy_acceptable

__all__ = ["ResultsFile", "Table", "RESULTS_FORMAT", "RESULTS_VERSION", "config_hash", "canonical_json", "default_results_path"]

RESULTS_FORMAT = "sgdwalk-results"
RESULTS_VERSION = 1
_KEY_COLS = ("pair", "span")
_META_COLS = ("step_a", "step_b", "run")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def default_results_path(archive: str | os.PathLike) -> str:
    """``run.h5`` -> ``run.results.h5`` (next to the archive)."""
    base = os.fspath(archive)
    root, ext = os.path.splitext(base)
    return f"{root}.results{ext or '.h5'}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


class Table:
    """Rows of one metric under one configuration, keyed by (pair,) or (pair, span)."""

    def __init__(self, metric: str, config: Mapping[str, Any], keys: Iterable[str], *, version: int = 1):
        self.metric = metric
        self.config = dict(config)
        self.config_json = canonical_json(self.config)
        self.hash = config_hash(self.config)
        self.keys = tuple(keys)
        if self.keys not in (("pair",), ("pair", "span")):
            raise ResultsError(f"metric {metric!r}: keys must be ('pair',) or ('pair', 'span'), got {self.keys}")
        self.version = int(version)
        self.rows: dict[tuple[int, ...], dict[str, Any]] = {}
        self.meta: dict[tuple[int, ...], tuple[int, int, int]] = {}  # key -> (step_a, step_b, run)
        self.columns: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.rows_computed = 0
        #: keys of rows known to this process but stored in another file (rows adopted from other ranks'
        #: partial files in a distributed run); they feed dependencies and resume but are never written here
        self.foreign: set[tuple[int, ...]] = set()
        self.created = _now()
        self.updated = self.created
        self._dirty = False

    @property
    def group_name(self) -> str:
        return f"metrics/{self.metric}/{self.hash[:16]}"

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return tuple(key) in self.rows

    def _coerce(self, name: str, value: Any) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.bool_)
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int64)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
        else:
            raise ResultsError(f"metric {self.metric!r}: column {name!r} has non-numeric value {value!r}")
        if arr.ndim > 1:
            raise ResultsError(f"metric {self.metric!r}: column {name!r} must be a number or a 1-D array")
        spec = self.columns.get(name)
        if spec is None:
            self.columns[name] = (arr.shape, arr.dtype)
        elif spec[0] != arr.shape:
            raise ResultsError(f"metric {self.metric!r}: column {name!r} changed shape from {spec[0]} to {arr.shape}")
        elif spec[1] != arr.dtype:
            arr = arr.astype(spec[1]) if np.can_cast(arr.dtype, spec[1], "same_kind") or spec[1] == np.float64 else arr
        return arr

    def add(self, key: tuple[int, ...], step_a: int, step_b: int, values: Mapping[str, Any], run: int) -> None:
        key = tuple(int(k) for k in key)
        if len(key) != len(self.keys):
            raise ResultsError(f"metric {self.metric!r}: key {key} does not match keys {self.keys}")
        bad = [c for c in values if c in _KEY_COLS + _META_COLS]
        if bad:
            raise ResultsError(f"metric {self.metric!r}: column name {bad[0]!r} is reserved")
        row = {name: self._coerce(name, v) for name, v in values.items()}
        if self.rows and set(row) != set(self.columns):
            raise ResultsError(f"metric {self.metric!r}: row columns {sorted(row)} differ from {sorted(self.columns)}")
        self.rows[key] = row
        self.meta[key] = (int(step_a), int(step_b), int(run))
        self.foreign.discard(key)
        self.rows_computed += 1
        self._dirty = True

    def adopt(self, key: tuple[int, ...], meta: tuple[int, int, int], values: Mapping[str, Any]) -> bool:
        """Know a row computed elsewhere (another rank, another file) without owning it: it satisfies
        dependencies and resume checks but is not written by :meth:`write` nor counted in ``rows_computed``.
        Returns False (and changes nothing) when the key is already known."""
        key = tuple(int(k) for k in key)
        if key in self.rows:
            return False
        self.rows[key] = {name: self._coerce(name, v) for name, v in values.items()}
        self.meta[key] = tuple(int(m) for m in meta)  # type: ignore[assignment]
        self.foreign.add(key)
        return True

    def merge(self, other: "Table") -> int:
        """Take ``other``'s own rows whose keys are new here, as rows of this table (the merge of a
        distributed run's partial files). Keys already present are kept as they are. Returns the number
        of rows taken; ``rows_computed`` grows by that number, so it still counts distinct computations."""
        if other.hash != self.hash:
            raise ResultsError(f"cannot merge tables of different configurations ({other.hash[:12]} into {self.hash[:12]})")
        taken = 0
        for key in other.sorted_keys():
            if key in other.foreign:
                continue
            if key in self.rows and key not in self.foreign:
                continue
            self.foreign.discard(key)
            self.rows[key] = {name: self._coerce(name, v) for name, v in other.rows[key].items()}
            self.meta[key] = other.meta[key]
            taken += 1
        if taken:
            self.rows_computed += taken
            self._dirty = True
        return taken

    def sorted_keys(self, own: bool = False) -> list[tuple[int, ...]]:
        """Keys in order; ``own=True`` leaves out adopted (foreign) rows."""
        if own and self.foreign:
            return sorted(k for k in self.rows if k not in self.foreign)
        return sorted(self.rows)

    def arrays(self, own: bool = False) -> dict[str, np.ndarray]:
        """Every column as an array in key order (keys, step_a, step_b, run, values); ``own=True``: this file's rows only."""
        keys = self.sorted_keys(own)
        out: dict[str, np.ndarray] = {}
        for j, k in enumerate(self.keys):
            out[k] = np.array([key[j] for key in keys], dtype=np.int64)
        for j, k in enumerate(_META_COLS):
            out[k] = np.array([self.meta[key][j] for key in keys], dtype=np.int64)
        for name, (shape, dtype) in self.columns.items():
            if keys:
                out[name] = np.stack([self.rows[key][name] for key in keys]).astype(dtype)
            else:
                out[name] = np.empty((0, *shape), dtype=dtype)
        return out

    # ------------------------------------------------------------------ I/O
    def write(self, f: h5py.File) -> None:
        g = f.create_group(self.group_name)
        g.attrs["metric"] = self.metric
        g.attrs["metric_version"] = self.version
        g.attrs["config"] = self.config_json
        g.attrs["config_hash"] = self.hash
        g.attrs["keys"] = json.dumps(list(self.keys))
        g.attrs["columns"] = json.dumps(list(self.columns))
        g.attrs["rows_computed"] = self.rows_computed
        g.attrs["created"] = self.created
        g.attrs["updated"] = self.updated
        for name, arr in self.arrays(own=True).items():
            g.create_dataset(name, data=arr)

    @classmethod
    def read(cls, g: h5py.Group) -> "Table":
        cfg = json.loads(_attr(g.attrs["config"]))
        t = cls(_attr(g.attrs["metric"]), cfg, json.loads(_attr(g.attrs["keys"])), version=int(_attr(g.attrs.get("metric_version", 1))))
        if t.hash != _attr(g.attrs["config_hash"]):
            raise ResultsError(f"group {g.name}: stored config hash does not match its config (file edited?)")
        cols = json.loads(_attr(g.attrs["columns"]))
        data = {k: g[k][()] for k in list(t.keys) + list(_META_COLS) + cols}
        n = len(data["pair"])
        for name in cols:
            arr = data[name]
            t.columns[name] = (arr.shape[1:], arr.dtype)
        for i in range(n):
            key = tuple(int(data[k][i]) for k in t.keys)
            t.rows[key] = {name: data[name][i] for name in cols}
            t.meta[key] = (int(data["step_a"][i]), int(data["step_b"][i]), int(data["run"][i]))
        t.rows_computed = int(_attr(g.attrs.get("rows_computed", n)))
        t.created = _attr(g.attrs.get("created", ""))
        t.updated = _attr(g.attrs.get("updated", ""))
        return t


def acquire_results_lock(path: str | os.PathLike) -> filelock.BaseFileLock:
    """Take the single-writer lock of the results file ``path`` (``path + '.lock'``) without waiting.

    Raises :class:`ResultsLockedError` (one line) when another process or another ResultsFile holds it. The lock
    file stays behind after release on purpose: deleting a held lock file is what let several writers hold
    "the" lock at once (a waiter locks the unlinked inode, a newcomer a new file at the same path)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ResultsError(f"cannot write {escape(path)}: directory {escape(d)} does not exist")
    lock_path = path + ".lock"
    # thread_local=False: the writer may be closed from another thread than the one that opened it
    lock = filelock.FileLock(lock_path, timeout=0, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ResultsLockedError(
            f"{escape(path)} is being written by another sgdwalk analyze; wait for it or pass another --out") from None
    except OSError as err:
        raise ResultsError(f"cannot create lock file {escape(lock_path)}: {one_line(err.strerror or err)}") from None
    return lock


class ResultsFile:
    """Results of analyses of one archive. ``mode='r'`` reads; ``mode='a'`` creates or appends (locked).

    ``archive_id`` (required for 'a') is compared with the id stored in an existing file; a
    different archive raises :class:`ResultsMismatchError`.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", *, archive_id: str | None = None, archive_info: Mapping[str, Any] | None = None):
        self.path = os.fspath(path)
        self.mode = mode
        self.tables: dict[tuple[str, str], Table] = {}
        self.attrs: dict[str, Any] = {}
        self._lock_obj: filelock.BaseFileLock | None = None
        self.last_flush = 0.0
        self.flush_count = 0
        self._attrs_dirty = False
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        if mode == "a":
            if archive_id is None:
                raise ValueError("archive_id is required to write a results file")
            self._lock()
        try:
            if os.path.exists(self.path):
                self._read()
                if archive_id is not None and self.attrs.get("archive_id") != archive_id:
                    raise ResultsMismatchError(
                        f"{self.path} holds results of a different archive ({self.attrs.get('archive_path', '?')}, "
                        f"id {str(self.attrs.get('archive_id', '?'))[:12]} vs {archive_id[:12]}); pass another --out or remove it"
                    )
            elif mode == "r":
                raise ResultsError(f"no such results file: {self.path}")
            else:
                self.attrs = {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "archive_id": archive_id, "runs": 0}
            if mode == "a":
                before = dict(self.attrs)
                self.attrs.update(dict(archive_info or {}))
                # e.g. a file written before archive_provenance existed gains it on the next run
                self._attrs_dirty = self.attrs != before
                self.attrs["runs"] = int(self.attrs.get("runs", 0)) + 1
                self.run = int(self.attrs["runs"])
        except BaseException:
            self._unlock()
            raise

    # ------------------------------------------------------------------ locking
    def _lock(self) -> None:
        self._lock_obj = acquire_results_lock(self.path)

    def _unlock(self) -> None:
        lock, self._lock_obj = self._lock_obj, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ read / write
    def _read(self) -> None:
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            msg = " ".join(str(err).split())
            raise ResultsMismatchError(f"{self.path} is not a readable results file ({msg}); pass another --out or remove it") from None
        with f:
            if _attr(f.attrs.get("format")) != RESULTS_FORMAT:
                raise ResultsMismatchError(f"{self.path} is not an sgdwalk results file (results files are written by sgdwalk analyze; an archive is not one)")
            version = int(_attr(f.attrs.get("format_version", -1)))
            if version > RESULTS_VERSION:
                raise ResultsError(f"{self.path} uses results format v{version}, newer than v{RESULTS_VERSION}; upgrade sgdwalk")
            self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
            if "metrics" in f:
                for mname, mg in f["metrics"].items():
                    for _h, g in mg.items():
                        t = Table.read(g)
                        self.tables[(t.metric, t.hash)] = t

    def table(self, metric: str, config: Mapping[str, Any], keys: Iterable[str], version: int = 1) -> Table:
        """The table of ``metric`` under ``config`` (created empty if new)."""
        t = Table(metric, config, keys, version=version)
        existing = self.tables.get((metric, t.hash))
        if existing is not None:
            return existing
        self.tables[(metric, t.hash)] = t
        return t

    @property
    def dirty(self) -> bool:
        return self._attrs_dirty or any(t._dirty for t in self.tables.values())

    def flush(self) -> None:
        """Write the whole file atomically (temporary file, fsync, rename)."""
        if self.mode != "a":
            raise ResultsError("results file opened read-only")
        tmp = f"{self.path}.tmp-{os.getpid()}"
        self.attrs["updated"] = _now()
        self.attrs["sgdwalk_version"] = __version__
        try:
            with h5py.File(tmp, "w", track_order=True) as f:
                for k, v in self.attrs.items():
                    f.attrs[k] = v
                f.create_group("metrics")
                for (metric, h), t in sorted(self.tables.items()):
                    if t._dirty:
                        t.updated = self.attrs["updated"]
                    t.write(f)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        for t in self.tables.values():
            t._dirty = False
        self._attrs_dirty = False
        self.last_flush = time.monotonic()
        self.flush_count += 1

    def close(self) -> None:
        try:
            if self.mode == "a" and self.dirty:
                self.flush()
        finally:
            self._unlock()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def merge_from(self, other: "ResultsFile") -> int:
        """Take every row of ``other`` (same archive) that this file lacks; returns the number taken.
        Used to fold a distributed run's per-rank partial files into the results file."""
        if other.attrs.get("archive_id") != self.attrs.get("archive_id"):
            raise ResultsMismatchError(f"{other.path} holds results of a different archive than {self.path}; remove it")
        taken = 0
        for (metric, _h), t in sorted(other.tables.items()):
            mine = self.table(metric, t.config, t.keys, t.version)
            taken += mine.merge(t)
        return taken

    def by_metric(self, metric: str) -> list[Table]:
        return [t for (m, _), t in sorted(self.tables.items()) if m == metric]
