"""Built-in data factories, and the contract every data factory follows.

Contract
--------
``factory(split: str = "train", augment: bool = False, **kwargs) -> torch.utils.data.Dataset``

* The dataset is map-style and yields ``(x, y)`` with ``y`` an integer class label.
* ``split`` is ``"train"`` or ``"test"``. The recorder's minibatch indices refer to the ``"train"``
  split in dataset order, so that order is a deterministic function of the kwargs: another
  process calling the factory with the same kwargs sees the same example at every index.
* ``augment=True`` turns on the training-time random augmentation (it draws from torch's global
  generator); ``augment=False`` is deterministic. Factories without augmentation ignore the flag.
* Nothing is downloaded and nothing untrusted is unpickled. Data that must come from disk
  (CIFAR-10) is read from a local directory, and a missing directory raises
  :class:`~trajectory.errors.DataNotFoundError` with a one-line explanation.

Factories: :func:`mnist1d` (procedurally generated, no files), :func:`cifar10` (the standard
``cifar-10-batches-py`` directory) and :func:`synthetic` (Gaussian class clusters of any shape, for
benchmarks and tests). :func:`dataset_info` reports the input shape and class count used to size a
model, and :func:`write_cifar10_standin` writes a small generated dataset in the official CIFAR-10
on-disk format so that tests (ours and yours) exercise the real loader.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from trajectory.errors import DataNotFoundError

__all__ = [
    "SPLITS",
    "CIFAR10_ENV",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "LabeledTensorDataset",
    "CIFAR10Dataset",
    "DatasetInfo",
    "mnist1d",
    "cifar10",
    "synthetic",
    "dataset_info",
    "cifar10_transform",
    "write_cifar10_standin",
]

SPLITS: tuple[str, ...] = ("train", "test")

#: Environment variable naming the CIFAR-10 directory when ``root`` is not given.
CIFAR10_ENV = "SGDWALK_CIFAR10_DIR"
#: Per-channel normalisation constants used by the paper's authors (and most CIFAR code since).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILES = ("test_batch",)
_CIFAR10_META = "batches.meta"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


class LabeledTensorDataset(TensorDataset):
    """A ``TensorDataset`` of ``(x, y)`` that also knows its number of classes.

    Still a plain ``TensorDataset`` (``dataset.tensors == (x, y)``); the extra attributes let
    :func:`dataset_info` and samplers answer without scanning the data.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
            raise ValueError("y must be a 1-D int64 tensor with one label per row of x")
        super().__init__(x, y)
        self.num_classes = int(num_classes)

    @property
    def targets(self) -> torch.Tensor:
        """The label tensor (shared, not copied)."""
        return self.tensors[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.tensors[0].shape[1:])


# ------------------------------------------------------------------------------------------ MNIST-1D
_MNIST1D_LOCK = threading.Lock()


#: Bumped when the cache file's layout changes; part of every cache key.
_MNIST1D_CACHE_VERSION = 1
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path | None:
    """sgdwalk's on-disk cache folder: ``$SGDWALK_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/sgdwalk``.

    ``SGDWALK_NO_CACHE=1`` (or ``SGDWALK_CACHE_DIR=off``) disables the cache: None is returned.
    """
    if os.environ.get("SGDWALK_NO_CACHE", "").strip() not in ("", "0"):
        return None
    explicit = os.environ.get("SGDWALK_CACHE_DIR")
    if explicit is not None:
        return None if explicit.strip().lower() in ("", "off", "none", "0") else Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgdwalk"


def _mnist1d_key(num_samples: int, train_split: float, seed: int) -> str:
    """Everything the generated arrays depend on: arguments, the mnist1d package version, the cache layout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - the package is a dependency
        pkg = "unknown"
    return json.dumps(
        {"cache": _MNIST1D_CACHE_VERSION, "num_samples": num_samples, "train_split": repr(float(train_split)),
         "seed": seed, "mnist1d": pkg}, sort_keys=True)


def _digest(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _cache_load(path: Path, key: str) -> tuple[np.ndarray, ...] | None:
    """The cached arrays if the file is ours, for this key, and intact; None otherwise (never trusted blindly)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = tuple(z[k] for k in _MNIST1D_KEYS)
    except Exception:  # missing, truncated, foreign or corrupt file: regenerate
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("sha256") != _digest(arrays):
        return None
    x, y, xt, yt = arrays
    if x.dtype != np.float32 or xt.dtype != np.float32 or y.dtype != np.int64 or yt.dtype != np.int64:
        return None
    if x.ndim != 2 or xt.ndim != 2 or len(x) != len(y) or len(xt) != len(yt):
        return None
    return arrays


def _cache_store(path: Path, key: str, arrays: Sequence[np.ndarray]) -> None:
    """Write atomically (temporary file + rename), so a concurrent reader sees the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"key": key, "sha256": _digest(arrays)}).encode()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, meta=np.frombuffer(meta, dtype=np.uint8), **dict(zip(_MNIST1D_KEYS, arrays)))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    except OSError:
        pass  # a read-only or full cache folder only costs the regeneration next time


@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(num_samples: int, train_split: float, seed: int) -> tuple[torch.Tensor, ...]:
    """MNIST-1D for one argument set: from this process's memory, else the on-disk cache, else generated.

    Generating takes ~0.7-1.6 s, paid by every CLI call before the cache (issue 10). The cache file is keyed by
    the arguments and the mnist1d package version (:func:`_mnist1d_key`, also stored inside the file with a
    sha256 of the arrays), so a stale, corrupt or foreign file is regenerated, never used.
    """
    folder = cache_dir()
    key = _mnist1d_key(num_samples, train_split, seed)
    path = None
    if folder is not None:
        name = hashlib.sha256(key.encode()).hexdigest()[:24]
        path = folder / f"mnist1d-{name}.npz"
        cached = _cache_load(path, key)
        if cached is not None:
            return tuple(torch.from_numpy(a) for a in cached)
    arrays = _generate_mnist1d(num_samples, train_split, seed)
    if path is not None:
        _cache_store(path, key, arrays)
    return tuple(torch.from_numpy(a) for a in arrays)


def _generate_mnist1d(num_samples: int, train_split: float, seed: int) -> tuple[np.ndarray, ...]:
    """Generate MNIST-1D with the package's procedural generator.

    ``mnist1d.data.make_dataset`` is the package's procedural generator; ``get_dataset`` would
    download or unpickle a file, so it is never used. The generator reseeds numpy's and Python's
    *global* random state, which would silently change the user's own random streams, so both are
    saved and restored around it (under a lock, since the state is process-global).
    """
    import mnist1d.data  # lazy: the package pulls in matplotlib and requests at import time

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    with _MNIST1D_LOCK:
        np_state = np.random.get_state()
        py_state = random.getstate()
        try:
            data = mnist1d.data.make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return (
        np.ascontiguousarray(data["x"], dtype=np.float32),
        np.ascontiguousarray(data["y"], dtype=np.int64),
        np.ascontiguousarray(data["x_test"], dtype=np.float32),
        np.ascontiguousarray(data["y_test"], dtype=np.int64),
    )


def mnist1d(
    split: str = "train",
    augment: bool = False,
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
) -> LabeledTensorDataset:
    """MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, generated procedurally.

    Returns a :class:`LabeledTensorDataset` with ``x`` float32 of shape ``(N, 40)`` and ``y`` int64.
    The defaults reproduce the package's standard dataset: 4000 training and 1000 test examples.
    ``num_samples`` is rounded down to a multiple of 10 (the generator makes equally many examples
    per class); the first ``int(n * train_split)`` examples are the training split, in the
    generator's (shuffled, seed-determined) order, which is the order recorded indices refer to.

    ``augment`` is accepted for the data-factory contract and ignored: MNIST-1D's randomness is
    baked into the generated examples. Arrays are cached per process (keyed by the arguments);
    every call returns fresh tensors, so mutating one dataset never affects another.
    """
    _check_split(split)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"num_samples must be an integer >= 10, got {num_samples!r}")
    if isinstance(train_split, bool) or not isinstance(train_split, (int, float)) or not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be a fraction strictly between 0 and 1, got {train_split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    n_total = (num_samples // 10) * 10
    n_train = int(n_total * float(train_split))
    if n_train == 0 or n_train == n_total:
        raise ValueError(
            f"num_samples={num_samples} with train_split={train_split} leaves an empty split"
        )
    x, y, x_test, y_test = _mnist1d_arrays(num_samples, float(train_split), seed)
    if split == "train":
        return LabeledTensorDataset(x.clone(), y.clone(), num_classes=10)
    return LabeledTensorDataset(x_test.clone(), y_test.clone(), num_classes=10)


# ----------------------------------------------------------------------------------------- synthetic
def synthetic(
    split: str = "train",
    augment: bool = False,
    num_samples: int = 1000,
    num_test: int = 250,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    separation: float = 0.5,
    seed: int = 0,
) -> LabeledTensorDataset:
    """Gaussian class clusters of any input shape: data for benchmarks and tests without files.

    Each class ``c`` has a mean vector ``mu_c`` with i.i.d. ``N(0, separation**2)`` entries (drawn
    from ``seed`` alone, so both splits share them); an example is ``mu_y + N(0, 1)`` noise with a
    uniformly drawn label ``y``. The classes are learnable, so training curves behave like real
    data rather than pure memorisation. ``split="train"`` has ``num_samples`` examples and
    ``split="test"`` has ``num_test``; the two splits use independent streams derived from
    ``seed``. The default shape matches CIFAR-10. ``augment`` is ignored. numpy's global random
    state is not touched.
    """
    _check_split(split)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive sizes, got {input_shape!r}")
    for name, value in (("num_samples", num_samples), ("num_test", num_test), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dim = int(np.prod(shape))
    means = np.random.default_rng([seed, 0]).normal(0.0, float(separation), size=(num_classes, dim))
    n = num_samples if split == "train" else num_test
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    y = rng.integers(0, num_classes, size=n)
    x = means[y] + rng.standard_normal((n, dim))
    return LabeledTensorDataset(
        torch.from_numpy(x.astype(np.float32).reshape((n, *shape))),
        torch.from_numpy(y.astype(np.int64)),
        num_classes=num_classes,
    )


# ------------------------------------------------------------------------------------------ CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild the CIFAR-10 batch dicts and nothing else.

    The official files are Python pickles of ``{"data": uint8 ndarray, "labels": [int], ...}``.
    Pickle can run arbitrary code, and a dataset directory is just files someone handed you, so
    only the handful of numpy reconstructors an ndarray needs are allowed; any other global in the
    stream (``os.system``, ``builtins.eval``, ...) aborts the load.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _cifar_pickle_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR-10 batch file"
            ) from None


@functools.lru_cache(maxsize=1)
def _cifar_pickle_globals() -> dict[tuple[str, str], Any]:
    import codecs

    try:  # numpy >= 2 moved the implementation to numpy._core; pickles name either path
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol-2 pickles written by Python 3 encode bytes through codecs.encode (pure function).
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = _ma.scalar
        if hasattr(_num, "_frombuffer"):
            table[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    return table


def _str_keys(entry: dict[Any, Any]) -> dict[str, Any]:
    # Files pickled by Python 2 read back with str keys under encoding="latin1"; files written by
    # Python 3 code that mimics `pickle.load(f, encoding="bytes")` have bytes keys. Accept both.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
    ) as err:
        raise DataNotFoundError(
            f"{path} is not a readable CIFAR-10 python batch ({' '.join(str(err).split())}); "
            "re-extract cifar-10-python.tar.gz there"
        ) from err
    if not isinstance(entry, dict):
        raise DataNotFoundError(
            f"{path} is not a CIFAR-10 python batch (expected a dict, got {type(entry).__name__})"
        )
    return _str_keys(entry)


def _cifar10_dir(root: str | os.PathLike[str] | None) -> Path:
    """Locate the ``cifar-10-batches-py`` folder: ``root`` itself, or the folder inside it."""
    if root is None:
        env = os.environ.get(CIFAR10_ENV, "").strip()
        if not env:
            raise DataNotFoundError(
                f"no CIFAR-10 directory given: pass root=<dir> in the data kwargs or set {CIFAR10_ENV} "
                f"to a directory holding {_CIFAR10_FOLDER}/ (sgdwalk never downloads data)"
            )
        root = env
    base = Path(root).expanduser()
    candidates = [base / _CIFAR10_FOLDER, base]
    required = (*_CIFAR10_TRAIN_FILES, *_CIFAR10_TEST_FILES, _CIFAR10_META)
    for folder in candidates:
        if all((folder / name).is_file() for name in required):
            return folder
    raise DataNotFoundError(
        f"CIFAR-10 not found: searched {candidates[0]} and {candidates[1]} for data_batch_1..5, test_batch "
        f"and batches.meta; extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        f"into {base}, or pass root= (or set {CIFAR10_ENV}) to the folder that holds {_CIFAR10_FOLDER}/"
    )


def _file_signature(folder: Path, names: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name in names:
        st = (folder / name).stat()
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _load_cifar_split(
    folder: str, files: tuple[str, ...], signature: tuple[Any, ...]
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Read and validate one split; cached per process (``signature`` invalidates on file changes)."""
    del signature  # part of the cache key only
    base = Path(folder)
    meta = _read_cifar_pickle(base / _CIFAR10_META)
    names = meta.get("label_names", CIFAR10_CLASSES)
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    chunks, labels = [], []
    for name in files:
        path = base / name
        entry = _read_cifar_pickle(path)
        data, lab = entry.get("data"), entry.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataNotFoundError(
                f"{path} is not a CIFAR-10 python batch: 'data' must be a uint8 array of shape (N, 3072)"
            )
        lab_arr = np.asarray(lab if lab is not None else [], dtype=np.int64)
        out_of_range = lab_arr.size > 0 and (lab_arr.min() < 0 or lab_arr.max() >= len(classes))
        if lab_arr.shape != (data.shape[0],) or out_of_range:
            raise DataNotFoundError(
                f"{path} is not a CIFAR-10 python batch: 'labels' must hold {data.shape[0]} integers in [0, {len(classes)})"
            )
        chunks.append(data)
        labels.append(lab_arr)
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane: that is CHW.
    images = torch.from_numpy(np.concatenate(chunks).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels)), classes


def cifar10_transform(augment: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The standard CIFAR-10 pipeline on a float CHW tensor in [0, 1].

    ``augment=True``: ``RandomCrop(32, padding=4)`` (zero padding) and ``RandomHorizontalFlip()``,
    then ``Normalize(CIFAR10_MEAN, CIFAR10_STD)``; ``augment=False``: ``Normalize`` only. Working on
    tensors instead of PIL images gives the same values as torchvision's usual
    ``ToTensor``-based pipeline, with the same random draws, at a fraction of the cost - which
    matters when an analysis evaluates the loss on 45,000 images at many points per step.
    """
    from torchvision import transforms

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps.append(transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD))
    return transforms.Compose(steps)


class CIFAR10Dataset(Dataset):
    """CIFAR-10 read from the official ``cifar-10-batches-py`` directory; items are ``(3x32x32 float tensor, int)``.

    Unlike ``torchvision.datasets.CIFAR10`` this never downloads, does not require the official
    files' md5 sums (so a generated stand-in in the same format loads too), and unpickles the
    batches with a restricted unpickler that accepts only numpy arrays, lists and dicts.

    ``transform`` receives the image as a float tensor in [0, 1] of shape (3, 32, 32) (not a PIL
    image). The underlying uint8 tensor ``data`` is shared between datasets in this process; do not
    modify it in place.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        limit: int | None = None,
    ) -> None:
        _check_split(split)
        folder = Path(folder)
        files = _CIFAR10_TRAIN_FILES if split == "train" else _CIFAR10_TEST_FILES
        sig = _file_signature(folder, (*files, _CIFAR10_META))
        images, labels, classes = _load_cifar_split(str(folder), files, sig)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.folder = folder
        self.split = split
        self.transform = transform
        self.data: torch.Tensor = images
        self.targets: list[int] = labels.tolist()
        self.classes: list[str] = list(classes)
        self.num_classes = len(self.classes)
        self.input_shape: tuple[int, ...] = (3, 32, 32)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.data[index].to(torch.float32).div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def __repr__(self) -> str:
        return f"CIFAR10Dataset(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


def cifar10(
    split: str = "train",
    augment: bool = False,
    root: str | None = None,
    limit: int | None = None,
) -> CIFAR10Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` directory (50,000 train / 10,000 test images).

    ``root`` is that directory or its parent; if omitted, the environment variable
    ``SGDWALK_CIFAR10_DIR`` is used. Prefer the environment variable for runs you record: a
    ``root`` kwarg is stored in the archive's spec and may not exist on the machine that analyses
    it. ``limit`` keeps only the first ``limit`` images of the split (same order, so recorded
    indices stay valid) for quick experiments.

    Items are ``(x, y)``: ``x`` a normalised float tensor of shape (3, 32, 32), ``y`` an int. With
    ``augment=True`` the training-time augmentation (random crop with 4-pixel padding, horizontal
    flip) is applied, drawing from torch's global generator. The paper's authors train on the first
    45,000 training images and validate on the last 5,000; do that with index ranges (e.g. a
    sampler over ``range(45000)``), which keeps recorded indices relative to the full split.
    Raises :class:`DataNotFoundError` if the files are not there.
    """
    _check_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    folder = _cifar10_dir(root)
    return CIFAR10Dataset(folder, split, transform=cifar10_transform(bool(augment)), limit=limit)


def write_cifar10_standin(
    root: str | os.PathLike[str],
    n_train: int = 100,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write a small generated dataset in the exact on-disk format of ``cifar-10-python.tar.gz``.

    Creates ``root/cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5`` (the
    ``n_train`` images split as evenly as possible), ``test_batch`` and ``batches.meta``, each a
    pickled dict like the official ones: ``"data"`` a uint8 array of shape (n, 3072) in the
    official channel-planar row layout, ``"labels"`` a list of ints, plus ``"batch_label"`` and
    ``"filenames"``. Images are class-tinted noise so that a model can learn them. Returns the
    ``cifar-10-batches-py`` path. Use it to test code that reads CIFAR-10 without the real
    dataset; :func:`cifar10` reads it exactly as it reads the real one.
    """
    if n_train < 5 or n_test < 1:
        raise ValueError("need n_train >= 5 (one image per training batch file) and n_test >= 1")
    folder = Path(root) / _CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, size=(10, 3))

    def make(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, size=n)
        noise = rng.integers(-40, 41, size=(n, 3, 32 * 32))
        data = np.clip(tints[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(n, 3072)
        return data, [int(v) for v in labels]

    def dump(name: str, obj: dict[str, Any]) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    data, labels = make(n_train)
    parts = np.array_split(np.arange(n_train), len(_CIFAR10_TRAIN_FILES))
    for i, (name, idx) in enumerate(zip(_CIFAR10_TRAIN_FILES, parts), start=1):
        dump(name, {
            "batch_label": f"training batch {i} of 5",
            "labels": [labels[j] for j in idx],
            "data": data[idx],
            "filenames": [f"standin_{j:06d}.png" for j in idx],
        })
    data, labels = make(n_test)
    dump(_CIFAR10_TEST_FILES[0], {
        "batch_label": "testing batch 1 of 1",
        "labels": labels,
        "data": data,
        "filenames": [f"standin_test_{j:06d}.png" for j in range(n_test)],
    })
    dump(_CIFAR10_META, {
        "num_cases_per_batch": int(len(parts[0])),
        "label_names": list(CIFAR10_CLASSES),
        "num_vis": 3072,
    })
    return folder


# ---------------------------------------------------------------------------------------- inspection
@dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to size a model for a dataset (see ``trajectory.specs.size_model_spec``)."""

    input_shape: tuple[int, ...]
    """Shape of one input ``x`` without the batch dimension, e.g. ``(40,)`` or ``(3, 32, 32)``."""
    num_classes: int
    """Number of classes: labels are in ``range(num_classes)``."""
    num_samples: int
    """``len(dataset)``."""


def _labels_of(dataset: Any) -> torch.Tensor | None:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    return None


def _num_classes(dataset: Any) -> int:
    n = getattr(dataset, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    if isinstance(dataset, Subset):  # class count is a property of the parent dataset
        return _num_classes(dataset.dataset)
    labels = _labels_of(dataset)
    if labels is None:  # generic dataset: read every label (may be slow; documented)
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return int(labels.max().item()) + 1 if labels.numel() else 0


def dataset_info(dataset: Dataset) -> DatasetInfo:
    """Input shape, class count and size of a map-style classification dataset.

    Cheap for the zoo's datasets (they carry ``input_shape`` and ``num_classes``). For other
    datasets the shape comes from ``dataset[0]`` - read under :func:`torch.random.fork_rng`, so a
    random augmentation does not advance the caller's generator - and the class count from
    ``num_classes``, ``classes``, ``targets`` or a ``TensorDataset``'s label tensor, falling back to
    reading every label (``max + 1``).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("dataset is empty; cannot infer its input shape")
    shape = getattr(dataset, "input_shape", None)
    if shape is None:
        with torch.random.fork_rng(devices=[]):
            x = dataset[0][0]
        shape = tuple(torch.as_tensor(x).shape)
    return DatasetInfo(tuple(int(s) for s in shape), _num_classes(dataset), n)
