"""Opening untrusted HDF5 files without hanging, following links out of the file, or trusting the superblock.

Why this module exists (issue 12): a fault campaign on damaged archives found that one flipped byte in HDF5
metadata hung every command for 25+ minutes, because archives were always opened in SWMR-read mode, where HDF5
retries a metadata read whose checksum fails 100 times with exponential back-off. A FIFO given as the archive
hung as well, and external links / external raw storage / virtual datasets let an archive make sgdwalk read
other files (``info`` printed lines of the password file). The rules here:

* only regular files are opened (a FIFO, socket, device or directory is refused before any read);
* the version-2/3 superblock is checked first (signature, Jenkins checksum, end-of-file address against the
  file's size), so a damaged or truncated superblock is one line, not a retry loop;
* a file whose superblock carries no write flags is complete (its writer closed it): it is opened *without*
  SWMR, where a bad metadata checksum fails at once;
* only a file with write flags set (a live SWMR writer, or one that was killed) is opened in SWMR-read mode,
  and then with a bounded number of metadata read attempts (a few hundred ms at most instead of "forever");
* :func:`refuse_foreign_storage` walks the groups and datasets sgdwalk will touch and refuses soft/external
  links, external raw storage and virtual datasets before anything reads through them.
"""
from __future__ import annotations

import ctypes
import glob
import os
import stat
import struct
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/zstd HDF5 filters the datasets use)

from ..errors import ArchiveError, ArchiveFormatError
from .recovery import lookup3

__all__ = ["SuperblockInfo", "check_regular_file", "read_superblock", "open_h5_readonly", "refuse_foreign_storage",
           "h5_error_line"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Metadata read attempts in SWMR-read mode. HDF5's default (100) backs off exponentially and, on a damaged
#: file, retries for hours; 26 attempts bound the wait for one damaged item to about 0.1 s while still riding
#: out the short torn reads a live writer can cause.
SWMR_READ_ATTEMPTS = 26


class SuperblockInfo:
    """What the first bytes of the file say: superblock version and whether a writer left it open."""

    def __init__(self, version: int, write_flags: int):
        self.version = version
        self.write_flags = write_flags

    @property
    def open_for_write(self) -> bool:
        """True while a (SWMR) writer has the file open, or after one was killed before closing it."""
        return self.write_flags != 0


def h5_error_line(err: BaseException) -> str:
    """First meaningful line of an h5py/HDF5 error, without its stack of HDF5-internal frames."""
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def check_regular_file(path: str) -> None:
    """Refuse anything but an existing regular file at once (a FIFO would block the first read forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ArchiveError(f"no such archive: {path}") from None
    except OSError as err:
        raise ArchiveError(f"cannot open {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ArchiveError(f"{path} is a directory, not an archive file")
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path} is not a regular file (a FIFO, socket or device); give the archive file itself")


def read_superblock(path: str) -> SuperblockInfo | None:
    """Check the superblock sgdwalk writes (version 2/3); None for other versions, which HDF5 checks itself.

    Raises :class:`ArchiveFormatError` (one line) for a foreign/empty file, a superblock whose checksum does
    not match, or a file shorter than the end-of-file address its superblock records (truncated).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 8 or head[:8] != _SIGNATURE:
        what = "empty" if size == 0 else "not an HDF5 file"
        raise ArchiveFormatError(f"{path} is not a readable HDF5 file ({what}); re-record or restore it")
    version = head[8]
    if version not in (2, 3):
        return None
    size_offsets = head[9]
    end = 12 + 4 * size_offsets
    if size_offsets != 8 or len(head) < end + 4:
        raise ArchiveFormatError(f"{path} is truncated (superblock is cut short); re-record it or restore a complete copy")
    stored = struct.unpack("<I", head[end : end + 4])[0]
    if lookup3(head[:end]) != stored:
        raise ArchiveFormatError(f"{path} is damaged (superblock checksum mismatch); restore a complete copy")
    base, _ext, eof = struct.unpack("<3Q", head[12:36])
    # A writer that was killed or hit a full disk can leave the end-of-file address a little past the bytes
    # that reached the disk; its flushed records are still readable (SWMR reads are bounded, see above).
    # A complete file (no write flags) must be as long as its superblock says.
    if base + eof > size and head[11] == 0:
        raise ArchiveFormatError(
            f"{path} is truncated (file has {size} bytes but its superblock says {base + eof}); "
            "re-record it or restore a complete copy"
        )
    return SuperblockInfo(version, head[11])


_SET_READ_ATTEMPTS: Any = None


def _read_attempts_setter() -> Any:
    """``H5Pset_metadata_read_attempts`` from the libhdf5 h5py is linked against (h5py does not wrap it), or None."""
    global _SET_READ_ATTEMPTS
    if _SET_READ_ATTEMPTS is not None:
        return _SET_READ_ATTEMPTS or None
    func = False
    candidates = []
    here = os.path.dirname(h5py.__file__)
    candidates += glob.glob(os.path.join(here, "..", "h5py.libs", "libhdf5-*.so*"))  # manylinux wheels
    candidates += glob.glob(os.path.join(here, ".dylibs", "libhdf5*.dylib"))  # macOS wheels
    try:
        with open("/proc/self/maps") as fh:  # whatever libhdf5 is already loaded (conda, system builds)
            candidates += sorted({line.split()[-1] for line in fh if "libhdf5" in line and "hl" not in line.split("/")[-1]})
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            f = lib.H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        f.argtypes = [ctypes.c_int64, ctypes.c_uint]
        f.restype = ctypes.c_int
        func = f
        break
    _SET_READ_ATTEMPTS = func
    return func or None


def _open_swmr(path: str, locking: bool | None) -> h5py.File:
    setter = _read_attempts_setter()
    try:  # h5py's own file-access list (same close degree as the writer's, if it lives in this process)
        from h5py._hl.files import make_fapl

        fapl = make_fapl(None, libver="latest", locking=locking)
    except Exception:  # pragma: no cover - private helper changed: fall back to h5py's default retries
        setter = None
    if setter is None:  # unknown libhdf5 build: HDF5's default retries (may be slow on damaged metadata)
        return h5py.File(path, "r", libver="latest", swmr=True, **({} if locking is None else {"locking": locking}))
    setter(fapl.id, SWMR_READ_ATTEMPTS)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def open_h5_readonly(path: str, *, locking: bool | None = None, rdcc_nbytes: int | None = None) -> h5py.File:
    """Open a (possibly damaged, possibly live) archive for reading by the rules in the module docstring.

    Raises :class:`ArchiveError`/:class:`ArchiveFormatError` with one line; never blocks on a FIFO and never
    retries damaged metadata for long.
    """
    check_regular_file(path)
    sb = read_superblock(path)
    swmr = sb is not None and sb.open_for_write
    try:
        if swmr:
            return _open_swmr(path, locking)
        kw: dict[str, Any] = {} if locking is None else {"locking": locking}
        if rdcc_nbytes is not None:
            kw["rdcc_nbytes"] = rdcc_nbytes
        return h5py.File(path, "r", libver="latest", **kw)
    except OSError as err:
        msg = h5_error_line(err)
        if "signature" in msg or "superblock" in msg or "truncated" in msg or "EOF" in msg:
            raise ArchiveFormatError(
                f"{path} is not a readable HDF5 file (truncated or foreign: {msg}); re-record or restore it"
            ) from None
        if "lock" in msg.lower():
            raise ArchiveError(
                f"{path} is locked by a writer that has not flushed yet ({msg}); wait for its first flush or pass locking=False"
            ) from None
        raise ArchiveFormatError(f"cannot open {path} as an archive: {msg}") from None


def refuse_foreign_storage(f: h5py.File, path: str) -> None:
    """Refuse links and storage that point outside the file, before anything is read through them.

    Every link in the root group and in each group below it must be a hard link, and no dataset may use
    external raw storage or be virtual: sgdwalk archives never contain either, and following them would let
    a file make sgdwalk read (and print) other files.
    """
    pending = [("/", f)]
    seen = 0
    while pending:
        gpath, group = pending.pop()
        for name in group.keys():
            seen += 1
            if seen > 10_000:
                raise ArchiveFormatError(f"{path} holds more than 10000 objects; it is not an sgdwalk archive")
            link = group.get(name, getlink=True)
            full = f"{gpath.rstrip('/')}/{name}"
            if isinstance(link, h5py.ExternalLink):
                raise ArchiveFormatError(f"{path}: '{full}' is an external link to another file; refusing to follow it")
            if isinstance(link, h5py.SoftLink):
                raise ArchiveFormatError(f"{path}: '{full}' is a soft link; sgdwalk archives contain none, refusing it")
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                pending.append((full, obj))
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    raise ArchiveFormatError(f"{path}: dataset '{full}' is a virtual dataset; refusing to read other files")
                if obj.external:
                    raise ArchiveFormatError(f"{path}: dataset '{full}' uses external raw storage; refusing to read other files")
