"""MNIST-1D on-disk cache: same arrays as generation, keyed by arguments, corrupt or foreign files regenerated."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trajectory.zoo import data


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SGDWALK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SGDWALK_NO_CACHE", raising=False)
    data._mnist1d_arrays.cache_clear()
    yield tmp_path / "cache"
    data._mnist1d_arrays.cache_clear()


def _reference(n: int = 200, seed: int = 3) -> tuple[np.ndarray, ...]:
    return data._generate_mnist1d(n, 0.8, seed)


def _same(tensors: tuple[torch.Tensor, ...], arrays: tuple[np.ndarray, ...]) -> bool:
    return all(np.array_equal(t.numpy(), a) and t.numpy().dtype == a.dtype for t, a in zip(tensors, arrays))


def test_cache_is_written_and_read_back_identically(cache: Path) -> None:
    ref = _reference()
    first = data._mnist1d_arrays(200, 0.8, 3)
    files = list(cache.glob("mnist1d-*.npz"))
    assert len(files) == 1 and _same(first, ref)
    data._mnist1d_arrays.cache_clear()
    stamp = files[0].stat().st_mtime_ns
    again = data._mnist1d_arrays(200, 0.8, 3)
    assert _same(again, ref) and files[0].stat().st_mtime_ns == stamp  # read, not regenerated
    data._mnist1d_arrays(200, 0.8, 4)  # other arguments: another file
    assert len(list(cache.glob("mnist1d-*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip", "foreign"])
def test_damaged_or_foreign_cache_file_is_regenerated(cache: Path, damage: str) -> None:
    ref = _reference()
    data._mnist1d_arrays(200, 0.8, 3)
    (path,) = cache.glob("mnist1d-*.npz")
    raw = bytearray(path.read_bytes())
    if damage == "garbage":
        path.write_bytes(b"not a cache file")
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip":  # flip a byte inside the stored x array (npz members are stored uncompressed)
        with np.load(path) as z:
            x = z["x"]
        needle = x.tobytes()[:64]
        pos = bytes(raw).index(needle) + 40
        raw[pos] ^= 0x40
        path.write_bytes(bytes(raw))
    else:  # a well-formed file of other arguments placed under this key's name
        other = data._generate_mnist1d(200, 0.8, 9)
        data._cache_store(path, data._mnist1d_key(200, 0.8, 9), other)
    data._mnist1d_arrays.cache_clear()
    assert _same(data._mnist1d_arrays(200, 0.8, 3), ref)
    assert data._cache_load(path, data._mnist1d_key(200, 0.8, 3)) is not None  # rewritten intact


def test_cache_can_be_disabled(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGDWALK_NO_CACHE", "1")
    assert data.cache_dir() is None
    assert _same(data._mnist1d_arrays(200, 0.8, 3), _reference())
    assert not cache.exists()
