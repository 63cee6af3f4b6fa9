#!/usr/bin/env python
"""Codec benchmark on real SGD trajectories: compression ratio, single-core write MB/s, read cost.

Records three real trajectories into memory, then writes each through the real write path
(:class:`trajectory.archive.writer.ArchiveWriter`) with every codec in
:data:`trajectory.archive.codecs.CODECS`, and reads it back with :class:`trajectory.Trajectory`:

* ``mlp-early``: the MNIST-1D MLP 40-100-100-10, plain SGD lr 0.1, batch 64, steps 0..319;
* ``mlp-late``:  the same run continued, steps 2000..2319 (lr * grad is small next to the weights);
* ``cnn-1.5M``:  ``zoo.cnn(in_channels=3, input_dim=2, width=128)`` (1.48 M parameters) on
  CIFAR-shaped generated data (``zoo.synthetic``), plain SGD lr 0.05, batch 64, steps 0..79.

Everything runs on one core: BLOSC_NTHREADS=1 is set before hdf5plugin is imported and torch
uses one thread while measuring. Columns: ``ratio`` = raw row bytes / on-disk bytes of the
``params`` dataset; ``MB/s`` = raw MB written per second of wall time (ArchiveWriter creation,
add_record for every row, close), median of repeats; ``rand ms`` = one random pair
``Trajectory.params(i), params(i+1)``; ``seq ms`` = one pair of a ``Trajectory.pairs()`` sweep;
``exact`` = every row read back (bulk, random and sequential paths) is bit-identical.

Then the naive write path (resize by one row and write it into a compressed chunked dataset
with the default chunk cache) is timed against ArchiveWriter on the same rows.

    python benchmarks/bench_codecs.py            # full run, ~3.5 minutes on 2 cores
    python benchmarks/bench_codecs.py --quick    # smoke run, < 30 s
    python benchmarks/bench_codecs.py --levels   # also try compression-level variants
"""
from __future__ import annotations

import os

os.environ["BLOSC_NTHREADS"] = "1"  # before hdf5plugin is imported (trajectory imports it lazily)

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import h5py  # noqa: E402
import hdf5plugin  # noqa: E402,F401  (registers the filters with BLOSC_NTHREADS=1 in force)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trajectory import Trajectory  # noqa: E402
from trajectory.archive import codecs as codecs_mod  # noqa: E402
from trajectory.archive import format as fmt  # noqa: E402
from trajectory.archive.codecs import CODECS, DEFAULT_CODEC, Codec  # noqa: E402
from trajectory.archive.layout import PARAMS, Layout  # noqa: E402
from trajectory.archive.writer import ArchiveWriter  # noqa: E402

GOAL_RATIO = 1.5
GOAL_MBPS = 300.0


# ---------------------------------------------------------------------------------- models and data
from _workloads import cifar_shaped, make_cnn, make_mlp, mnist1d_train, print_table  # noqa: E402  (shared with the other benchmarks)


# ---------------------------------------------------------------------------------- trajectories
@dataclass
class Run:
    name: str
    layout: Layout
    steps: list[int]
    rows: np.ndarray  # (n_records, n_params) float32
    note: str = ""
    results: dict = field(default_factory=dict)

    @property
    def raw_mb(self) -> float:
        return self.rows.nbytes / 1e6


def sgd_rows(model, x, y, *, lr, batch, record, seed=0) -> tuple[list[int], np.ndarray]:
    """Train with plain SGD; return the flat parameter rows of the states after the steps in ``record``."""
    layout = Layout.from_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    last = max(record)
    wanted = set(record)
    steps, rows = [], np.empty((len(record), layout.sizes[PARAMS]), dtype=np.float32)
    perm, pos = torch.randperm(len(x), generator=g), 0
    for step in range(last + 1):
        if step in wanted:
            with torch.no_grad():
                rows[len(steps)] = layout.flatten(model.state_dict(), PARAMS).numpy()
            steps.append(step)
        if step == last:
            break
        if pos + batch > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps, rows


def build_runs(quick: bool) -> list[Run]:
    n_mlp = 128 if quick else 320  # records: 2 / 5 chunks of 64 rows
    n_cnn = 8 if quick else 80  # records: 1 / 10 chunks of 8 rows
    late = 2000
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # generating is not what we measure
    x, y = mnist1d_train()
    torch.manual_seed(0)
    model = make_mlp()
    record = list(range(n_mlp)) + list(range(late, late + n_mlp))
    steps, rows = sgd_rows(model, x, y, lr=0.1, batch=64, record=record)
    layout = Layout.from_module(model)
    runs = [
        Run("mlp-early", layout, steps[:n_mlp], rows[:n_mlp], f"steps 0..{n_mlp - 1}"),
        Run("mlp-late", layout, steps[n_mlp:], rows[n_mlp:], f"steps {late}..{late + n_mlp - 1}"),
    ]
    xc, yc = cifar_shaped()
    torch.manual_seed(0)
    cnn = make_cnn()
    steps, rows = sgd_rows(cnn, xc, yc, lr=0.05, batch=64, record=list(range(n_cnn)))
    runs.append(Run("cnn-1.5M", Layout.from_module(cnn), steps, rows, f"steps 0..{n_cnn - 1}"))
    torch.set_num_threads(1)
    return runs


# ---------------------------------------------------------------------------------- measurements
def write_archive(path: str, run: Run, codec: str, cpu: list | None = None) -> float:
    """Seconds to write every row of ``run`` through ArchiveWriter (create, add_record, close).

    Appends the process CPU seconds of the same write to ``cpu`` when given.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    w = ArchiveWriter(path, run.layout, mode="w", codec=codec)
    for step, row in zip(run.steps, run.rows):
        w.add_record(step, {PARAMS: row})
    w.close()
    t1, c1 = time.perf_counter(), time.process_time()
    if cpu is not None:
        cpu.append(c1 - c0)
    return t1 - t0


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def measure(run: Run, codec: Codec, tmp: str, *, reps: int, n_rand: int, n_seq: int, rng) -> dict:
    path = os.path.join(tmp, f"{run.name}-{codec.name}.h5")
    if reps > 1:  # untimed warm-up: loads the filter, warms allocator and page cache (skipped by --quick)
        write_archive(path, Run(run.name, run.layout, run.steps[:8], run.rows[:8]), codec.name)
    cpu: list[float] = []
    times = [write_archive(path, run, codec.name, cpu) for _ in range(reps)]
    with h5py.File(path, "r") as f:
        disk = f[PARAMS].id.get_storage_size()
    out = {"ratio": run.rows.nbytes / disk, "mbps": run.raw_mb / statistics.median(times),
           "cpu_mbps": run.raw_mb / statistics.median(cpu), "disk": disk}
    n = len(run.rows)
    exact = True
    with Trajectory(path) as tr:
        # random access: two consecutive records at a random position (fresh reader state each time)
        picks = rng.integers(0, n - 1, size=n_rand)
        elapsed = 0.0
        for i in picks:
            tr._rows[PARAMS]._last = None  # a random jump never starts from a cached neighbour
            t0 = time.perf_counter()
            a, b = tr.params(int(i)), tr.params(int(i) + 1)
            elapsed += time.perf_counter() - t0
            if not codec.lossy:
                exact &= same_bits(a.numpy(), run.rows[i]) and same_bits(b.numpy(), run.rows[i + 1])
        out["rand_ms"] = 1e3 * elapsed / n_rand
        # sequential sweep of pairs()
        it = tr.pairs(stop=min(n - 1, n_seq))
        elapsed, count = 0.0, 0
        while True:
            t0 = time.perf_counter()
            pair = next(it, None)
            elapsed += time.perf_counter() - t0
            if pair is None:
                break
            count += 1
            if not codec.lossy:
                exact &= same_bits(pair.params_a.numpy(), run.rows[pair.index])
                exact &= same_bits(pair.params_b.numpy(), run.rows[pair.index + 1])
        out["seq_ms"] = 1e3 * elapsed / max(1, count)
        block = tr.params_block(0, n).numpy()
        if codec.lossy:
            err = np.abs(block.astype(np.float64) - run.rows)
            scale = np.abs(run.rows).max()
            out["max_err"] = float(err.max())
            out["rel_err"] = float(err.max() / scale) if scale else 0.0
            # how much of one step's update survives: |decoded step| vs |true step|
            d_true = np.diff(run.rows.astype(np.float64), axis=0)
            d_dec = np.diff(block.astype(np.float64), axis=0)
            out["step_err"] = float(np.linalg.norm(d_dec - d_true) / max(np.linalg.norm(d_true), 1e-30))
        else:
            exact &= same_bits(block, run.rows)
    out["exact"] = exact if not codec.lossy else None
    os.remove(path)
    return out


def naive_rows_per_s(path: str, run: Run, codec: Codec, n_rows: int, budget_s: float,
                     rdcc_nbytes: int | None = None) -> tuple[float, int]:
    """Append rows one at a time into a compressed chunked dataset: resize by 1, write 1 row.

    ``rdcc_nbytes=None`` keeps the library's default chunk cache (8 MiB in HDF5 2.0, 1 MiB before).
    """
    rows = run.rows[:n_rows]
    chunks = fmt.chunk_shape(rows.shape[1], rows.itemsize)
    done = 0
    t0 = time.perf_counter()
    kw = {} if rdcc_nbytes is None else {"rdcc_nbytes": rdcc_nbytes}
    with h5py.File(path, "w", libver="latest", **kw) as f:
        d = f.create_dataset(PARAMS, shape=(0, rows.shape[1]), maxshape=(None, rows.shape[1]),
                             dtype=rows.dtype, chunks=chunks, **codec.h5_kwargs())
        for row in rows:
            d.resize(done + 1, axis=0)
            d[done] = row
            done += 1
            if time.perf_counter() - t0 > budget_s:
                break
    elapsed = time.perf_counter() - t0
    os.remove(path)
    return done / elapsed, done


# ---------------------------------------------------------------------------------- output
def level_variants() -> dict[str, Codec]:
    """Compression-level variants ``xor-<filter>@<level>``, registered for this process only.

    The shipped codecs use clevel 5 for Blosc/Blosc2 (for zstd inside Blosc that is zstd level 9)
    and level 3 for the plain zstd filter.
    """
    out = {}
    variants = [(f, lvl) for f in ("blosc-zstd-bit", "blosc-zstd-byte", "blosc2-zstd-bit", "blosc2-zstd-byte") for lvl in (1, 2, 3)]
    variants += [(f, lvl) for f in ("blosc-lz4-bit", "blosc2-lz4-bit") for lvl in (1, 9)]
    variants += [("zstd", 1)]
    for f, lvl in variants:
        name = f"xor-{f}@{lvl}"
        if not any(c.transform == "xor" and c.filter == f and c.level == lvl for c in CODECS.values()):
            out[name] = Codec(name, "xor", f, lvl)  # skip variants that ship under a name
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    ap.add_argument("--levels", action="store_true", help="also measure compression-level variants (xor-*@level)")
    ap.add_argument("--codecs", default="", help="comma-separated codec names (default: all)")
    ap.add_argument("--tmp", default=None,
                    help="directory for the archives (default: /dev/shm if present, so disk speed does not enter)")
    args = ap.parse_args(argv)
    if args.tmp is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        args.tmp = "/dev/shm"

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    print("load average at start: %.2f %.2f %.2f (other processes on this machine skew wall-clock MB/s; "
          "'cpu MB/s' uses this process's CPU time)" % os.getloadavg())
    runs = build_runs(args.quick)
    print(f"trajectories recorded in {time.perf_counter() - t_start:.1f} s "
          f"(BLOSC_NTHREADS={os.environ['BLOSC_NTHREADS']}, torch threads for measuring: 1, "
          f"archives in {args.tmp or tempfile.gettempdir()})")
    for r in runs:
        print(f"  {r.name:10s} {r.note:18s} {r.rows.shape[0]:4d} rows x {r.rows.shape[1]:>9,d} params  "
              f"{r.raw_mb:7.1f} MB raw")

    codecs = dict(CODECS)
    if args.levels:
        extra = level_variants()
        codecs_mod.CODECS.update(extra)  # so ArchiveWriter/Trajectory can resolve them by name
        codecs.update(extra)
    if args.codecs:
        codecs = {k: codecs[k] for k in args.codecs.split(",")}
    lossless = [c for c in codecs.values() if not c.lossy]
    lossy = [c for c in codecs.values() if c.lossy]

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for run in runs:
            cnn = run.name.startswith("cnn")
            reps = 1 if args.quick else (2 if cnn else 3)
            n_rand = (2 if args.quick else 3) if cnn else (5 if args.quick else 20)
            n_seq = (4 if args.quick else 8) if cnn else (32 if args.quick else 128)
            for c in lossless + lossy:
                run.results[c.name] = measure(run, c, tmp, reps=reps, n_rand=n_rand, n_seq=n_seq, rng=rng)

        for run in runs:
            rows = []
            for c in lossless:
                m = run.results[c.name]
                rows.append([c.name, f"{m['ratio']:.3f}", f"{m['mbps']:.0f}", f"{m['cpu_mbps']:.0f}",
                             f"{m['rand_ms']:.1f}", f"{m['seq_ms']:.2f}", "yes" if m["exact"] else "NO"])
            print_table(f"[{run.name}] {run.note}, {run.rows.shape[0]} x {run.rows.shape[1]:,} float32, lossless codecs",
                        ["codec", "ratio", "MB/s", "cpu MB/s", "rand ms/pair", "seq ms/pair", "exact"], rows)

        # summary over the three trajectories: the default-codec decision
        rows, best = [], None
        for c in lossless:
            ratios = [r.results[c.name]["ratio"] for r in runs]
            speeds = [r.results[c.name]["mbps"] for r in runs]
            meets = min(ratios) >= GOAL_RATIO and min(speeds) >= GOAL_MBPS
            fast = min(speeds) >= GOAL_MBPS
            rows.append([c.name, *(f"{x:.3f}" for x in ratios), f"{min(speeds):.0f}",
                         "both" if meets else ("MB/s" if fast else ("ratio" if min(ratios) >= GOAL_RATIO else "-"))])
            geo = float(np.exp(np.mean(np.log(ratios))))
            if fast and (best is None or geo > best[1]):
                best = (c.name, geo)
        print_table(f"Summary, lossless: ratio per trajectory, slowest write MB/s, goals met "
                    f"(ratio >= {GOAL_RATIO}, >= {GOAL_MBPS:.0f} MB/s on one core)",
                    ["codec", *(r.name for r in runs), "min MB/s", "goals"], rows)
        if best:
            print(f"\nbest ratio (geometric mean over trajectories) among codecs >= {GOAL_MBPS:.0f} MB/s: "
                  f"{best[0]} ({best[1]:.3f}x); DEFAULT_CODEC is {DEFAULT_CODEC}")
        else:
            print(f"\nno lossless codec reached {GOAL_MBPS:.0f} MB/s on every trajectory; DEFAULT_CODEC is {DEFAULT_CODEC}")

        if lossy:
            rows = []
            for c in lossy:
                for run in runs:
                    m = run.results[c.name]
                    rows.append([c.name, run.name, f"{m['ratio']:.3f}", f"{m['mbps']:.0f}", f"{m['rand_ms']:.1f}",
                                 f"{m['seq_ms']:.2f}", f"{m['rel_err']:.1e}", f"{m['step_err']:.2f}"])
            print_table("Lossy codecs (values change: rel err = max|err| / max|theta|; "
                        "step err = ||decoded step - true step|| / ||true step||)",
                        ["codec", "trajectory", "ratio", "MB/s", "rand ms/pair", "seq ms/pair", "rel err", "step err"], rows)

        # naive single-row appends vs ArchiveWriter, same rows, same filter
        codec = CODECS[DEFAULT_CODEC]
        plain = next((c for c in CODECS.values() if c.transform == "none" and c.filter == codec.filter
                      and c.level == codec.level), None)
        if plain is None:  # the default's filter at its level, without the XOR transform
            plain = Codec(f"{codec.filter}@{codec.level}", "none", codec.filter, codec.level)
            codecs_mod.CODECS[plain.name] = plain
        with h5py.File(os.path.join(tmp, "probe.h5"), "w") as f:
            cache = f.id.get_access_plist().get_cache()[2]
        rows = []
        for run in runs[:1] + runs[2:]:
            cnn = run.name.startswith("cnn")
            n_rows = (4 if args.quick else 16) if cnn else (64 if args.quick else 128)
            budget = 3.0 if args.quick else 30.0
            naive, done = naive_rows_per_s(os.path.join(tmp, "naive.h5"), run, plain, n_rows, budget)
            naive_1m, done_1m = naive_rows_per_s(os.path.join(tmp, "naive.h5"), run, plain, done, budget, 1 << 20)
            sub = Run(run.name, run.layout, run.steps[:done], run.rows[:done])
            ours_plain = done / min(write_archive(os.path.join(tmp, "ours.h5"), sub, plain.name) for _ in range(2))
            ours = done / min(write_archive(os.path.join(tmp, "ours.h5"), sub, codec.name) for _ in range(2))
            os.remove(os.path.join(tmp, "ours.h5"))
            rows.append([run.name, done, f"{naive:.1f}", f"{naive_1m:.1f} ({done_1m})", f"{ours_plain:.0f}",
                         f"{ours_plain / naive:.1f}x / {ours_plain / naive_1m:.0f}x", f"{ours:.0f}"])
        print_table(f"Naive write path (resize by 1 + write 1 row) vs ArchiveWriter, rows/s, filter {plain.name}; "
                    f"default chunk cache here {cache / 2**20:.0f} MiB",
                    ["trajectory", "rows", "naive", "naive 1 MiB cache (rows)", "ArchiveWriter",
                     "speedup (default / 1 MiB)", f"ArchiveWriter {codec.name}"], rows)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
