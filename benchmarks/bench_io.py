"""Archive I/O of a >= 10M-parameter model (issue 10 part 4): read speed, file size against the data held, checksum cost.

Records zoo ``resnet18`` (11.2 M parameters, 45 MB per record) trained with real SGD steps on tiny synthetic
3x32x32 batches, under schedules ``every`` and ``every:10`` with the recorder's default 10-second flush, then
measures in this one process, one core (``BLOSC_NTHREADS=1``, one torch thread):

Read figures are in CPU time of this single-threaded process (decoding is CPU work; the goal is per core, and
time-slicing by other processes on a shared machine then does not count; the archives sit in the page cache).

* sequential ``pairs()`` sweep: MB/s of parameter rows delivered, old read path (``cache_bytes=0``: every row read
  decompresses its chunk again) vs the new one (whole chunk row-blocks decoded once, kept in an LRU);
* random ``params(i)``: seconds per call over a fixed random order, old vs new (ratio printed);
* file size: bytes on disk vs bytes of stored (compressed) data and vs the raw rows; ``dead`` is the share of
  the file that is neither (what periodic flushes leak in SWMR mode before the close-time compaction);
* write cost of the Fletcher32 checksums on the default codec: the same encoded chunks written with and
  without ``fletcher32`` (median of interleaved repeats).

Usage: ``python benchmarks/bench_io.py [--steps-every 24] [--steps-every10 60] [--tmp DIR]``. About 3-4 min on 2
cores; temporary archives are removed at exit. Figures go to docs/performance.md (measured on a quiet machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("BLOSC_NTHREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py  # noqa: E402
import hdf5plugin  # noqa: E402,F401
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trajectory import Recorder, Trajectory  # noqa: E402
from trajectory.archive.codecs import DEFAULT_CODEC, get_codec  # noqa: E402
from trajectory.archive.compact import storage_bytes  # noqa: E402
from trajectory.zoo import resnet18  # noqa: E402


def record(path: str, schedule: str, steps: int, seed: int = 0, codec: str = DEFAULT_CODEC) -> dict:
    """Train resnet18 for ``steps`` SGD steps on random 3x32x32 batches of 4, recording under ``schedule``."""
    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with Recorder(path, model, optimizer=opt, schedule=schedule, codec=codec) as rec:
        for s in range(steps):
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(batch_indices=list(range(4 * s, 4 * s + 4)), loss=loss)
    return {"seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}


def sizes(path: str) -> dict:
    with Trajectory(path) as t:
        n = len(t)
        row_bytes = sum(t.file[d].shape[1] * np.dtype(t.file[d].attrs["logical_dtype"]).itemsize for d in ("params", "buffers", "buffers_int") if d in t.file)
    size = os.path.getsize(path)
    stored = storage_bytes(path)
    return {"records": n, "file": size, "stored": stored, "raw": n * row_bytes, "dead": (size - stored) / size}


def sequential(path: str, cache_bytes: int) -> float:
    """MB/s of parameter rows delivered by a full pairs() sweep (both rows of each pair count once)."""
    with Trajectory(path, cache_bytes=cache_bytes) as t:
        row = t.n_params * 4
        t0 = time.process_time()
        n = 0
        for _ in t.pairs():
            n += 1
        dt = time.process_time() - t0
    return (n + 1) * row / dt / 1e6


def random_reads(path: str, cache_bytes: int, count: int, seed: int = 0) -> float:
    """Seconds per params(i) over a fixed random order of records (a fresh reader: no warm cache)."""
    with Trajectory(path, cache_bytes=cache_bytes) as t:
        order = np.random.default_rng(seed).integers(0, len(t), size=count)
        t0 = time.process_time()
        for i in order:
            t.params(int(i))
        return (time.process_time() - t0) / count


def checksum_cost(tmp: str, n_values: int = 1_000_000, rows: int = 32, repeats: int = 9) -> tuple[float, float]:
    """Write MB/s (CPU time of this process, so other load matters less) of the same encoded chunks without and
    with Fletcher32, median of interleaved repeats; written to /dev/shm when it exists, so the disk does not enter."""
    codec = get_codec(DEFAULT_CODEC)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n_values).astype(np.float32)
    data = np.empty((rows, n_values), np.float32)
    for i in range(rows):
        x = x + 1e-3 * rng.standard_normal(n_values).astype(np.float32)
        data[i] = x
    chunk_rows = 8
    encoded = [codec.encode(data[k : k + chunk_rows]) for k in range(0, rows, chunk_rows)]
    times: dict[bool, list[float]] = {False: [], True: []}
    path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tmp, f"bench_io-ck-{os.getpid()}.h5")
    for _ in range(repeats):
        for fl in (False, True):
            with h5py.File(path, "w", libver="latest") as f:
                d = f.create_dataset("p", shape=(rows, n_values), dtype="u4", chunks=(chunk_rows, 131072), fletcher32=fl, **codec.h5_kwargs())
                t0 = time.process_time()
                for k, block in enumerate(encoded):
                    d[k * chunk_rows : (k + 1) * chunk_rows] = block
                f.flush()
                times[fl].append(time.process_time() - t0)
            os.remove(path)
    mb = rows * n_values * 4 / 1e6
    return mb / float(np.median(times[False])), mb / float(np.median(times[True]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-every", type=int, default=24, help="SGD steps of the 'every' run (one record each)")
    ap.add_argument("--steps-every10", type=int, default=60, help="SGD steps of the 'every:10' run")
    ap.add_argument("--random", type=int, default=6, help="random params(i) calls per reader")
    ap.add_argument("--tmp", default=None, help="folder for the temporary archives (default: system temp)")
    ap.add_argument("--codec", default=DEFAULT_CODEC, help="row codec of the recorded archives (default: the default codec)")
    args = ap.parse_args()
    get_codec(args.codec)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_io-", dir=args.tmp)
    try:
        print(f"torch {torch.__version__}, h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, codec {args.codec}, 1 thread; read figures in CPU time")
        rows = []
        for schedule, steps in (("every", args.steps_every), ("every:10", args.steps_every10)):
            path = os.path.join(tmp, f"resnet18-{schedule.replace(':', '')}.h5")
            rec = record(path, schedule, steps, codec=args.codec)
            sz = sizes(path)
            old_seq = sequential(path, 0)
            new_seq = sequential(path, 512 << 20)
            old_rand = random_reads(path, 0, args.random)
            new_rand = random_reads(path, 512 << 20, args.random)
            rows.append((schedule, steps, rec, sz, old_seq, new_seq, old_rand, new_rand))
            print(f"recorded {schedule}: {sz['records']} records of {rec['params'] / 1e6:.1f} M params in {rec['seconds']:.0f} s")
        print()
        print(f"{'schedule':<9} {'records':>7} {'file MB':>8} {'stored MB':>9} {'raw MB':>8} {'file/stored':>11} {'dead':>6} "
              f"{'seq old MB/s':>12} {'seq new MB/s':>12} {'ratio':>6} {'rand old s':>10} {'rand new s':>10} {'ratio':>6}")
        for schedule, steps, rec, sz, os_, ns, orr, nr in rows:
            print(f"{schedule:<9} {sz['records']:>7} {sz['file'] / 1e6:>8.1f} {sz['stored'] / 1e6:>9.1f} {sz['raw'] / 1e6:>8.1f} "
                  f"{sz['file'] / sz['stored']:>11.3f} {sz['dead']:>6.1%} {os_:>12.0f} {ns:>12.0f} {ns / os_:>5.1f}x "
                  f"{orr:>10.3f} {nr:>10.3f} {orr / nr:>5.1f}x")
        plain, fletcher = checksum_cost(tmp)
        print()
        print(f"Fletcher32 write cost on {DEFAULT_CODEC}: {plain:.0f} MB/s without, {fletcher:.0f} MB/s with "
              f"({(plain / fletcher - 1) * 100:+.1f}% time)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
