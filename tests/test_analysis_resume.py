"""Resume: same configuration computes nothing twice; a SIGKILLed run resumes; new spans/metrics add only
what is new; Ctrl-C leaves resumable results; one writer at a time."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from test_analysis_support import record_mlp
from trajectory.analysis import ResultsFile, ResultsLockedError, analyze

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("resume") / "run.h5", steps=24, lr=0.3, seed=4)


def _arrays(out):
    f = ResultsFile(out, "r")
    return {(m, h[:8]): t for (m, h), t in f.tables.items()}


def test_same_configuration_computes_nothing_twice(archive, tmp_path):
    out = tmp_path / "r.h5"
    kw = dict(eval="subset:200", steps="0:8", spans="1")
    first = analyze(archive, out, **kw)
    assert first.computed == {"interpolation": 8, "floor": 8, "geometry": 8, "barriers": 7}
    again = analyze(archive, out, **kw)
    assert sum(again.computed.values()) == 0 and again.reused == first.computed
    # a new span and more pairs: only what is new
    more = analyze(archive, out, **{**kw, "steps": "0:10", "spans": "1,3"})
    assert more.computed == {"interpolation": 2, "floor": 2, "geometry": 2, "barriers": 2 + 7}
    # a different configuration lives side by side
    other = analyze(archive, out, eval="subset:100", steps="0:4", metrics=["interpolation"])
    assert other.computed == {"interpolation": 4}
    f = ResultsFile(out, "r")
    assert len(f.by_metric("interpolation")) == 2
    for t in f.tables.values():
        assert t.rows_computed == len(t)  # every stored row computed exactly once


def test_killed_run_resumes_without_recomputing(archive, tmp_path):
    out = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from trajectory.analysis import analyze
        analyze({archive!r}, {str(out)!r}, eval="subset:200", dtype="float64", spans="1,2", block_pairs=2,
                flush_seconds=0.0, on_block=lambda n: time.sleep(0.25))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.time() + 60
        rows = 0
        while time.time() < deadline:
            if out.exists():
                try:
                    rows = len(ResultsFile(out, "r").by_metric("floor")[0])
                except Exception:
                    rows = 0
            if rows >= 6:
                break
            if proc.poll() is not None:
                pytest.fail("the analysis finished before it could be killed")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = ResultsFile(out, "r")  # readable after SIGKILL
    n_partial = len(partial.by_metric("floor")[0])
    assert 6 <= n_partial < 24
    resumed = analyze(archive, out, eval="subset:200", dtype="float64", spans="1,2")
    assert resumed.reused["floor"] == n_partial
    assert resumed.computed["floor"] == 24 - n_partial
    fresh_out = tmp_path / "fresh.h5"
    analyze(archive, fresh_out, eval="subset:200", dtype="float64", spans="1,2")
    a, b = _arrays(out), _arrays(fresh_out)
    assert a.keys() == b.keys()
    for key in a:
        ta, tb = a[key], b[key]
        assert ta.rows.keys() == tb.rows.keys()
        assert ta.rows_computed == len(ta)  # no stored row was computed twice
        runs = {m[2] for m in ta.meta.values()}
        if key[0] != "barriers" or len(ta) > 0:
            assert runs <= {1, 2}
        for k in ta.rows:
            for col, v in ta.rows[k].items():
                np.testing.assert_allclose(v, tb.rows[k][col], rtol=1e-12, atol=1e-15, err_msg=f"{key} {k} {col}")
    floor_runs = {m[2] for m in a[[k for k in a if k[0] == "floor"][0]].meta.values()}
    assert floor_runs == {1, 2}  # both the killed run and the resumed run contributed rows


def test_interrupt_leaves_resumable_results(archive, tmp_path):
    out = tmp_path / "int.h5"

    def stop(n):
        if n >= 4:
            raise KeyboardInterrupt

    rep = analyze(archive, out, eval="subset:100", metrics=["interpolation"], block_pairs=2, on_block=stop)
    assert rep.interrupted and rep.computed["interpolation"] == 4
    rep2 = analyze(archive, out, eval="subset:100", metrics=["interpolation"])
    assert rep2.reused["interpolation"] == 4 and rep2.computed["interpolation"] == 20


def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "lock.h5"
    first = ResultsFile(out, "a", archive_id="x" * 64)
    try:
        with pytest.raises(ResultsLockedError):
            ResultsFile(out, "a", archive_id="x" * 64)
    finally:
        first.close()
    ResultsFile(out, "a", archive_id="x" * 64).close()


def test_results_carry_the_archives_provenance(archive, tmp_path):
    """Reports label runs by lr and batch size from the results file alone, even after an old file is reopened."""
    import json

    import h5py

    out = tmp_path / "r.h5"
    analyze(archive, out, eval="subset:100", steps="0:2", metrics=["geometry"])
    with h5py.File(out, "r") as f:
        prov = json.loads(f.attrs["archive_provenance"])
    with h5py.File(archive, "r") as a:
        assert prov["metadata"] == json.loads(a.attrs["metadata"])
        assert prov["seed"] == int(a.attrs["seed"])
    # a file written before the attribute existed gains it on a run that computes nothing new
    with h5py.File(out, "a") as f:
        del f.attrs["archive_provenance"]
    again = analyze(archive, out, eval="subset:100", steps="0:2", metrics=["geometry"])
    assert sum(again.computed.values()) == 0
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["archive_provenance"]) == prov
