"""Distributed analysis: 2 gloo processes started by torchrun give the single-process results; a killed rank's
run resumes (with another world size) without recomputing finished rows; data-parallel curvature matches.

The torchrun runs use the installed ``-m trajectory.cli analyze`` when sgdwalk is installed (CI) and
``-m cli.analyze`` from the checkout otherwise (same click command).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from test_analysis_support import install_metric_plugin, record_mlp
from trajectory.analysis import ResultsFile, analyze
from trajectory.analysis.distributed import DistContext, partial_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = ["--eval", "subset:300", "--dtype", "float64", "--spans", "1,3"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SLOW_PLUGIN = textwrap.dedent('''
    """Test plug-in: a metric that takes a while per pair, so a run can be killed midway deterministically."""
    import os, time
    from trajectory.analysis import Metric


    class SlowPair(Metric):
        name = "slowpair"
        uses_data = False

        def compute(self, ctx, units):
            if os.environ.get("RANK") == os.environ.get("SLOWPAIR_RANK"):  # only that rank is slow
                time.sleep(float(os.environ.get("SLOWPAIR_SECONDS", "0")))
            return [{"pair_again": float(u[0])} for u in units]
''')


@functools.lru_cache(maxsize=None)
def _cli() -> tuple[str, ...]:
    # asked of a fresh interpreter: other tests may have aliased cli/ as trajectory.cli in this one
    probe = subprocess.run([sys.executable, "-c", "import trajectory.cli.main"], cwd="/", capture_output=True, timeout=120)
    if probe.returncode == 0:
        return ("-m", "trajectory.cli", "analyze")
    return ("-m", "cli.analyze")


def _torchrun(nproc: int, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *_cli(), *args]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    full_env.update(env or {})
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _tables(path) -> dict:
    f = ResultsFile(path, "r")
    return {(m, h): t for (m, h), t in f.tables.items()}


def _assert_same(got: dict, ref: dict, metrics=None) -> None:
    keys = [k for k in ref if metrics is None or k[0] in metrics]
    assert keys
    for k in keys:
        assert k in got, f"missing table {k[0]}"
        a, b = got[k].arrays(), ref[k].arrays()
        assert set(a) == set(b)
        for col in b:
            if col == "run":
                continue
            np.testing.assert_allclose(np.asarray(a[col], dtype=np.float64), np.asarray(b[col], dtype=np.float64),
                                       rtol=1e-10, atol=1e-12, equal_nan=True, err_msg=f"{k[0]}.{col}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("dist") / "run.h5", steps=30, lr=0.3, seed=11)


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    analyze(archive, out, eval="subset:300", dtype="float64", spans="1,3", distributed=False)
    return _tables(out)


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistContext.from_env("auto") is None
    assert DistContext.from_env(False) is None
    with pytest.raises(Exception, match="torchrun"):
        DistContext.from_env(True)


@pytest.mark.slow
def test_two_gloo_processes_match_a_single_process_run(archive, reference, tmp_path):
    out = tmp_path / "dist.h5"
    p = _torchrun(2, [archive, "--out", str(out), *EVAL, "-q"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "convex+interior" in stdout  # rank 0 printed the merged summary, once
    assert stdout.count("rows computed") == 1
    shares = re.search(r"146 rows computed by 2 processes \((\d+) \+ (\d+)\)", stdout)
    assert shares, stdout
    assert int(shares[1]) > 40 and int(shares[2]) > 40  # both ranks did their share
    got = _tables(out)
    _assert_same(got, reference)
    for t in got.values():
        assert t.rows_computed == len(t)  # every row computed once, by one rank
    assert partial_files(out) == []  # merged and removed
    again = analyze(archive, out, eval="subset:300", dtype="float64", spans="1,3", distributed=False)
    assert sum(again.computed.values()) == 0


@pytest.fixture()
def slow_plugin(tmp_path):
    return install_metric_plugin(tmp_path / "site", "sgdwalk_slowpair", SLOW_PLUGIN, "slowpair", "SlowPair")


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    r = env.get(b"RANK")
    return int(r) if r is not None else None


def _rows_on_disk(out) -> dict[str, set]:
    rows: dict[str, set] = {}
    for path in ([str(out)] if os.path.exists(out) else []) + partial_files(out):
        for (m, _h), t in ResultsFile(path, "r").tables.items():
            rows.setdefault(m, set()).update(t.sorted_keys())
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_killed_rank_then_rerun_with_another_world_size_recomputes_nothing(archive, reference, slow_plugin, tmp_path):
    out = tmp_path / "killed.h5"
    metrics = ["--metric", "interpolation,floor,geometry,barriers,slowpair", "--flush-seconds", "0"]
    # rank 1 hangs in its first block; rank 0 finishes its share of the first level, flushes it, and waits
    env = {"PYTHONPATH": os.pathsep.join([str(slow_plugin), ROOT]), "SLOWPAIR_SECONDS": "60", "SLOWPAIR_RANK": "1"}
    p = _torchrun(2, [archive, "--out", str(out), *EVAL, *metrics, "-q"], env=env)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            on_disk = _rows_on_disk(out)
            if victim is None:
                ranks = {_rank_of(c): c for c in _children(p.pid)}
                victim = ranks.get(1)
            if victim is not None and on_disk.get("slowpair"):
                os.kill(victim, signal.SIGKILL)  # rank 1 dies midway; torchrun stops rank 0 (SIGTERM)
                break
            time.sleep(0.05)
        assert victim is not None, "rank 1 was not found"
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, stderr[-3000:]  # the run failed, as it should
    assert partial_files(out), stderr[-3000:]  # each rank keeps its rows in its own partial file
    before = _rows_on_disk(out)
    n_total = {"interpolation": 30, "floor": 30, "geometry": 30, "slowpair": 30, "barriers": 29 + 27}
    missing = {m: n_total[m] - len(before.get(m, ())) for m in n_total}
    assert 0 < missing["slowpair"] < 30 and missing["floor"] == 30  # killed midway through the first level

    # resume with a different world size (1 process): computes exactly the missing rows, merges the parts
    code = textwrap.dedent(f"""
        import json
        from trajectory.analysis import analyze
        r = analyze({str(archive)!r}, {str(out)!r}, eval="subset:300", dtype="float64", spans="1,3",
                    metrics=["interpolation", "floor", "geometry", "barriers", "slowpair"], distributed=False)
        print(json.dumps(r.computed))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env, "SLOWPAIR_RANK": ""},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    computed = json.loads(res.stdout.strip().splitlines()[-1])
    assert computed == missing
    assert partial_files(out) == []
    got = _tables(out)
    _assert_same(got, reference)
    for t in got.values():
        assert t.rows_computed == len(t)


@pytest.mark.slow
def test_rerun_with_4_processes_completes_a_partial_single_process_run(archive, reference, tmp_path):
    out = tmp_path / "grow.h5"
    analyze(archive, out, eval="subset:300", dtype="float64", spans="1,3", steps="0:11", distributed=False)
    p = _torchrun(4, [archive, "--out", str(out), *EVAL, "-q"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    shares = re.search(r"rows computed by 4 processes \((\d+) \+ (\d+) \+ (\d+) \+ (\d+)\)", stdout)
    assert shares and all(int(s) > 0 for s in shares.groups()), stdout  # every rank had work
    # 30 pairs, 11 analysed before: 3 x 19 new per-pair rows; barriers 29 + 27 units, 10 + 8 existed
    assert f"{3 * 19 + (29 + 27) - (10 + 8)} rows computed" in stdout, stdout
    _assert_same(_tables(out), reference)


@pytest.mark.slow
def test_data_parallel_curvature_matches_single_process(archive, tmp_path):
    kw = ["--metric", "hessian_top", "--steps", "0:30:10", "--eval", "subset:300", "--dtype", "float64",
          "--option", "k=2", "--option", "at=record"]
    ref = tmp_path / "ref.h5"
    analyze(archive, ref, metrics=["hessian_top"], steps="0:30:10", eval="subset:300", dtype="float64",
            options={"k": 2, "at": "record"}, distributed=False)
    out = tmp_path / "data.h5"
    p = _torchrun(2, [archive, "--out", str(out), *kw, "--curvature-split", "data", "-q"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    # 3 pairs x (interpolation, floor, hessian_top): the curvature rows every rank computes count once
    assert re.search(r"^9 rows computed", stdout, re.M), stdout
    got, want = _tables(out), _tables(ref)
    key = next(k for k in want if k[0] == "hessian_top")
    a, b = got[key].arrays(), want[key].arrays()
    np.testing.assert_array_equal(a["pair"], b["pair"])
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-8)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-10)


def test_partial_files_fold_into_a_single_process_run(archive, reference, tmp_path):
    """Leftover partial files (as a killed torchrun leaves them) are merged by a plain single-process rerun."""
    import shutil

    out = tmp_path / "r.h5"
    # two 'ranks' worth of rows, written as partial files by single-process runs on disjoint pairs
    for rank, steps in ((0, "0:10"), (1, "10:20")):
        tmp = tmp_path / f"tmp{rank}.h5"
        analyze(archive, tmp, eval="subset:300", dtype="float64", spans="1,3", steps=steps, metrics=["floor"], distributed=False)
        shutil.move(tmp, f"{out}.part-{rank}")
    assert len(partial_files(out)) == 2
    rep = analyze(archive, out, eval="subset:300", dtype="float64", spans="1,3", metrics=["floor"], distributed=False)
    assert rep.computed == {"interpolation": 10, "floor": 10}  # pairs 20..29 only
    assert partial_files(out) == []
    got = _tables(out)
    _assert_same(got, reference, metrics={"interpolation", "floor"})
    for t in got.values():
        assert t.rows_computed == len(t) == 30


def test_partial_file_of_another_archive_is_refused(archive, tmp_path):
    from trajectory.analysis import ResultsMismatchError

    other = record_mlp(tmp_path / "other.h5", steps=4, seed=99)
    out = tmp_path / "r.h5"
    analyze(other, tmp_path / "o.h5", eval="subset:100", steps="0:2", metrics=["geometry"], distributed=False)
    os.replace(tmp_path / "o.h5", f"{out}.part-3")
    with pytest.raises(ResultsMismatchError, match="different archive"):
        analyze(archive, out, eval="subset:100", steps="0:2", metrics=["geometry"], distributed=False)
    assert os.path.exists(f"{out}.part-3")  # never deleted: it may be someone's data


def test_table_merge_and_adopt_keep_rows_computed_honest():
    from trajectory.analysis import Table

    cfg = {"metric": "m", "version": 1, "options": {}}
    a, b = Table("m", cfg, ["pair"]), Table("m", cfg, ["pair"])
    a.add((0,), 0, 1, {"x": 1.0}, 1)
    b.add((0,), 0, 1, {"x": 9.0}, 1)  # same key computed elsewhere: the existing row wins
    b.add((1,), 1, 2, {"x": 2.0}, 1)
    b.adopt((2,), (2, 3, 1), {"x": 3.0})  # b only knows row 2: never merged from b
    assert a.merge(b) == 1
    assert a.rows[(0,)]["x"] == 1.0 and a.rows[(1,)]["x"] == 2.0 and (2,) not in a.rows
    assert a.rows_computed == len(a) == 2
    assert b.arrays(own=True)["pair"].tolist() == [0, 1] and b.arrays()["pair"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_one_line(archive, tmp_path):
    """Rank 0 finds a results file of another archive: every rank exits with status 2 and one error line, no hang."""
    other = record_mlp(tmp_path / "other.h5", steps=3, seed=5)
    out = tmp_path / "taken.h5"
    analyze(other, out, eval="subset:100", metrics=["geometry"], distributed=False)
    p = _torchrun(2, [archive, "--out", str(out), "--eval", "subset:100", "-q"])
    _, stderr = p.communicate(timeout=300)
    assert p.returncode != 0
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and all("different archive" in ln for ln in errors), stderr[-2000:]
    assert partial_files(out) == []  # the check runs before any rank opens a partial file
    assert sum(t.rows_computed for t in _tables(out).values()) == 3  # the other archive's results are untouched


def _record_with_optimizer_state(path, make_opt, steps: int = 5, seed: int = 2) -> str:
    """The zoo MLP trained by ``make_opt`` with its optimizer state recorded (metric ``optimizer``)."""
    from test_analysis_support import record_mlp

    return record_mlp(path, steps, seed=seed, make_opt=make_opt, optimizer_state=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind,split", [("sgd", "pairs"), ("adam", "data")])
def test_optimizer_metric_under_torchrun_equals_one_process(kind, split, tmp_path):
    """Metric ``optimizer`` (issue 14 item 5) with 2 gloo processes: whole pairs per rank (SGD momentum) and the
    evaluation data split across ranks for the Lanczos runs (Adam): the rows of one process."""
    make = (lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)) if kind == "sgd" else (lambda ps: torch.optim.Adam(ps, lr=0.01))
    arch = _record_with_optimizer_state(tmp_path / "run.h5", make)
    ref = tmp_path / "ref.h5"
    analyze(arch, ref, metrics=["optimizer"], eval="subset:150", dtype="float64", options={"iters": 60, "tol": 1e-10},
            distributed=False)
    out = tmp_path / "dist.h5"
    args = ["--out", str(out), "--metric", "optimizer", "--eval", "subset:150", "--dtype", "float64", "--option", "iters=60",
            "--option", "tol=1e-10", "--curvature-split", split, "-q"]
    p = _torchrun(2, [arch, *args])
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    got, want = _tables(out), _tables(ref)
    key = next(k for k in want if k[0] == "optimizer")
    a, b = got[key].arrays(), want[key].arrays()
    assert set(a) == set(b) and (b["status"] == 0).all() and len(b["pair"]) == 5
    # data split: sums over ranks in another order, so Lanczos agrees to its float rounding, not bit for bit
    rtol = 1e-10 if split == "pairs" else 1e-8
    for col in b:
        np.testing.assert_allclose(np.asarray(a[col], dtype=np.float64), np.asarray(b[col], dtype=np.float64),
                                   rtol=rtol, atol=1e-12, equal_nan=True, err_msg=f"optimizer.{col}")
