"""Archive fuzzing (issue 12): damaged archives give one clean error or the original's values, never a hang or traceback.

One small archive (an MLP on MNIST-1D, 21 records in 3 chunks) is mutated ~90 ways: truncations, bit flips in
chunk data and in HDF5 metadata (superblock, object headers, chunk indexes, heaps), NaN/Inf written over stored
bytes, deleted attributes and datasets, wrong dtypes and shapes, huge declared dimensions, bad steps and batch
offsets, negative indices, future/invalid versions, soft/external links, external raw storage, virtual
datasets, and empty/text/random/directory/FIFO inputs. Each mutant goes through four calls - ``sgdwalk info
--json``, ``sgdwalk verify --json``, ``sgdwalk analyze`` (a tiny interpolation) and ``Trajectory.params`` of every
record - each in its own process with a timeout. The processes are forked from this one after torch, h5py and
the data are loaded, so a call costs its work, not an interpreter start (that is what keeps ~360 calls within
the CI budget). Asserted: 0 hangs, 0 tracebacks (any exit status but 0, 1 and 2, or a traceback on stderr), a
non-zero exit always ends in one ``error:``/``bad:`` line, and every exit-0 call returns exactly the original
archive's values. Deterministic: mutation positions come from the file's own structure and a fixed seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per call")

CALL_TIMEOUT = 30.0  # seconds; generous for a loaded 2-core CI machine (calls take well under 1 s)
ANALYZE_ARGS = ["-m", "interpolation", "--alphas", "0:1:2", "--eval", "subset:20", "--steps", "0:2", "--strategy", "loop"]


# ------------------------------------------------------------------------------------------ the four calls
def _call_cli(args: list[str]) -> int:
    from cli.main import main

    try:
        main.main(args=args, prog_name="sgdwalk", standalone_mode=True)
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    return 0


def _call_params(path: str) -> int:
    from trajectory import Trajectory
    from trajectory.errors import SgdwalkError

    try:
        with Trajectory(path) as traj:
            h = hashlib.sha256()
            for i in range(len(traj)):
                h.update(traj.params(i).numpy().tobytes())
                if traj.optimizer_state_keys:  # the base archive records SGD's momentum buffer: read it too
                    h.update(b"".join(v.numpy().tobytes() for v in traj.optimizer_state(i).values()))
            print(json.dumps({"records": len(traj), "sha256": h.hexdigest()}))
    except SgdwalkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _run_forked(fn: Callable[[], int], out_dir: Path) -> tuple[str, int | None, str, str]:
    """Run ``fn`` in a forked child with stdout/stderr to files; ('ok'|'hang'|'crash', rc, stdout, stderr)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    so, se = out_dir / "stdout", out_dir / "stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        rc = 98
        try:
            fo = os.open(so, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fe = os.open(se, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            rc = fn()
        except BaseException:
            traceback.print_exc()
            rc = 99
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc)
    deadline = time.monotonic() + CALL_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang", None, so.read_text(errors="replace"), se.read_text(errors="replace")
        time.sleep(0.01)
    stdout, stderr = so.read_text(errors="replace"), se.read_text(errors="replace")
    if os.WIFSIGNALED(status):
        return "crash", -os.WTERMSIG(status), stdout, stderr
    return "ok", os.WEXITSTATUS(status), stdout, stderr


def _values(kind: str, stdout: str, results: Path | None) -> Any:
    """What an exit-0 call returned, minus what legitimately depends on the file's path and byte size."""
    if kind in ("info", "verify"):
        d = json.loads(stdout)
        for k in ("path", "file_bytes", "compression_ratio"):
            d.pop(k, None)
        return d
    if kind == "analyze":
        out: dict[str, Any] = {}
        with h5py.File(results, "r") as f:
            f.visititems(lambda n, o: out.__setitem__(n, np.asarray(o[()]).tolist()) if isinstance(o, h5py.Dataset) else None)
        return out
    return json.loads(stdout)


def _calls(path: Path, work: Path) -> dict[str, tuple[Callable[[], int], Path | None]]:
    results = work / "r.results.h5"
    return {
        "info": (lambda: _call_cli(["info", str(path), "--json"]), None),
        "verify": (lambda: _call_cli(["verify", str(path), "--json"]), None),
        "analyze": (lambda: _call_cli(["analyze", str(path), "-o", str(results), *ANALYZE_ARGS]), results),
        "params": (lambda: _call_params(str(path)), None),
    }


# ------------------------------------------------------------------------------------------ mutations
def _flip(data: bytearray, pos: int, mask: int = 0x10) -> None:
    data[pos % len(data)] ^= mask


def _chunk_spans(path: Path) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                spans[name] = [(ci.byte_offset, ci.size) for ci in (obj.id.get_chunk_info(i) for i in range(obj.id.get_num_chunks()))]
        f.visititems(visit)
    return spans


def _byte_mutations(base: Path) -> dict[str, Callable[[bytearray], bytes]]:
    raw = base.read_bytes()
    n = len(raw)
    muts: dict[str, Callable[[bytearray], bytes]] = {}
    for cut in (0, 7, 40, 200, 2000, n // 4, n // 2, 3 * n // 4, n - 100, n - 1):
        muts[f"truncate@{cut}"] = lambda d, cut=cut: bytes(d[:cut])
    spans = _chunk_spans(base)
    for name, chunks in sorted(spans.items()):
        for k in sorted({0, len(chunks) - 1}):
            off, size = chunks[k]
            muts[f"flip-chunk:{name}#{k}"] = lambda d, p=off + size // 2: (_flip(d, p), bytes(d))[1]
    off, size = spans["params"][-1]
    nan = np.array([np.nan] * 4, dtype=np.float32).tobytes()
    muts["nan-bytes:params"] = lambda d, p=off + size // 3: (d.__setitem__(slice(p, p + 16), nan), bytes(d))[1]
    off, size = spans["scalars"][0]
    inf = np.array([np.inf] * 2).tobytes()
    muts["inf-bytes:scalars"] = lambda d, p=off + size // 2: (d.__setitem__(slice(p, p + 16), inf), bytes(d))[1]
    for pos in (8, 9, 11, 13, 20, 28, 36, 44):
        muts[f"flip-superblock@{pos}"] = lambda d, p=pos: (_flip(d, p, 0x01), bytes(d))[1]
    rng = random.Random(12)
    for sig in (b"OHDR", b"OCHK", b"BTHD", b"BTLF", b"FAHD", b"FADB", b"EAHD", b"EADB", b"FRHP", b"FHDB", b"GCOL"):
        hits = [i for i in range(n - 4) if raw[i : i + 4] == sig][:3]
        for j, at in enumerate(hits):
            muts[f"flip-meta:{sig.decode()}#{j}"] = lambda d, p=at + 5 + rng.randrange(6): (_flip(d, p), bytes(d))[1]
    return muts


def _replace(f: h5py.File, name: str, data: Any, **kw: Any) -> None:
    attrs = dict(f[name].attrs)
    del f[name]
    d = f.create_dataset(name, data=data, **kw)
    for k, v in attrs.items():
        d.attrs[k] = v


def _h5_mutations() -> dict[str, Callable[[h5py.File, Path], None]]:
    muts: dict[str, Callable[[h5py.File, Path], None]] = {}
    for attr in ("format", "format_version", "codec"):
        muts[f"del-attr:{attr}"] = lambda f, w, a=attr: f.attrs.__delitem__(a)
    for attr in ("transform", "logical_dtype"):
        muts[f"del-attr:params.{attr}"] = lambda f, w, a=attr: f["params"].attrs.__delitem__(a)
    muts["attr:params.transform=none"] = lambda f, w: f["params"].attrs.__setitem__("transform", "none")
    muts["attr:params.logical_dtype=float64"] = lambda f, w: f["params"].attrs.__setitem__("logical_dtype", "float64")
    for name in ("layout", "params", "steps", "record_time", "nonfinite", "batches/step", "batches/end", "batches/indices", "scalars"):
        muts[f"del-dataset:{name}"] = lambda f, w, n=name: f.__delitem__(n)
    for value in (99, "1", 1.5, -1, 0):
        muts[f"format_version={value!r}"] = lambda f, w, v=value: f.attrs.__setitem__("format_version", v)
    muts["codec=nonsense"] = lambda f, w: f.attrs.__setitem__("codec", "nonsense")
    muts["codec=zstd (no transform)"] = lambda f, w: f.attrs.__setitem__("codec", "zstd")
    muts["n_records=5"] = lambda f, w: f.attrs.__setitem__("n_records", 5)
    muts["steps-not-increasing"] = lambda f, w: f["steps"].__setitem__(3, 1)
    muts["steps-negative"] = lambda f, w: f["steps"].__setitem__(0, -5)
    muts["steps-float"] = lambda f, w: _replace(f, "steps", f["steps"][()].astype(np.float64), maxshape=(None,), chunks=(64,))
    muts["steps-2d"] = lambda f, w: _replace(f, "steps", f["steps"][()].reshape(-1, 1))
    muts["batch-end-decreasing"] = lambda f, w: f["batches/end"].__setitem__(2, 0)
    muts["batch-end-past-indices"] = lambda f, w: f["batches/end"].__setitem__(-1, 10**6)
    muts["batch-step-not-increasing"] = lambda f, w: f["batches/step"].__setitem__(1, 0)
    muts["batch-index-negative"] = lambda f, w: f["batches/indices"].__setitem__(0, -3)
    muts["batch-index-huge"] = lambda f, w: f["batches/indices"].__setitem__(slice(0, 10), 10**12)
    muts["huge:steps"] = lambda f, w: f["steps"].resize((1 << 40,))
    muts["huge:params-rows"] = lambda f, w: f["params"].resize(1 << 32, axis=0)
    muts["huge:batch-indices"] = lambda f, w: f["batches/indices"].resize((1 << 40,))
    muts["params-width"] = lambda f, w: _replace(f, "params", f["params"][:, :-1], maxshape=(None, f["params"].shape[1] - 1), chunks=(8, f["params"].shape[1] - 1))
    muts["params-dtype"] = lambda f, w: _replace(f, "params", f["params"][()].view(np.float32), maxshape=(None, f["params"].shape[1]), chunks=(8, f["params"].shape[1]))
    muts["params-1d"] = lambda f, w: _replace(f, "params", f["params"][()].reshape(-1))
    muts["layout-numel"] = lambda f, w: _replace(f, "layout", _layout_with(f, "numel", 7))
    muts["layout-dtype"] = lambda f, w: _replace(f, "layout", _layout_with(f, "dtype", b"complex64"))
    muts["layout-shape"] = lambda f, w: _replace(f, "layout", _layout_with(f, "shape", b"x,y"))
    muts["scalars-dtype"] = lambda f, w: _replace(f, "scalars", np.zeros(3))
    muts["nan:record_time"] = lambda f, w: f["record_time"].__setitem__(slice(None), np.nan)
    # optimizer state (issue 14 item 5): missing, reshaped, retyped or oversized datasets and a damaged attribute
    for name in ("optimizer/momentum_buffer", "optimizer/state_step"):
        muts[f"del-dataset:{name}"] = lambda f, w, n=name: f.__delitem__(n)
    mb = "optimizer/momentum_buffer"
    muts["optimizer-width"] = lambda f, w: _replace(f, mb, f[mb][:, :-1], maxshape=(None, f[mb].shape[1] - 1), chunks=(8, f[mb].shape[1] - 1))
    muts["optimizer-dtype"] = lambda f, w: _replace(f, mb, f[mb][()].view(np.float32), maxshape=(None, f[mb].shape[1]), chunks=(8, f[mb].shape[1]))
    muts["optimizer-short"] = lambda f, w: f[mb].resize(5, axis=0)
    muts["huge:optimizer-rows"] = lambda f, w: f[mb].resize(1 << 32, axis=0)
    muts["state_step-dtype"] = lambda f, w: _replace(f, "optimizer/state_step", np.zeros(21, np.int64))
    for value in ('["momentum_buffer", "exp_avg"]', '{"x": 1}', "[1]", "not json"):
        muts[f"optimizer_state={value}"] = lambda f, w, v=value: f.attrs.__setitem__("optimizer_state", v)

    def external_link(f: h5py.File, w: Path) -> None:
        other = w / "other.h5"
        with h5py.File(other, "w") as g:
            g["steps"] = np.arange(21)
        del f["steps"]
        f["steps"] = h5py.ExternalLink(str(other), "/steps")

    def soft_link(f: h5py.File, w: Path) -> None:
        del f["nonfinite"]
        f["nonfinite"] = h5py.SoftLink("/steps")

    def external_storage(f: h5py.File, w: Path) -> None:
        secret = w / "secret.txt"
        secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 64)
        n = f["record_time"].shape[0]
        del f["record_time"]
        f.create_dataset("record_time", shape=(n,), dtype="<f8", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])

    def virtual(f: h5py.File, w: Path) -> None:
        other = w / "virt.h5"
        with h5py.File(other, "w") as g:
            g["steps"] = np.arange(21, dtype=np.int64)
        layout = h5py.VirtualLayout(shape=(21,), dtype="<i8")
        layout[:] = h5py.VirtualSource(str(other), "steps", shape=(21,))
        del f["steps"]
        f.create_virtual_dataset("steps", layout)

    muts["external-link:steps"] = external_link
    muts["soft-link:nonfinite"] = soft_link
    muts["external-storage:record_time"] = external_storage
    muts["virtual:steps"] = virtual
    return muts


def _layout_with(f: h5py.File, field: str, value: Any) -> np.ndarray:
    t = f["layout"][()]
    t[field][0] = value
    return t


def _special_inputs(work: Path) -> dict[str, Path]:
    out = {}
    (work / "text.h5").write_text("this is a text file, not an archive\n" * 20)
    out["text-file"] = work / "text.h5"
    (work / "random.h5").write_bytes(random.Random(3).randbytes(5000))
    out["random-bytes"] = work / "random.h5"
    (work / "dir.h5").mkdir()
    out["directory"] = work / "dir.h5"
    os.mkfifo(work / "fifo.h5")
    out["fifo"] = work / "fifo.h5"
    out["missing"] = work / "missing.h5"
    return out


# ------------------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trajectory.training import train

    work = tmp_path_factory.mktemp("fuzz-base")
    path = work / "base.h5"
    train("mlp", "mnist1d", model_kwargs={"hidden": [8]}, data_kwargs={"num_samples": 300}, steps=20,
          batch_size=10, out=path, progress=False, device="cpu", momentum=0.9, record_optimizer_state=True)
    return path


def test_fuzz_archive_mutations(base: Path, tmp_path: Path) -> None:
    import cli.analyze  # noqa: F401  (imported once here, not in every forked child)
    import cli.info  # noqa: F401
    import cli.verify  # noqa: F401
    import trajectory.analysis  # noqa: F401

    raw = base.read_bytes()
    cases: dict[str, Path] = {}
    for name, mut in _byte_mutations(base).items():
        p = tmp_path / f"m{len(cases):03d}.h5"
        p.write_bytes(mut(bytearray(raw)))
        cases[name] = p
    for name, mut in _h5_mutations().items():
        p = tmp_path / f"m{len(cases):03d}.h5"
        p.write_bytes(raw)
        w = tmp_path / f"w{len(cases):03d}"
        w.mkdir()
        with h5py.File(p, "r+") as f:
            mut(f, w)
        cases[name] = p
    cases.update(_special_inputs(tmp_path))
    assert len(cases) >= 60

    # reference values from the intact archive
    ref: dict[str, Any] = {}
    for kind, (fn, results) in _calls(base, tmp_path / "ref").items():
        status, rc, stdout, stderr = _run_forked(fn, tmp_path / "ref" / kind)
        assert status == "ok" and rc == 0, (kind, rc, stderr[-2000:])
        ref[kind] = _values(kind, stdout, results)
        if results is not None:
            results.unlink()

    counts = {"calls": 0, "exit0_identical": 0, "clean_error": 0, "hang": 0, "traceback": 0, "wrong_values": 0}
    failures: list[str] = []
    for name, path in cases.items():
        work = tmp_path / "runs" / f"c{counts['calls']:04d}"
        for kind, (fn, results) in _calls(path, work).items():
            counts["calls"] += 1
            status, rc, stdout, stderr = _run_forked(fn, work / kind)
            if status == "hang":
                counts["hang"] += 1
                failures.append(f"HANG {name} {kind}")
                continue
            lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
            if status == "crash" or rc not in (0, 1, 2) or "Traceback" in stderr:
                counts["traceback"] += 1
                failures.append(f"TRACEBACK {name} {kind} rc={rc}: {stderr[-600:]}")
                continue
            if rc == 0:
                try:
                    same = _values(kind, stdout, results) == ref[kind]
                except Exception as err:  # noqa: BLE001 - unreadable output counts as wrong
                    same = False
                    stdout += f" ({err})"
                if same:
                    counts["exit0_identical"] += 1
                else:
                    counts["wrong_values"] += 1
                    failures.append(f"WRONG {name} {kind}: {stdout[:300]}")
            else:
                one_line = (len(lines) == 1 and lines[0].startswith("error:")) or (kind == "verify" and rc == 1 and not lines)
                if not one_line:
                    counts["traceback"] += 1
                    failures.append(f"NOT ONE LINE {name} {kind} rc={rc}: {stderr[-600:]}")
                else:
                    counts["clean_error"] += 1
            if results is not None and results.exists():
                results.unlink()
    print(f"\nfuzz: {len(cases)} mutations x 4 calls: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    report = os.environ.get("SGDWALK_FUZZ_REPORT")
    if report:
        Path(report).write_text("\n".join(failures))
    assert not failures, "\n".join(failures[:40])
    assert counts["hang"] == 0 and counts["traceback"] == 0 and counts["wrong_values"] == 0
