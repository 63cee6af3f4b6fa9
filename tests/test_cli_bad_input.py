"""Every bad input on the command line, or read from a file, is one `error:` line and exit status 2: no traceback,
limits checked before allocating, echoed values cut, control characters escaped (issue 12, item 8)."""
from __future__ import annotations

import subprocess
import sys

import h5py
import pytest
from click.testing import CliRunner

from test_analysis_support import record_mlp

try:
    from trajectory.cli.main import main
except ImportError:  # pragma: no cover
    from cli.main import main

#: An error line may quote a few cut values; it must never approach the size of the input.
MAX_LINE = 1200
ESC = "\x1b]0;pwned\x07\x1b[31m"
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_SHORT = "[" * 5_000 + "]" * 5_000  # within the spec length limit, far past Python's recursion limit
HUGE = "x" * 1_000_000


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("badcli") / "run.h5", steps=4, lr=0.2, seed=1)


def _run(args: list[str]):
    r = CliRunner().invoke(main, args, catch_exceptions=False)  # an uncaught exception fails the test
    return r, [ln for ln in r.output.splitlines() if ln.strip()]


def _assert_one_error(r, lines):
    assert r.exit_code == 2, (r.exit_code, r.output[:2000])
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, lines[:10]
    assert all(ln.startswith(("error:", "warning:")) for ln in lines), lines[:10]
    assert "Traceback" not in r.output
    assert len(errors[0]) <= MAX_LINE, len(errors[0])
    assert "\x1b" not in r.output and "\x07" not in r.output
    return errors[0]


ANALYZE = {
    "alphas grid too large": (["--alphas", "0:1:100000000"], "limit is"),
    "alphas count with 5000 digits": (["--alphas", "0:1:" + "9" * 5000], "not an integer"),
    "alphas list too long": (["--alphas", ",".join(["0.5"] * 20000)], "limit is"),
    "alphas 1 MB": (["--alphas", HUGE], "limit is"),
    "alphas nan": (["--alphas", "nan,1"], "not finite"),
    "alphas escape": (["--alphas", ESC], "--alphas"),
    "steps 1 MB": (["--steps", HUGE], "limit is"),
    "steps too many items": (["--steps", ",".join(["1"] * 200_000)], "limit is"),
    "steps escape": (["--steps", ESC], "--steps"),
    "spans zero": (["--spans", "0"], "positive"),
    "spans huge": (["--spans", "1,100000000000"], "at most"),
    "eval subset huge": (["--eval", "subset:99999999999"], "subset size"),
    "eval escape": (["--eval", ESC + HUGE], "--eval"),
    "flush-seconds nan": (["--flush-seconds", "nan"], "--flush-seconds"),
    "flush-seconds inf": (["--flush-seconds", "inf"], "--flush-seconds"),
    "flush-seconds negative": (["--flush-seconds", "-1"], "--flush-seconds"),
    "flush-seconds text": (["--flush-seconds", "soon"], "--flush-seconds"),
    "option deep json": (["--option", "k=" + DEEP], "--option"),
    "option no equals": (["--option", ESC], "KEY=VALUE"),
    "model 1 MB target": (["--model", "pkg.mod:" + "f" * 1_000_000], "limit is"),
    "model deep kwargs": (["--model", "mlp " + DEEP_SHORT], "nests"),
    "model escape": (["--model", ESC], "model"),
    "metric escape": (["--metric", "nosuch" + ESC + HUGE], "metric"),
    "model bad kwargs 1 MB": (["--model", "mlp {" + HUGE], "limit is"),
    "k not a number": (["--k", "many"], "--k"),
    "k far too large": (["--metric", "hessian_top", "--k", "100000000"], "option k"),
    "iters far too large": (["--metric", "hessian_top", "--option", "iters=1000000000000"], "option iters"),
    "out in a missing directory": (["--out", "/nonexistent-dir/x/r.h5"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(ANALYZE))
def test_analyze_bad_input(archive, tmp_path, case):
    args, needle = ANALYZE[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "r.h5")]
    r, lines = _run(["analyze", archive, "--metric", "geometry", "--device", "cpu", "-q", *args])
    line = _assert_one_error(r, lines)
    assert needle in line, line
    assert not (tmp_path / "r.h5").exists()  # refused before anything was written


TRAIN = {
    "model-kwargs deep": (["--model-kwargs", DEEP], "nests"),
    "model-kwargs 2 MB": (["--model-kwargs", '{"a": "' + "y" * 2_000_000 + '"}'], "limit is"),
    "model-kwargs escape": (["--model-kwargs", ESC], "--model-kwargs"),
    "model escape": (["--model", ESC + HUGE], "model"),
    "data-kwargs not an object": (["--data-kwargs", "[1, 2]"], "JSON object"),
    "lr not a number": (["--lr", "abc" + ESC], "--lr"),
    "steps not an integer": (["--steps", HUGE], "--steps"),
}


@pytest.mark.parametrize("case", sorted(TRAIN))
def test_train_bad_input(tmp_path, case):
    args, needle = TRAIN[case]
    r, lines = _run(["train", "--steps", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "t.h5"), *args])
    line = _assert_one_error(r, lines)
    assert needle in line, line


def _damaged_copy(archive, tmp_path, mutate) -> str:
    import shutil

    dst = str(tmp_path / "damaged.h5")
    shutil.copy(archive, dst)
    with h5py.File(dst, "r+") as f:
        mutate(f)
    return dst


FILES = {
    "string format_version": lambda f: f.attrs.__setitem__("format_version", "two"),
    "missing steps dataset": lambda f: f.__delitem__("steps"),
    "missing layout dataset": lambda f: f.__delitem__("layout"),
}


@pytest.mark.parametrize("case", sorted(FILES))
@pytest.mark.parametrize("command", ["info", "analyze"])
def test_damaged_archive_is_one_error_line(archive, tmp_path, case, command):
    path = _damaged_copy(archive, tmp_path, FILES[case])
    extra = ["--metric", "geometry", "--device", "cpu", "-q", "--out", str(tmp_path / "r.h5")] if command == "analyze" else []
    r, lines = _run([command, path, *extra])
    _assert_one_error(r, lines)


def test_info_escapes_control_characters_from_the_file(archive, tmp_path):
    def plant(f):
        f.attrs["metadata"] = '{"note": "' + "\\u001b]0;pwned\\u0007\\u001b[2J" + '"}'
        f.attrs["argv"] = "train \x1b[31mred\u202e"

    path = _damaged_copy(archive, tmp_path, plant)
    r, _ = _run(["info", path])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\u202e" not in r.output
    assert "\\x1b" in r.output  # shown, visibly escaped


def test_show_escapes_control_characters_from_the_file(archive, tmp_path):
    from trajectory.analysis import analyze

    out = str(tmp_path / "r.h5")
    analyze(archive, out, metrics=["geometry"], device="cpu", progress=False)
    with h5py.File(out, "r+") as f:
        f.attrs["archive_path"] = "/tmp/\x1b[2Jevil\x07.h5"
    r, _ = _run(["show", out])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "\\x1b[2Jevil" in r.output


def test_a_real_process_prints_one_line_and_no_traceback(archive, tmp_path):
    """The same through the installed entry point: nothing but the error line on stderr."""
    p = subprocess.run([sys.executable, "-m", "trajectory.cli", "analyze", archive, "--alphas", "0:1:100000000",
                        "--out", str(tmp_path / "r.h5"), "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --alphas"), p.stderr
