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
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _file_name(obj: h5py.HLObject) -> str:
    try:
        return escape(obj.file.filename)
    except Exception:  # noqa: BLE001 - only for a message
        return "results file"


def _int_column(g: h5py.Group, name: str, where: str) -> np.ndarray:
    obj = g.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise ResultsError(f"{where} lacks the {name!r} dataset; the file is damaged, remove it")
    if obj.ndim != 1 or not np.issubdtype(obj.dtype, np.integer):
        raise ResultsError(f"{where}: {name!r} must be a 1-D integer dataset, is {obj.shape} {escape(obj.dtype)}; the file is damaged")
    return obj[()].astype(np.int64)


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
        #: how rows were evaluated, by the ``run`` that computed them: {"<run>": {"name": strategy, "rate": ..., ...}};
        #: stored as the group attribute ``replay``, NOT part of the configuration (strategies agree to float rounding)
        self.replay: dict[str, Any] = {}
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
            for run, rec in other.replay.items():
                self.replay.setdefault(run, rec)
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
        if self.replay:
            g.attrs["replay"] = canonical_json(self.replay)
        for name, arr in self.arrays(own=True).items():
            g.create_dataset(name, data=arr)

    @classmethod
    def read(cls, g: h5py.Group) -> "Table":
        """Read one group, validating it (each problem is one :class:`ResultsError` line naming the group).

        Keys and bookkeeping columns must be 1-D integer datasets and every dataset must have as many rows as
        ``pair``; keys must be sane (pair >= 0, span >= 1, no duplicates). A value column listed in ``columns``
        that is missing or malformed makes every row incomplete: the group is read without rows (they are
        computed again) and a warning says so."""
        where = f"{_file_name(g)}: group {escape(g.name)}"
        attrs = {k: _attr(g.attrs[k]) for k in ("metric", "config", "config_hash", "keys", "columns") if k in g.attrs}
        for k in ("metric", "config", "config_hash", "keys", "columns"):
            if not isinstance(attrs.get(k), str):
                raise ResultsError(f"{where} lacks its {k!r} attribute (or it is not text); the file is damaged, remove it")
        cfg = load_json(attrs["config"], f"{where}: config", error=ResultsError)
        keys = load_json(attrs["keys"], f"{where}: keys", error=ResultsError)
        cols = load_json(attrs["columns"], f"{where}: columns", error=ResultsError)
        if not isinstance(cfg, dict):
            raise ResultsError(f"{where}: config is not a JSON object; the file is damaged, remove it")
        if keys not in (["pair"], ["pair", "span"]):
            raise ResultsError(f"{where}: keys {safe(attrs['keys'], 60)} are not [\"pair\"] or [\"pair\", \"span\"]; the file is damaged")
        if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols) or len(set(cols)) != len(cols):
            raise ResultsError(f"{where}: columns {safe(attrs['columns'], 80)} is not a list of distinct names; the file is damaged")
        reserved = [c for c in cols if c in _KEY_COLS + _META_COLS]
        if reserved:
            raise ResultsError(f"{where}: column name {safe(reserved[0])} is reserved; the file is damaged")
        try:
            version = int(_attr(g.attrs.get("metric_version", 1)))
        except (TypeError, ValueError):
            raise ResultsError(f"{where}: metric_version is not an integer; the file is damaged") from None
        t = cls(attrs["metric"], cfg, keys, version=version)
        if t.hash != attrs["config_hash"]:
            raise ResultsError(f"{where}: stored config hash does not match its config (file edited?)")
        index = {k: _int_column(g, k, where) for k in list(t.keys) + list(_META_COLS)}
        n = len(index["pair"])
        for k, arr in index.items():
            if len(arr) != n:
                raise ResultsError(f"{where}: column {k!r} has {len(arr)} rows but 'pair' has {n}; the file is damaged, remove it")
        if n and index["pair"].min() < 0:
            raise ResultsError(f"{where}: negative pair index {int(index['pair'].min())}; the file is damaged, remove it")
        if n and "span" in index and index["span"].min() < 1:
            raise ResultsError(f"{where}: span {int(index['span'].min())} < 1; the file is damaged, remove it")
        if n and len({tuple(int(index[k][i]) for k in t.keys) for i in range(n)}) != n:
            raise ResultsError(f"{where}: a key appears twice; the file is damaged, remove it")
        data: dict[str, np.ndarray] = dict(index)
        problem = None
        for name in cols:
            obj = g.get(name)
            if not isinstance(obj, h5py.Dataset):
                problem = f"column {safe(name, 60)} is missing"
            elif obj.ndim not in (1, 2) or obj.shape[0] != n:
                if obj.ndim >= 1 and obj.shape[0] != n:
                    raise ResultsError(f"{where}: column {safe(name, 60)} has {obj.shape[0]} rows but 'pair' has {n}; the file is damaged, remove it")
                problem = f"column {safe(name, 60)} has shape {obj.shape}"
            elif not (np.issubdtype(obj.dtype, np.number) or obj.dtype == np.bool_) or np.issubdtype(obj.dtype, np.complexfloating):
                problem = f"column {safe(name, 60)} has non-numeric dtype {escape(obj.dtype)}"
            if problem:
                break
            data[name] = obj[()]
        if problem is not None:
            warnings.warn(f"{where} is incomplete ({problem}); its {n} rows are not reused and will be computed again")
            t.rows_computed = 0
            t._dirty = True  # the next flush rewrites the group without the incomplete rows
            return t
        for name in cols:
            arr = data[name]
            t.columns[name] = (arr.shape[1:], arr.dtype)
        for i in range(n):
            key = tuple(int(data[k][i]) for k in t.keys)
            t.rows[key] = {name: data[name][i] for name in cols}
            t.meta[key] = (int(data["step_a"][i]), int(data["step_b"][i]), int(data["run"][i]))
        try:
            t.rows_computed = int(_attr(g.attrs.get("rows_computed", n)))
        except (TypeError, ValueError):
            raise ResultsError(f"{where}: rows_computed is not an integer; the file is damaged") from None
        t.created = str(_attr(g.attrs.get("created", "")))
        t.updated = str(_attr(g.attrs.get("updated", "")))
        try:  # informational only (how rows were evaluated): a damaged value is dropped, never fatal
            rep = json.loads(_attr(g.attrs["replay"])) if "replay" in g.attrs else {}
        except (TypeError, ValueError):
            rep = {}
        t.replay = rep if isinstance(rep, dict) else {}
        return t

    def check_against(self, ident: ArchiveIdentity, where: str) -> None:
        """Refuse (one line) rows whose pair lies outside the archive or whose steps are not the archive's steps
        at those records: such rows were computed from other records than this archive holds."""
        if not self.rows:
            return
        keys = self.sorted_keys()
        pair = np.array([k[0] for k in keys], dtype=np.int64)
        span = np.array([k[1] if len(k) > 1 else 1 for k in keys], dtype=np.int64)
        if int(pair.max()) >= ident.records - 1:
            raise ResultsError(
                f"{where}: {self.metric} rows reach pair {int(pair.max())} but the archive has {ident.records} records "
                "(pairs 0..{}); the file belongs to a longer archive or is damaged, remove it".format(max(ident.records - 2, 0)))
        far = np.minimum(pair + span, ident.records - 1)
        meta = np.array([self.meta[k][:2] for k in keys], dtype=np.int64).reshape(-1, 2)
        bad = np.nonzero((meta[:, 0] != ident.steps[pair]) | (meta[:, 1] != ident.steps[far]))[0]
        if len(bad):
            i = int(bad[0])
            raise ResultsError(
                f"{where}: {self.metric} row of pair {int(pair[i])} is for steps {int(meta[i, 0])}->{int(meta[i, 1])} but the "
                f"archive's records there are steps {int(ident.steps[pair[i]])}->{int(ident.steps[far[i]])}; remove the file or pass another --out")


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


def _refuse_links(f: h5py.File, name: str) -> None:
    """Refuse external and soft links, external raw storage and virtual datasets before any is followed: a results
    file is plain data written by sgdwalk, and following them would read (or print) other files."""
    bad: list[str] = []

    def visit(path: str, link: Any) -> None:
        if bad:
            return
        if isinstance(link, h5py.ExternalLink):
            bad.append(f"an external link at /{escape(path)}")
        elif isinstance(link, h5py.SoftLink):
            bad.append(f"a soft link at /{escape(path)}")
        else:
            obj = f.get(path, getlink=False)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    bad.append(f"a virtual dataset at /{escape(path)}")
                elif obj.external:
                    bad.append(f"external raw storage at /{escape(path)}")

    f.visititems_links(visit)
    if bad:
        raise ResultsError(f"{name} holds {bad[0]}; sgdwalk never follows those in results files, remove it")


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
        upgraded = False
        try:
            if os.path.lexists(self.path):
                self._read()
                if archive_id is not None:
                    upgraded = self._check_identity(archive_id, archive_info or {})
            elif mode == "r":
                raise ResultsError(f"no such results file: {escape(self.path)}")
            else:
                self.attrs = {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "archive_id": str(archive_id), "runs": 0}
            if mode == "a":
                before = dict(self.attrs)
                self.attrs.update(dict(archive_info or {}))
                # e.g. a file written before archive_provenance existed gains it on the next run
                self._attrs_dirty = self.attrs != before or upgraded
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
    def _check_identity(self, ident: str, info: Mapping[str, Any]) -> bool:
        """Refuse a file of another archive; accept a legacy (pre-UUID) id only under the rule of
        :func:`~trajectory.analysis.identity.legacy_acceptable`, then upgrade it. Returns True when upgraded."""
        stored = self.attrs.get("archive_id")
        name = escape(self.path)
        upgraded = False
        if stored != ident:
            if isinstance(ident, ArchiveIdentity) and is_legacy_id(stored):
                why = legacy_acceptable(self.attrs, ident, info.get("archive_provenance"))
                if why is not None:
                    raise ResultsMismatchError(
                        f"{name} was written by an older sgdwalk for an archive id that cannot be confirmed as this archive's "
                        f"({why}); its rows are not reused: pass another --out or remove it")
                upgraded = True
            else:
                raise ResultsMismatchError(
                    f"{name} holds results of a different archive ({safe(self.attrs.get('archive_path', '?'), 200)}, "
                    f"id {escape(str(stored)[:20])} vs {escape(str(ident)[:20])}); pass another --out or remove it")
        if isinstance(ident, ArchiveIdentity):
            for t in self.tables.values():
                t.check_against(ident, name)
        if upgraded:
            self.attrs["archive_id_legacy"] = stored
            self.attrs["archive_id"] = str(ident)
        return upgraded

    def _read(self) -> None:
        name = escape(self.path)
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise ResultsError(f"cannot read {name}: {one_line(err.strerror or err)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ResultsMismatchError(f"{name} is not a regular file (a directory, FIFO or device), so not a results file; pass another --out")
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise ResultsMismatchError(f"{name} is not a readable results file ({one_line(err)}); pass another --out or remove it") from None
        try:
            with f:
                self._read_open(f, name)
        except (KeyError, OSError, RuntimeError, TypeError, ValueError, RecursionError) as err:
            if isinstance(err, ResultsError):
                raise
            raise ResultsError(f"{name} cannot be read as a results file ({type(err).__name__}: {one_line(err)}); the file is damaged, remove it") from None

    def _read_open(self, f: h5py.File, name: str) -> None:
        if _attr(f.attrs.get("format")) != RESULTS_FORMAT:
            raise ResultsMismatchError(f"{name} is not an sgdwalk results file (results files are written by sgdwalk analyze; an archive is not one)")
        raw_version = _attr(f.attrs.get("format_version", -1))
        if isinstance(raw_version, bool) or not isinstance(raw_version, int):
            raise ResultsError(f"{name}: format_version {safe(raw_version, 40)} is not an integer; the file is damaged, remove it")
        if raw_version > RESULTS_VERSION:
            raise ResultsError(f"{name} uses results format v{raw_version}, newer than v{RESULTS_VERSION}; upgrade sgdwalk")
        if raw_version < 1:
            raise ResultsError(f"{name} has an invalid format_version {raw_version}; the file is damaged, remove it")
        _refuse_links(f, name)
        # sgdwalk writes scalar attributes only; anything else is not ours and is dropped at the next write
        self.attrs = {k: v for k, v in ((k, _attr(v)) for k, v in f.attrs.items()) if isinstance(v, (str, int, float, bool))}
        if not isinstance(self.attrs.get("archive_id"), str):
            raise ResultsError(f"{name} lacks its archive_id attribute; the file is damaged, remove it")
        metrics = f.get("metrics")
        if metrics is None:
            return
        if not isinstance(metrics, h5py.Group):
            raise ResultsError(f"{name}: /metrics is not a group; the file is damaged, remove it")
        for _m, mg in metrics.items():
            if not isinstance(mg, h5py.Group):
                raise ResultsError(f"{name}: {escape(mg.name)} is not a group; the file is damaged, remove it")
            for _h, g in mg.items():
                if not isinstance(g, h5py.Group):
                    raise ResultsError(f"{name}: {escape(g.name)} is not a group; the file is damaged, remove it")
                t = Table.read(g)
                if (t.metric, t.hash) in self.tables:
                    raise ResultsError(f"{name}: two groups hold {safe(t.metric, 60)} under one configuration; the file is damaged")
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
