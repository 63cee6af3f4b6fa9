"""Re-opening an archive for writing after its writer was killed.

A writer in SWMR mode sets "file consistency flags" in the HDF5 superblock and clears them on
close. A killed writer leaves them set: readers (SWMR mode) still open the file, but HDF5
refuses to open it for writing again ("may use h5clear"). h5clear is not shipped with h5py, so
this module does what ``h5clear -s`` does: zero the flags byte of the version-2/3 superblock and
recompute the superblock's Jenkins lookup3 checksum. It only does so when no process holds the
file's lock, i.e. when the writer is really gone.
"""
from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["clear_write_flags", "lookup3", "check_not_truncated"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum HDF5 puts on its metadata."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    i = 0
    while length - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK  # noqa: E702
        i += 12
    tail = data[i:] + b"\x00" * (12 - (length - i))
    if length - i == 0:
        return c
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK  # noqa: E702
    return c


def _writer_alive(path: str) -> bool:
    """True if another process holds the file's lock (HDF5 takes flock on open)."""
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def clear_write_flags(path: str | os.PathLike) -> bool:
    """Clear the consistency flags a killed writer left; return True if there were any.

    Raises RuntimeError if a live process still holds the file, and ValueError if the file's
    superblock is not the version-2/3 kind sgdwalk writes.
    """
    path = os.fspath(path)
    with open(path, "r+b") as fh:
        head = fh.read(48)
        if head[:8] != _SIGNATURE:
            raise ValueError(f"{path}: no HDF5 superblock at offset 0")
        version, size_offsets = head[8], head[9]
        if version not in (2, 3):
            raise ValueError(f"{path}: superblock version {version}; only versions 2 and 3 carry write flags")
        if head[11] == 0:
            return False
        if _writer_alive(path):
            raise RuntimeError(f"{path} is still open for writing by another process")
        end = 12 + 4 * size_offsets
        fh.seek(0)
        block = bytearray(fh.read(end + 4))
        stored = struct.unpack("<I", block[end : end + 4])[0]
        if lookup3(bytes(block[:end])) != stored:
            raise ValueError(f"{path}: superblock checksum mismatch; the file is damaged")
        block[11] = 0
        block[end : end + 4] = struct.pack("<I", lookup3(bytes(block[:end])))
        fh.seek(0)
        fh.write(bytes(block))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def check_not_truncated(path: str | os.PathLike) -> str | None:
    """Return a reason if the file is shorter than its superblock's end-of-file address, else None.

    HDF5 in SWMR-read mode skips its own truncation check (the file may be growing) and then
    retries unreadable metadata for a long time, so readers check first. A live SWMR writer only
    publishes a superblock after the data it covers is written, so a file shorter than the
    stored end-of-file address is truncated, never merely still being written.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 8 or head[:8] != _SIGNATURE:
        return None  # not an HDF5 superblock at offset 0: h5py reports it quickly itself
    if head[8] not in (2, 3):
        return None
    size_offsets = head[9]
    if size_offsets != 8 or len(head) < 12 + 4 * 8:
        return "superblock is cut short"
    base, _ext, eof = struct.unpack("<3Q", head[12:36])
    if base + eof > size:
        return f"file has {size} bytes but its superblock says {base + eof}"
    return None
