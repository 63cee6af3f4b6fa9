"""Which archive a results file belongs to (its *run identity*), and the rule for results files of older releases.

Why it matters: ``analyze`` reuses every row a results file already holds. A results file of another run must
therefore never pass for this archive's - the old identity (layout, first parameters, first step, ``created``)
let two ``sgdwalk train`` runs with the same seed started in the same second share one id, and the second run's
analysis silently reused the first's rows.

* An archive with an ``archive_uuid`` root attribute (random, written when the archive is created) is identified
  by it: ``archive_id = "uuid:<uuid>"``. It stays the same while a live archive grows.
* An archive without one (written before UUIDs) is identified by ``"sha256:<hex>"`` over the layout table, every
  recorded step, the first AND the last record's parameters and ``created``. Two runs that differ anywhere in
  their last state differ here; the price is that the id changes when such an archive grows.
* Results files written before this change hold the *legacy* id (bare 64-hex sha256 of layout, first params,
  first step, ``created``). :func:`legacy_acceptable` states when one is still taken as this archive's (see
  docs/results.md, "Archive identity").
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Mapping

import numpy as np

from ..errors import ArchiveFormatError
from ..textsafe import safe

__all__ = ["ArchiveIdentity", "archive_identity", "legacy_identity", "is_legacy_id", "legacy_acceptable", "UUID_ATTR"]

#: Root attribute of the archive holding its random UUID.
UUID_ATTR = "archive_uuid"

_LEGACY_RE = re.compile(r"[0-9a-f]{64}")


class ArchiveIdentity(str):
    """The archive id (a ``str``, stored in results files as ``archive_id``) plus what the results file checks
    its rows against: the record count and steps of the archive as opened, and the legacy id of a UUID-less
    archive. A plain ``str`` works wherever an id is expected; only the extra checks need this class."""

    kind: str  # "uuid" | "hash"
    records: int
    steps: np.ndarray
    legacy: str | None

    def __new__(cls, value: str, *, kind: str, records: int, steps: np.ndarray, legacy: str | None) -> "ArchiveIdentity":
        obj = super().__new__(cls, value)
        obj.kind = kind
        obj.records = int(records)
        obj.steps = np.asarray(steps, dtype=np.int64)
        obj.legacy = legacy
        return obj

    def __reduce__(self):  # picklable for multiprocessing / torch.distributed object collectives
        return (_rebuild, (str(self), self.kind, self.records, self.steps, self.legacy))


def _rebuild(value: str, kind: str, records: int, steps: np.ndarray, legacy: str | None) -> ArchiveIdentity:
    return ArchiveIdentity(value, kind=kind, records=records, steps=steps, legacy=legacy)


def _created_bytes(traj: Any) -> bytes:
    created = traj.file.attrs.get("created", "")
    return created.encode() if isinstance(created, str) else bytes(created)


def legacy_identity(traj: Any) -> str:
    """The identity of sgdwalk 0.1's results files: sha256(layout ‖ params of record 0 ‖ first step ‖ created).

    Kept only to recognise results files written by that release; it collides for same-second, same-seed runs."""
    h = hashlib.sha256()
    h.update(traj.file["layout"][()].tobytes())
    h.update(traj.params(0).numpy().tobytes())
    h.update(str(int(traj.steps[0])).encode())
    h.update(_created_bytes(traj))
    return h.hexdigest()


def _uuid_of(traj: Any) -> str | None:
    raw = traj.file.attrs.get(UUID_ATTR)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return str(uuid.UUID(str(raw)))
    except (ValueError, TypeError, AttributeError):
        raise ArchiveFormatError(f"{traj.path}: attribute {UUID_ATTR} {safe(raw, 80)} is not a UUID; the file is damaged") from None


def _content_hash(traj: Any) -> str:
    n = len(traj)
    h = hashlib.sha256(b"sgdwalk-archive-identity-v2\0")
    h.update(np.ascontiguousarray(traj.file["layout"][()]).tobytes())
    h.update(str(n).encode() + b"\0")
    h.update(np.ascontiguousarray(traj.steps, dtype=np.int64).tobytes())
    h.update(traj.params(0).numpy().tobytes())
    h.update(traj.params(n - 1).numpy().tobytes())
    h.update(_created_bytes(traj))
    return h.hexdigest()


def archive_identity(traj: Any) -> ArchiveIdentity:
    """The run identity of an open :class:`~trajectory.archive.reader.Trajectory` (see the module docstring)."""
    n = len(traj)
    if n < 1:
        raise ArchiveFormatError(f"{traj.path} holds no records; nothing identifies it")
    uid = _uuid_of(traj)
    if uid is not None:
        return ArchiveIdentity(f"uuid:{uid}", kind="uuid", records=n, steps=traj.steps, legacy=None)
    return ArchiveIdentity(f"sha256:{_content_hash(traj)}", kind="hash", records=n, steps=traj.steps, legacy=legacy_identity(traj))


def is_legacy_id(value: object) -> bool:
    """True for an ``archive_id`` written by sgdwalk 0.1 (a bare sha256 hex digest, no ``uuid:``/``sha256:`` prefix)."""
    return isinstance(value, str) and _LEGACY_RE.fullmatch(value) is not None


def legacy_acceptable(stored: Mapping[str, Any], ident: ArchiveIdentity, provenance: str | None) -> str | None:
    """Whether a results file holding a legacy id may be taken as this archive's. Returns None when it may,
    else the reason it may not (one line). The row checks (pair indices and steps agree with the archive) are
    done for every results file by the caller.

    The rule: the archive has no UUID (an archive with one was never analysed by 0.1 under this id), the legacy
    hash matches, the archive still has exactly the number of records the file recorded (``archive_records``),
    and the file's ``archive_provenance`` (hyperparameters, argv, seed, ...) equals the archive's. The legacy
    hash alone collides for two same-seed runs started in the same second; they differ in provenance (their lr
    or other arguments) or else they are the same deterministic run."""
    if ident.kind != "hash" or ident.legacy is None:
        return "the archive has a UUID, the file a pre-UUID id"
    if stored.get("archive_id") != ident.legacy:
        return "the legacy ids differ"
    try:
        records = int(stored.get("archive_records", -1))
    except (TypeError, ValueError):
        records = -1
    if records != ident.records:
        return f"the file was written for {records} records, the archive has {ident.records}"
    theirs = stored.get("archive_provenance")
    if not isinstance(theirs, str) or provenance is None:
        return "the file records no provenance to compare"
    try:
        same = json.loads(theirs) == json.loads(provenance)
    except (ValueError, RecursionError):
        same = False
    if not same:
        return "the file's archive provenance differs from the archive's (another run started in the same second?)"
    return None
