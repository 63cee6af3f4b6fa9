"""`sgdwalk report`: figures and the self-contained HTML page from results files.

Numbers on the page are checked against numpy on the raw HDF5 arrays (h5py, not the report's loader); the page is
checked to reference embedded content only, and rendered by a headless Chromium where one is installed.
"""
from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from trajectory.analysis import ResultsFile, analyze
from trajectory.report import (
    ReportError,
    barriers_figure,
    build_report,
    curvature_figure,
    default_report_dir,
    dynamics_figure,
    interpolation_figure,
    load_runs,
    parse_formats,
    parse_window,
    run_summary,
)
from trajectory.report.fig_interpolation import joined_curve, window_rows

try:
    from trajectory.cli.report import report as report_cmd
except ImportError:
    from cli.report import report as report_cmd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "mnist1d_mlp.h5"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"
RUNS = {"a": (0.1, 32), "b": (0.3, 32), "c": (0.1, 64)}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sample_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "mnist1d_mlp.results.h5"
    analyze(SAMPLE, out, steps="0:40", eval="subset:500", device="cpu")
    return out


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Three tiny recorded runs that differ in lr and batch size, analysed; run a also has hessian_top rows."""
    from trajectory.training import train

    d = tmp_path_factory.mktemp("multi")
    paths = {}
    for name, (lr, batch) in RUNS.items():
        arch = d / f"{name}.h5"
        train("mlp", "mnist1d", model_kwargs={"hidden": [16]}, data_kwargs={"num_samples": 600, "seed": 3}, lr=lr,
              batch_size=batch, steps=12, out=arch, progress=False, device="cpu")
        res = d / f"{name}.results.h5"
        analyze(arch, res, eval="subset:200", spans="1,2", device="cpu")
        paths[name] = res
    analyze(d / "a.h5", paths["a"], metrics=["hessian_top", "update_alignment"], steps="0:12:4", eval="subset:200",
            device="cpu", options={"iters": 20, "k": 2})
    return paths


def _group(f: h5py.File, metric: str) -> h5py.Group:
    (g,) = f["metrics"][metric].values()  # one configuration in these files
    return g


class _Refs(html.parser.HTMLParser):
    """Every src/href on the page, <link>/<script> tags, and the summary table as {row label: [cells]}."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.links: list[dict] = []
        self.scripts: list[dict] = []
        self.imgs = 0
        self.rows: dict[str, list[str]] = {}
        self._table = 0
        self._summary = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "srcset", "poster", "data"):
            if key in a:
                self.refs.append(a[key] or "")
        if tag == "link":
            self.links.append(a)
        if tag == "script":
            self.scripts.append(a)
        if tag == "img":
            self.imgs += 1
        if tag == "table":
            self._summary = "summary" in (a.get("class") or "")
        if tag == "tr" and self._summary:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row:
            self.rows[self._row[0]] = self._row[1:]
            self._row = None
        if tag == "table":
            self._summary = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(path) -> _Refs:
    p = _Refs()
    p.feed(Path(path).read_text(encoding="utf-8"))
    return p


def _assert_self_contained(page: _Refs) -> None:
    assert page.refs, "the page should embed its figures"
    for ref in page.refs:
        assert ref.startswith("data:") or ref.startswith("#"), ref
    assert not page.links and not page.scripts


def _assert_figure_files(files, names, formats=("png", "pdf")):
    for name in names:
        for fmt in formats:
            path = Path(files[0]).parent / f"{name}.{fmt}"
            data = path.read_bytes()
            assert len(data) > 1000, path
            assert data.startswith(PNG_MAGIC if fmt == "png" else PDF_MAGIC), path


# ------------------------------------------------------------------------------------------ tests
def test_sample_report_numbers_match_the_file(sample_results, tmp_path):
    res = build_report([sample_results], tmp_path / "rep")
    names = ["interpolation", "dynamics", "barriers"]
    assert sorted(res.figures) == sorted(names)
    _assert_figure_files(res.files, names)
    assert Path(res.html).name == "report.html" and set(res.files) == {str(p) for p in (tmp_path / "rep").iterdir()}
    assert "curvature" in res.omitted  # the sample has no curvature metrics: omitted, with a note, no crash
    page = _parse(res.html)
    _assert_self_contained(page)
    assert page.imgs == 3
    text = Path(res.html).read_text()
    assert "Curvature over training: omitted" in text
    assert "lr=0.1 b=64" in text  # label from the archive's provenance
    assert "mnist1d_mlp.h5" in text and "--hidden" not in text and "hidden" in text  # provenance: specs, argv

    with h5py.File(sample_results, "r") as f:
        fl, geo, ba = _group(f, "floor"), _group(f, "geometry"), _group(f, "barriers")
        ok = ~fl["nonfinite"][()]
        expect = {
            "pairs analysed": str(len(fl["pair"])),
            "optimizer steps covered": f"{fl['step_a'][()].min()}–{fl['step_b'][()].max()}",
            "fraction convex with interior floor": f"{fl['convex_interior'][()][ok].mean():.3f}",
            "median a* (floor position, 0 = θ_t, 1 = θ_t+1)": f"{np.median(fl['a_star'][()][ok]):.4g}",
            "median height above floor (nats)": f"{np.median(fl['height'][()][ok]):.4g}",
            "mean height above floor (nats)": f"{np.mean(fl['height'][()][ok]):.4g}",
            "barrier fraction, span 1": f"{ba['has_barrier'][()][ba['span'][()] == 1].mean():.3f}",
            "final ‖θ − θ₀‖₂": f"{geo['dist_init_b'][()][-1]:.4g}",
            "median step length ‖θ_t+1 − θ_t‖₂": f"{np.median(geo['step_length'][()]):.4g}",
            "median cos(consecutive updates)": f"{np.nanmedian(geo['cos_prev'][()]):.4g}",
        }
        assert len(fl["pair"]) == 40
        # the final distance is ‖θ_40 − θ_0‖, the last record's: recompute it from the archive itself
        from trajectory import Trajectory

        with Trajectory(SAMPLE) as traj:
            d = float(np.linalg.norm(traj.params(40).double().numpy() - traj.params(0).double().numpy()))
        assert geo["dist_init_b"][()][-1] == pytest.approx(d, rel=1e-9)
    for label, value in expect.items():
        assert page.rows[label] == [value], label
    s = run_summary(load_runs([sample_results])[0])
    assert s["pairs"] == 40 and s["step_first"] == 0 and s["step_last"] == 40


def test_multi_run_labels_overlays_and_curvature(multi, tmp_path):
    paths = [multi[k] for k in "abc"]
    res = build_report(paths, tmp_path / "cmp", formats="png,svg", title="three <runs>")  # PDFs: the sample test
    assert {"interpolation", "dynamics", "barriers", "curvature"} <= set(res.figures)
    _assert_figure_files(res.files, ["interpolation", "dynamics", "barriers", "curvature"], ("png",))
    assert Path(tmp_path / "cmp" / "curvature.svg").read_text().lstrip().startswith("<?xml")
    labels = [r.label for r in res.runs]
    assert labels == ["lr=0.1 b=32", "lr=0.3 b=32", "lr=0.1 b=64"]  # only what differs; seed, steps... do not
    for r, (lr, batch) in zip(res.runs, RUNS.values()):
        assert f"lr={lr:g} b={batch}" in r.full_label and "seed=0" in r.full_label and "steps=12" in r.full_label
    text = Path(res.html).read_text()
    assert "<title>three &lt;runs&gt;</title>" in text  # escaped
    page = _parse(res.html)
    _assert_self_contained(page)
    assert page.rows["quantity"] == labels
    assert any("no hessian_top / hessian_trace / sharpness / update_alignment rows in lr=0.3 b=32, lr=0.1 b=64" in n for n in res.notes)
    # λ_max range and barrier fractions per span against h5py
    with h5py.File(multi["a"], "r") as f:
        lam = _group(f, "hessian_top")["lambda_max"][()]
        assert len(lam) == 3
        eos = _group(f, "hessian_top")["eos_ratio"][()]
        assert np.allclose(eos, lam * 0.1 / 2)
    assert page.rows["λ_max range (min – max)"] == [f"{lam.min():.4g} – {lam.max():.4g}", "–", "–"]
    for k in (1, 2):
        cells = []
        for name in "abc":
            with h5py.File(multi[name], "r") as f:
                g = _group(f, "barriers")
                sel = (g["span"][()] == k) & ~g["nonfinite"][()]
                cells.append(f"{g['has_barrier'][()][sel].mean():.3f}")
        assert page.rows[f"barrier fraction, span {k}"] == cells
    # figure functions work on paths or loaded runs and return Figures (no pyplot)
    from matplotlib.figure import Figure

    runs = load_runs(paths)
    for fn in (dynamics_figure, barriers_figure, curvature_figure):
        assert isinstance(fn(runs), Figure)
    # the alignment panel: run a's top-2 share per record, and the random-direction baseline sqrt(k/n) dotted
    ax = next(a for a in curvature_figure(runs).axes if "top-2 Hessian eigenspace" in a.get_title(loc="left"))
    with h5py.File(multi["a"], "r") as f:
        share = _group(f, "update_alignment")["top_fraction"][()]
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    assert any(len(y) == len(share) and np.allclose(y, share) for y in ys)
    n_params = 40 * 16 + 16 + 16 * 10 + 10
    assert any(np.allclose(y, np.sqrt(2 / n_params)) for y in ys)
    fig = interpolation_figure([str(p) for p in paths], "2:6")
    assert len(fig.axes) == 3 and all(ax.get_xlim() == (2.0, 6.0) for ax in fig.axes)
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_missing_and_empty_metrics_are_omitted_not_fatal(multi, tmp_path):
    # geometry only: dynamics without the floor panels, the other figures omitted with notes
    out = tmp_path / "geo.results.h5"
    analyze(multi["b"].with_name("b.h5"), out, metrics=["geometry"], device="cpu")
    res = build_report([out], tmp_path / "geo", formats="png")
    assert list(res.figures) == ["dynamics"]
    assert {"interpolation", "barriers", "curvature"} <= set(res.omitted)
    text = Path(res.html).read_text()
    assert "Loss along consecutive updates: omitted" in text and "loss and height panels omitted" in text
    # a hand-written file: no provenance, an empty floor table, geometry rows with a recorded lr
    crafted = tmp_path / "old.results.h5"
    store = ResultsFile(crafted, "a", archive_id="0" * 64, archive_info={"archive_path": "/elsewhere/old.h5"})
    store.table("floor", {"metric": "floor", "options": {}}, ["pair"])
    geo = store.table("geometry", {"metric": "geometry", "options": {}}, ["pair"])
    for i in range(5):
        geo.add((i,), i, i + 1, {"step_length": 0.1 * (i + 1), "dist_init": 0.1 * i, "dist_init_b": 0.1 * (i + 1),
                                 "cos_prev": np.nan if i == 0 else 0.5, "lr": 0.05}, run=1)
    store.close()
    res = build_report([crafted, multi["c"]], tmp_path / "mixed", formats="png")
    run = res.runs[0]
    assert run.hyper["lr"] == 0.05 and "floor" not in run.metrics
    assert res.runs[0].label != res.runs[1].label and "lr=0.05" in res.runs[0].label
    text = Path(res.html).read_text()
    assert "no archive_provenance" in text and "floor: the table is empty" in text
    s = run_summary(run)
    assert s["final_dist_init"] == pytest.approx(0.5) and s["median_step_length"] == pytest.approx(0.3)
    assert s["median_cos_prev"] == pytest.approx(0.5) and "median_height" not in s


def test_config_selection_rule(multi, tmp_path):
    path = tmp_path / "two.results.h5"
    shutil.copy(multi["c"], path)
    analyze(multi["c"].with_name("c.h5"), path, eval="subset:100", steps="0:5", device="cpu")
    (run,) = load_runs([path])
    assert run.metrics["floor"].eval == "subset:200" and run.metrics["floor"].rows == 12  # most rows
    assert run.metrics["interpolation"].hash == run.metrics["floor"].config["requires"]["interpolation"]
    assert [d for _, d, _ in run.unused["floor"]] and run.unused["floor"][0][2] == 5
    (small,) = load_runs([path], eval="subset:100")
    assert small.metrics["floor"].rows == 5 and small.metrics["barriers"].eval == "subset:100"
    assert small.metrics["interpolation"].hash == small.metrics["floor"].config["requires"]["interpolation"]
    h = small.metrics["floor"].hash
    (pinned,) = load_runs([path], configs=[h[:8]])
    assert pinned.metrics["floor"].hash == h
    with pytest.raises(ReportError, match="--config"):
        load_runs([path], configs=["ffffffffffff"])
    text = Path(build_report([path], tmp_path / "two", formats="png").html).read_text()
    assert "Other configurations in the file, not used" in text


def test_options_and_helpers(tmp_path):
    assert parse_window("3:9") == (3, 9) and parse_window("100:") == (100, None) and parse_window(None) is None
    for bad in ("9:3", "a:b", "1:2:3"):
        with pytest.raises(ReportError):
            parse_window(bad)
    assert parse_formats("PNG, svg") == ("png", "svg")
    with pytest.raises(ReportError):
        parse_formats("png,gif")
    steps_a, steps_b = np.arange(0, 100), np.arange(1, 101)
    assert window_rows(steps_a, steps_b, None, 50).tolist() == list(range(50, 100))  # the last 50 pairs
    assert window_rows(steps_a, steps_b, (10, 13)).tolist() == [10, 11, 12]
    x, y = joined_curve(np.array([0, 1, 5]), np.array([1, 2, 6]), np.array([0.0, 0.5, 1.0]), np.ones((3, 3)))
    assert x[:6].tolist() == [0, 0.5, 1, 1, 1.5, 2] and np.isnan(x[6]) and x[7:].tolist() == [5, 5.5, 6]
    assert default_report_dir("/x/run.results.h5") == "/x/run.report"
    assert default_report_dir("/x/other.h5") == "/x/other.report"
    with pytest.raises(Exception, match="no such results file"):
        build_report([tmp_path / "missing.results.h5"], tmp_path / "r")
    with pytest.raises(Exception, match="not an sgdwalk results file"):
        build_report([SAMPLE], tmp_path / "r")


def test_progress(sample_results, tmp_path, capsys):
    calls = []
    build_report(sample_results, tmp_path / "p1", formats="png", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    build_report(sample_results, tmp_path / "p2", formats="png", progress=True)
    err = capsys.readouterr().err
    assert "report" in err and "3/3" in err and "figure" in err


def test_cli(sample_results, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(report_cmd, [str(sample_results), "-o", str(out), "--window", "10:30", "--format", "png"])
    assert r.exit_code == 0, r.output
    assert "report.html" in r.output and (out / "interpolation.png").exists() and not (out / "interpolation.pdf").exists()
    assert "note: Curvature over training: omitted" in r.output
    default = CliRunner().invoke(report_cmd, [str(sample_results), "--format", "png", "-q"])
    assert default.exit_code == 0 and (sample_results.parent / "mnist1d_mlp.report" / "report.html").exists()
    for args, msg in (([str(tmp_path / "nope.results.h5")], "no such results file"),
                      ([str(SAMPLE)], "not an sgdwalk results file"),
                      ([str(sample_results), "--window", "5:1"], "--window"),
                      ([str(sample_results), "--format", "gif"], "gif"),
                      ([str(tmp_path)], "is a directory")):
        bad = CliRunner().invoke(report_cmd, args + ["-o", str(tmp_path / "bad")])
        assert bad.exit_code == 2, (args, bad.output)
        lines = bad.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], bad.output


def test_report_command_is_registered():
    try:
        from trajectory.cli.main import main
    except ImportError:
        from cli.main import main
    assert "report" in main.commands


def test_import_trajectory_stays_cheap():
    code = ("import sys, trajectory; assert 'matplotlib' not in sys.modules; "
            "f = trajectory.build_report; assert 'matplotlib' in sys.modules; print(f.__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "build_report", out.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _chromium(args, tmp_path, timeout=90):
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run(base + args, capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_headless_chromium_renders_the_page(multi, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("SGDWALK_REQUIRE_CHROMIUM"):  # .ci/run installs it: a missing browser must fail CI
            pytest.fail("SGDWALK_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium is not installed")
    res = build_report([multi[k] for k in "abc"], tmp_path / "page", formats="png")
    url = Path(res.html).resolve().as_uri()
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,2000", url], tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    colors = np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colors) > 50 and img.std() > 0.05  # text, table rules and a figure: not a blank page
    dom = _chromium(["--dump-dom", url], tmp_path).stdout.decode("utf-8", "replace")
    assert "fraction convex with interior floor" in dom and "lr=0.3 b=32" in dom
    assert dom.count('src="data:image/png;base64,') == len(res.figures)


def test_per_update_panels_never_bridge_gaps_between_recorded_windows(sample_results, tmp_path):
    """Windows of dense records separated by gaps (the paper's protocol): no line crosses a gap, and pairs that
    span several optimizer steps (chords between sparse records) are left out of the per-update panels."""
    from trajectory.report import dynamics_figure, load_run
    from trajectory.report.plotting import contiguous_runs

    assert contiguous_runs(np.array([0, 1, 2, 10, 11]), np.array([1, 2, 3, 11, 12])) == [slice(0, 3), slice(3, 5)]
    assert contiguous_runs(np.array([]), np.array([])) == []
    run = load_run(sample_results)
    keep = np.r_[0:15, 25:40]  # two windows of single updates with a gap of 10 steps between them
    for name in ("floor", "geometry"):
        m = run.metrics[name]
        m.arrays = {k: v[keep] for k, v in m.arrays.items()}
    m = run.metrics["geometry"]  # plus one chord spanning steps 15..25
    m.arrays = {k: np.insert(v, 15, v[15]) for k, v in m.arrays.items()}
    m.arrays["step_a"][15], m.arrays["step_b"][15] = 15, 25
    fig = dynamics_figure([run])
    checked = 0
    for ax in fig.axes:
        title = ax.get_title(loc="left")
        if "Step length" not in title and "Height" not in title:
            continue
        checked += 1
        for line in ax.get_lines():
            x = np.asarray(line.get_xdata(), dtype=float)
            if len(x) > 1:
                assert not ((x[:-1] < 15) & (x[1:] >= 25)).any(), title  # nothing spans the gap
                assert not np.isin(15, x)  # the chord is not an update
    assert checked == 2


def test_barrier_dips_floor_peaks_and_split_heights_are_drawn_and_tabled(sample_results, tmp_path):
    """Issue 13: −dip below the barrier axis, floor-sequence peaks with their prominence, interior heights apart
    from descent steps (figure data and page rows against h5py and a brute-force peak loop)."""
    from test_barriers_rich import _peaks_brute
    from trajectory.report import load_run

    res = build_report([sample_results], tmp_path / "rep")
    page = _parse(res.html)
    with h5py.File(sample_results, "r") as f:
        fl, ba = _group(f, "floor"), _group(f, "barriers")
        ok = ~fl["nonfinite"][()]
        inner = fl["interior"][()] & ok
        h = fl["height"][()]
        sel = (ba["span"][()] == 1) & ~ba["nonfinite"][()]
        dip1 = ba["dip"][()][sel]
        assert page.rows["dip fraction, span 1"] == [f"{ba['has_dip'][()][sel].mean():.3f}"]
        assert page.rows["median dip, span 1 (nats)"] == [f"{np.median(dip1):.4g}"]
        assert page.rows["descent steps (floor at an end)"] == [str(int((ok & ~inner).sum()))]
        assert page.rows["median loss decrease of descent steps (nats)"] == [f"{np.median(h[ok & ~inner]):.4g}"]
        if inner.any():
            assert page.rows["median height above an interior floor (nats)"] == [f"{np.median(h[inner]):.4g}"]

    run = load_run(sample_results)
    # a known floor sequence and interior pattern: peaks at pairs 1 and 3 (prominences 2, 0.5), then repeated
    m = run.metrics["floor"]
    n = m.rows
    seq = np.resize([0.0, 2.0, 1.0, 1.5], n)
    m.arrays["floor_loss"] = seq.copy()
    m.arrays["interior"] = np.arange(n) % 3 == 0
    fig = barriers_figure([run])
    bar_ax = next(a for a in fig.axes if "−dip" in a.get_title(loc="left"))
    dips = [line for line in bar_ax.get_lines() if line.get_gid() == "dip"]
    ys = {tuple(np.round(line.get_ydata(), 12)) for line in dips}
    assert tuple(np.round(-dip1, 12)) in ys
    floor_ax = next(a for a in fig.axes if "peaks" in a.get_title(loc="left"))
    (marks,) = [line for line in floor_ax.get_lines() if line.get_gid() == "floor_peaks"]
    idx, prom = _peaks_brute(seq)
    steps = np.asarray(m["step_a"], dtype=float)
    np.testing.assert_array_equal(marks.get_xdata(), steps[idx])
    np.testing.assert_array_equal(marks.get_ydata(), seq[idx])
    (bars,) = [c for c in floor_ax.collections if c.get_gid() == "prominence"]
    np.testing.assert_allclose([seg[1, 1] - seg[0, 1] for seg in bars.get_segments()], prom)
    frac_ax = next(a for a in fig.axes if "dip (hatched)" in a.get_title(loc="left"))
    assert any(p.get_gid() == "dip_fraction" for p in frac_ax.containers[1].patches)

    dyn = dynamics_figure([run])
    h = np.asarray(m["height"], dtype=float)
    for title, mask in (("interior valley floor", m.arrays["interior"]), ("Descent steps", ~m.arrays["interior"])):
        ax = next(a for a in dyn.axes if title in a.get_title(loc="left"))
        thin = ax.get_lines()[0]  # the per-update line, NaN outside the selected pairs
        y = np.asarray(thin.get_ydata(), dtype=float)
        np.testing.assert_array_equal(np.isfinite(y), mask & np.isfinite(h))
        np.testing.assert_allclose(y[mask], h[mask])
