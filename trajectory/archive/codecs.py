"""Codecs: how a block of rows becomes bytes on disk, and back.

A codec is two independent stages:

1. an optional *row transform* that sgdwalk applies before handing whole chunks to HDF5:
   ``xor`` replaces every row of a chunk but the first with the bitwise XOR of its float bits and
   the previous row's. Consecutive SGD iterates share sign, exponent and high mantissa bits, so
   the XOR-ed rows are mostly zero bits, which the next stage squeezes well. The first row of
   every chunk is kept whole so each chunk decodes on its own (random access stays cheap).
   Lossy ``bf16``/``fp16`` storage is the other transform; it is recorded in the file.
2. an HDF5 *filter* from hdf5plugin (Blosc/Blosc2 with byte- or bit-shuffle, LZ4 or zstd), so a
   plain ``h5py`` + ``hdf5plugin`` reader can decompress every chunk.

Codec names are ``"<transform>-<filter>[-l<level>]"`` such as ``"xor-blosc2-zstd-byte-l1"``; :data:`DEFAULT_CODEC`
is the lossless scheme chosen by ``benchmarks/bench_codecs.py`` on real trajectories (see
docs/performance.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Codec", "get_codec", "CODECS", "DEFAULT_CODEC", "xor_encode", "xor_decode", "bits_to_values"]

# Unsigned integer view of each float width: XOR works on the raw bits.
_UINT_OF = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _filter_kwargs(name: str, level: int | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for one hdf5plugin filter name."""
    import hdf5plugin

    if name == "none":
        return {}
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=level or 3))
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": level or 4, "shuffle": True}
    parts = name.split("-")  # blosc-<cname>-<shuffle> or blosc2-<cname>-<shuffle>
    if parts[0] in ("blosc", "blosc2") and len(parts) == 3:
        family, cname, shuf = parts
        if family == "blosc":
            shuffle = {"byte": hdf5plugin.Blosc.SHUFFLE, "bit": hdf5plugin.Blosc.BITSHUFFLE, "no": hdf5plugin.Blosc.NOSHUFFLE}[shuf]
            return dict(hdf5plugin.Blosc(cname=cname, clevel=level or 5, shuffle=shuffle))
        filters = {"byte": hdf5plugin.Blosc2.SHUFFLE, "bit": hdf5plugin.Blosc2.BITSHUFFLE, "no": hdf5plugin.Blosc2.NOFILTER}[shuf]
        return dict(hdf5plugin.Blosc2(cname=cname, clevel=level or 5, filters=filters))
    raise ValueError(f"unknown compression filter {name!r}")


@dataclass(frozen=True)
class Codec:
    """A named (transform, filter, level) triple; ``lossy`` codecs change the stored values."""

    name: str
    transform: str  # "none" | "xor" | "bf16" | "fp16" | "bf16-xor" | "fp16-xor"
    filter: str
    level: int | None = None

    @property
    def lossy(self) -> bool:
        return self.transform.startswith(("bf16", "fp16"))

    @property
    def xor(self) -> bool:
        return self.transform.endswith("xor")

    def h5_kwargs(self) -> dict[str, Any]:
        return _filter_kwargs(self.filter, self.level)

    def disk_dtype(self, logical: np.dtype) -> np.dtype:
        """On-disk dtype of a row whose values are ``logical``: raw unsigned bits when transformed."""
        logical = np.dtype(logical)
        if logical.kind != "f":
            return logical  # integer buffers: no float transform applies
        if self.transform.startswith(("bf16", "fp16")):
            return np.dtype(np.uint16)
        if self.xor:
            return np.dtype(_UINT_OF[logical.itemsize])
        return logical

    # encode/decode act on whole chunks (rows aligned to chunk boundaries) --------------------
    def encode(self, rows: np.ndarray) -> np.ndarray:
        """Rows of logical values (one chunk's worth, first row at a chunk boundary) -> disk rows."""
        if rows.dtype.kind != "f":
            return rows
        if self.transform.startswith("bf16"):
            bits = _to_bf16_bits(rows)
        elif self.transform.startswith("fp16"):
            bits = rows.astype(np.float16).view(np.uint16)
        elif self.xor:
            bits = rows.view(_UINT_OF[rows.dtype.itemsize])
        else:
            return rows
        return xor_encode(bits) if self.xor else np.ascontiguousarray(bits)

    def decode(self, rows: np.ndarray, logical: np.dtype) -> np.ndarray:
        """Inverse of :meth:`encode` for a block whose first row is a chunk's first row."""
        logical = np.dtype(logical)
        if logical.kind != "f":
            return rows
        return bits_to_values(xor_decode(rows) if self.xor else rows, self.transform, logical)


def bits_to_values(bits: np.ndarray, transform: str, logical: np.dtype) -> np.ndarray:
    """Stored bits (already un-XOR-ed) -> values of the row's logical dtype."""
    if transform.startswith("bf16"):
        return _from_bf16_bits(bits).astype(logical, copy=False)
    if transform.startswith("fp16"):
        return bits.view(np.float16).astype(logical)
    if transform == "xor":
        return bits.view(logical)
    return bits


def xor_encode(bits: np.ndarray) -> np.ndarray:
    """Row i -> bits[i] ^ bits[i-1]; row 0 unchanged. ``bits`` is an unsigned-int 2-D array."""
    out = np.empty_like(bits)
    out[:1] = bits[:1]
    np.bitwise_xor(bits[1:], bits[:-1], out=out[1:])
    return out


def xor_decode(bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`xor_encode`: a running XOR down the rows."""
    return np.bitwise_xor.accumulate(bits, axis=0)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _make_codecs() -> dict[str, Codec]:
    filters = [
        "none",
        "zstd",
        "gzip",
        "blosc-lz4-byte",
        "blosc-lz4-bit",
        "blosc-zstd-byte",
        "blosc-zstd-bit",
        "blosc2-lz4-byte",
        "blosc2-lz4-bit",
        "blosc2-zstd-byte",
        "blosc2-zstd-bit",
    ]
    out = {}
    for f in filters:
        out[f] = Codec(f, "none", f)
        if f != "none":
            out[f"xor-{f}"] = Codec(f"xor-{f}", "xor", f)
    for lossy in ("bf16", "fp16"):
        out[f"{lossy}-blosc-zstd-bit"] = Codec(f"{lossy}-blosc-zstd-bit", lossy, "blosc-zstd-bit")
        out[f"{lossy}-xor-blosc-zstd-bit"] = Codec(f"{lossy}-xor-blosc-zstd-bit", f"{lossy}-xor", "blosc-zstd-bit")
    # Level variants "<transform>-<filter>-l<level>" (the names above use the filter's default
    # level: Blosc/Blosc2 clevel 5, which for zstd inside Blosc means zstd level 9). Blosc2 +
    # byte shuffle + zstd at clevel 1 compresses XOR-ed SGD rows as well as clevel 5 at about 4x
    # the speed (benchmarks/bench_codecs.py --levels; docs/performance.md).
    out["xor-blosc2-zstd-byte-l1"] = Codec("xor-blosc2-zstd-byte-l1", "xor", "blosc2-zstd-byte", 1)
    return out


CODECS: dict[str, Codec] = _make_codecs()

#: Lossless default, picked by benchmarks/bench_codecs.py (ratio and single-core MB/s on real
#: MNIST-1D and CNN trajectories; see docs/performance.md): the only lossless codec measured at
#: >= 1.5x on every trajectory (1.51-1.78x) while writing >= 300 MB/s on one core (~500-600 MB/s).
DEFAULT_CODEC = "xor-blosc2-zstd-byte-l1"

#: Codec of the small bookkeeping datasets (steps, batch indices, scalars).
META_FILTER = "zstd"


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(sorted(CODECS))}") from None
