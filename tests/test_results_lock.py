"""The results file's single-writer lock under contention: several processes open and close the same results
file as fast as they can, each recording the interval during which it held the lock; no two intervals may overlap.

The old lock deleted the lock file while holding it; with 4 processes most acquisitions then overlapped another
holder (a waiter locks the unlinked inode while a newcomer creates and locks a new file at the same path).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest

from trajectory.analysis import ResultsFile, ResultsLockedError

PROCESSES = 4
SECONDS = 1.5  # each worker stops after this long (or MAX_ACQUISITIONS); bounds the test, not asserted
MAX_ACQUISITIONS = 3000
ARCHIVE_ID = "uuid:00000000-0000-4000-8000-000000000000"


def _worker(path: str, out: str, start_at: float) -> None:
    """Acquire/release the lock of ``path`` in a loop; write the held intervals (monotonic ns) to ``out``."""
    intervals: list[tuple[int, int]] = []
    refused = 0
    while time.time() < start_at:  # start together so that the workers really contend
        time.sleep(0.001)
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline and len(intervals) < MAX_ACQUISITIONS:
        try:
            store = ResultsFile(path, "a", archive_id=ARCHIVE_ID)
        except ResultsLockedError:
            refused += 1
            continue
        t0 = time.monotonic_ns()
        for _ in range(50):  # hold it a little while, so that an overlap would have room to happen
            pass
        t1 = time.monotonic_ns()
        store.close()
        intervals.append((t0, t1))
    with open(out, "w") as fh:
        json.dump({"intervals": intervals, "refused": refused}, fh)


def _overlaps(intervals: list[tuple[int, int]]) -> int:
    """Number of intervals that start before an earlier-starting interval ended."""
    n, end = 0, -1
    for a, b in sorted(intervals):
        if a < end:
            n += 1
        end = max(end, b)
    return n


def test_overlap_counter_sees_overlaps():
    assert _overlaps([(0, 10), (5, 6), (10, 20)]) == 1
    assert _overlaps([(0, 10), (10, 20), (21, 22)]) == 0


@pytest.mark.slow
def test_lock_stress_no_overlapping_holders(tmp_path):
    path = str(tmp_path / "run.results.h5")
    ctx = mp.get_context("fork")  # fork: the workers start in milliseconds, without re-importing torch
    start_at = time.time() + 0.5
    outs = [str(tmp_path / f"w{i}.json") for i in range(PROCESSES)]
    procs = [ctx.Process(target=_worker, args=(path, out, start_at)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    results = [json.load(open(out)) for out in outs]
    intervals = [tuple(iv) for r in results for iv in r["intervals"]]
    refused = sum(r["refused"] for r in results)
    per_worker = [len(r["intervals"]) for r in results]
    print(f"{len(intervals)} acquisitions {per_worker}, {refused} refused, {_overlaps(intervals)} overlapping")
    assert all(n > 0 for n in per_worker), per_worker
    assert refused > 0, "the workers never contended; the test proves nothing"
    assert _overlaps(intervals) == 0
    assert os.path.exists(path + ".lock")  # never unlinked (that was the bug)


def test_second_writer_in_same_process_is_locked_out(tmp_path):
    path = str(tmp_path / "r.h5")
    first = ResultsFile(path, "a", archive_id=ARCHIVE_ID)
    try:
        with pytest.raises(ResultsLockedError, match="being written by another sgdwalk analyze"):
            ResultsFile(path, "a", archive_id=ARCHIVE_ID)
    finally:
        first.close()
    ResultsFile(path, "a", archive_id=ARCHIVE_ID).close()  # released: a third writer gets it
