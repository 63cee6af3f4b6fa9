"""Names and version of the archive format (v1). docs/format.md documents every field.

Kept in one module so the writer, the reader and the docs cannot drift apart.
"""
from __future__ import annotations

import numpy as np

FORMAT_NAME = "sgdwalk-trajectory"
FORMAT_VERSION = 1

# Row datasets (n_records, n_values); their names come from layout.ROW_DATASETS.
LAYOUT = "layout"
STEPS = "steps"  # (n_records,) int64: optimizer steps taken before the record's state
RECORD_TIME = "record_time"  # (n_records,) float64: wall-clock seconds since the epoch at record()
NONFINITE = "nonfinite"  # (n_records,) int64: number of NaN/Inf values in the record's rows
BATCHES = "batches"  # group: minibatch indices of each recorded update, ragged
BATCH_STEP = "batches/step"  # (n_batches,) int64: the update leaves the state of this step
BATCH_END = "batches/end"  # (n_batches,) int64: exclusive end of its indices in batches/indices
BATCH_INDICES = "batches/indices"  # (total,) int64: sample indices into the training split
SCALARS = "scalars"  # (n_scalars,) compound (step, name, value): trainer-supplied numbers

SCALAR_NAME_BYTES = 64
SCALAR_DTYPE = np.dtype([("step", "<i8"), ("name", f"S{SCALAR_NAME_BYTES}"), ("value", "<f8")])

#: Dtype of each 1-D bookkeeping dataset; readers refuse any other.
BOOKKEEPING_DTYPES = {
    STEPS: np.dtype("<i8"),
    RECORD_TIME: np.dtype("<f8"),
    NONFINITE: np.dtype("<i8"),
    BATCH_STEP: np.dtype("<i8"),
    BATCH_END: np.dtype("<i8"),
    BATCH_INDICES: np.dtype("<i8"),
    SCALARS: SCALAR_DTYPE,
}

#: Sanity bounds checked before anything is allocated from declared sizes (far above any real model).
MAX_LAYOUT_ENTRIES = 1_000_000
MAX_ROW_VALUES = 1 << 36

#: Optimizer state (issue 14 item 5), optional: datasets ``optimizer/<key>`` shaped like ``params`` and
#: ``optimizer/state_step`` (n_records,) float64, listed by the root attribute ``optimizer_state`` (JSON list of keys).
#: Readers that ignore unknown datasets read such archives unchanged, so the format version stays 1.
OPTIMIZER_GROUP = "optimizer"
OPTIMIZER_STATE_ATTR = "optimizer_state"
OPTIMIZER_STEP = "optimizer/state_step"
#: The per-parameter state keys sgdwalk records: SGD's momentum buffer and Adam/AdamW's moments.
OPTIMIZER_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def optimizer_dataset(key: str) -> str:
    """Name of the row dataset holding optimizer-state ``key`` (e.g. ``optimizer/exp_avg``)."""
    return f"{OPTIMIZER_GROUP}/{key}"


#: Root attribute holding a random UUID (RFC 4122 text) written when the archive is created: the run's identity.
ARCHIVE_UUID = "archive_uuid"

REQUIRED_DATASETS = (LAYOUT, "params", STEPS, RECORD_TIME, NONFINITE, BATCH_STEP, BATCH_END, BATCH_INDICES, SCALARS)

# Target size of one compressed-chunk's worth of raw rows.
CHUNK_TARGET_BYTES = 4 << 20
MAX_CHUNK_ROWS = 64
MIN_CHUNK_ROWS = 8  # enough rows per chunk for the XOR transform to pay for the whole first row
META_CHUNK = 4096  # elements per chunk of the 1-D bookkeeping datasets


def chunk_shape(n_values: int, itemsize: int, chunk_rows: int | None = None) -> tuple[int, int]:
    """Chunk (rows, columns) for a row dataset: about CHUNK_TARGET_BYTES of raw rows.

    Small rows get many rows per chunk; rows larger than the target are split into column
    blocks so a chunk stays near 4 MiB while still spanning MIN_CHUNK_ROWS records.
    """
    row_bytes = max(1, n_values * itemsize)
    if chunk_rows is None:
        chunk_rows = int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_TARGET_BYTES // row_bytes)))
    cols = n_values
    if chunk_rows * row_bytes > 2 * CHUNK_TARGET_BYTES:
        cols = max(1, CHUNK_TARGET_BYTES // (chunk_rows * itemsize))
    return int(chunk_rows), int(max(1, min(cols, n_values)))
