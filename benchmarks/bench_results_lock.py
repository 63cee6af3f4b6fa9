"""Stress the results file's single-writer lock: P processes acquire and release one lock as fast as they can for a
few seconds, each recording the intervals it held it; prints acquisitions, refusals and overlapping intervals.

Variants: ``old`` is sgdwalk 0.1's hand-written flock that unlinked the lock file while holding it (kept here only
as the reference the issue measured); ``results`` is ResultsFile's lock today (filelock, non-blocking, as
``analyze`` takes it); ``filelock-wait`` is the same library waiting for the lock (most contention).

    python benchmarks/bench_results_lock.py [--processes 4] [--seconds 2]
"""
from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import tempfile
import time


def _old_acquire(path: str, wait: bool) -> int | None:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _old_release(path: str, fd: int) -> None:
    try:
        os.unlink(path + ".lock")  # the bug: unlink while held
    except OSError:
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _hold() -> None:
    """Hold the lock a few microseconds, as a writer does some work while holding it (room for an overlap)."""
    for _ in range(200):
        pass


def _worker(variant: str, path: str, out: str, start_at: float, seconds: float) -> None:
    import filelock

    from trajectory.analysis.errors import ResultsLockedError
    from trajectory.analysis.results import acquire_results_lock

    held: list[tuple[int, int]] = []
    refused = 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if variant.startswith("old"):
            fd = _old_acquire(path, wait=variant == "old-wait")
            if fd is None:
                refused += 1
                continue
            t0 = time.monotonic_ns()
            _hold()
            t1 = time.monotonic_ns()
            _old_release(path, fd)
        elif variant == "results":
            try:
                lock = acquire_results_lock(path)
            except ResultsLockedError:
                refused += 1
                continue
            t0 = time.monotonic_ns()
            _hold()
            t1 = time.monotonic_ns()
            lock.release()
        else:
            lock = filelock.FileLock(path + ".lock", thread_local=False)
            lock.acquire()
            t0 = time.monotonic_ns()
            _hold()
            t1 = time.monotonic_ns()
            lock.release()
        held.append((t0, t1))
    with open(out, "w") as fh:
        json.dump({"held": held, "refused": refused}, fh)


def overlaps(intervals: list[tuple[int, int]]) -> int:
    n, end = 0, -1
    for a, b in sorted(intervals):
        if a < end:
            n += 1
        end = max(end, b)
    return n


def run(variant: str, processes: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.results.h5")
        ctx = mp.get_context("fork")
        start_at = time.time() + 0.5
        outs = [os.path.join(d, f"{i}.json") for i in range(processes)]
        procs = [ctx.Process(target=_worker, args=(variant, path, o, start_at, seconds)) for o in outs]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        res = [json.load(open(o)) for o in outs]
    held = [tuple(iv) for r in res for iv in r["held"]]
    return {"variant": variant, "processes": processes, "acquisitions": len(held),
            "refused": sum(r["refused"] for r in res), "overlapping": overlaps(held)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    rows = [run(v, args.processes, args.seconds) for v in ("old", "old-wait", "results", "filelock-wait")]
    print(f"{'variant':<14} {'procs':>5} {'acquisitions':>12} {'refused':>9} {'overlapping':>11}")
    for r in rows:
        print(f"{r['variant']:<14} {r['processes']:>5} {r['acquisitions']:>12} {r['refused']:>9} {r['overlapping']:>11}")


if __name__ == "__main__":
    main()
