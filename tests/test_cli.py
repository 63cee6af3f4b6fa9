"""The sgdwalk command line: train and info, schedules, exit codes, one-line errors, a real subprocess."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trajectory import Recorder, Trajectory

ROOT = Path(__file__).resolve().parents[1]
DATA_KW = json.dumps({"num_samples": 1000})


def _import_cli():
    """``trajectory.cli.main``; in a source checkout that was not pip-installed, map cli/ like pyproject does."""
    try:
        return importlib.import_module("trajectory.cli.main")
    except ModuleNotFoundError as err:
        if err.name != "trajectory.cli":
            raise
    spec = importlib.util.spec_from_file_location(
        "trajectory.cli", ROOT / "cli" / "__init__.py", submodule_search_locations=[str(ROOT / "cli")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["trajectory.cli"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("trajectory.cli.main")


main = _import_cli().main


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output + (result.stderr if hasattr(result, "stderr") else "")
    return result


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--data-kwargs", DATA_KW, "--model-kwargs", '{"hidden": [8]}', "--batch-size", "32",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def error_line(result) -> str:
    """The whole stderr of a failed command: exactly one line starting with 'error: ', no traceback."""
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version_and_help():
    assert "sgdwalk 0.1.0" in run("--version").output
    out = run("--help").output
    assert "train" in out and "info" in out
    assert "--record" in run("train", "--help").output


def test_train_then_info(tmp_path):
    out = tmp_path / "run.h5"
    result = run(*train_args(out, "--steps", "6"))
    assert "7 records" in result.output
    with Trajectory(out) as traj:
        assert traj.steps.tolist() == list(range(7))
        assert len(traj.batch_indices(5)) == 32
    text = run("info", out).output
    for expected in ("records", "7 (steps 0 to 6)", "every step", "lossless", "closed cleanly", "yes",
                     "6 of 6 single-step pairs replayable", "scalar loss", "trajectory.zoo.models:mlp", "seed"):
        assert expected in text, expected


def test_train_json_summary(tmp_path):
    out = tmp_path / "run.h5"
    summary = json.loads(run(*train_args(out, "--steps", "3", "--json")).output)
    assert (summary["start_step"], summary["final_step"], summary["records"]) == (0, 3, 4)
    assert summary["out"] == str(out) and summary["device"] == "cpu" and summary["interrupted"] is False
    assert summary["model_spec"]["kwargs"] == {"hidden": [8], "in_features": 40, "num_classes": 10}
    assert summary["final_loss"] > 0


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        ("every:5", 12, [0, 5, 10]),
        ("pairs:0,7", 12, [0, 1, 7, 8]),
        ("pairs-every:5", 12, [0, 1, 5, 6, 10, 11]),
        ("window:0-3:1,3-:4", 12, [0, 1, 2, 3, 7, 11]),
        ("steps:2,12", 12, [2, 12]),
    ],
)
def test_record_schedules_record_exactly_the_promised_steps(tmp_path, schedule, steps, expected):
    out = tmp_path / "run.h5"
    run(*train_args(out, "--steps", str(steps), "--record", schedule))
    with Trajectory(out) as traj:
        assert traj.steps.tolist() == expected
        # every recorded state that has a successor update carries that update's minibatch
        for i, s in enumerate(expected):
            assert len(traj.batch_indices(i)) == (32 if s < steps else 0)


def test_existing_out_needs_overwrite_or_append(tmp_path):
    out = tmp_path / "run.h5"
    run(*train_args(out, "--steps", "3"))
    line = error_line(run(*train_args(out, "--steps", "3"), code=2))
    assert "already exists" in line and "--overwrite" in line
    run(*train_args(out, "--steps", "2", "--overwrite"))
    with Trajectory(out) as traj:
        assert len(traj) == 3
    run(*train_args(out, "--steps", "5", "--append"))
    with Trajectory(out) as traj:
        assert traj.steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert "exclude" in error_line(run(*train_args(out, "--overwrite", "--append"), code=2))


def test_cifar10_missing_data_dir_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    line = error_line(run("train", "--model", "cnn", "--data", "cifar10", "--no-progress", "--out", tmp_path / "c.h5", code=2))
    assert "CIFAR-10" in line and "--data-dir" in line
    line = error_line(run("train", "--model", "cnn", "--data", "cifar10", "--data-dir", tmp_path, "--no-progress",
                          "--out", tmp_path / "c.h5", code=2))
    assert "CIFAR-10 not found" in line
    assert not (tmp_path / "c.h5").exists()


def test_cifar10_standin_through_the_cli(tmp_path, monkeypatch):
    from trajectory.zoo.data import write_cifar10_standin

    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    write_cifar10_standin(tmp_path / "data", n_train=40, n_test=10)
    out = tmp_path / "c.h5"
    run("train", "--model", "cnn", "--model-kwargs", '{"width": 4}', "--data", "cifar10", "--data-dir", tmp_path / "data",
        "--steps", "3", "--batch-size", "8", "--record", "every", "--no-progress", "--device", "cpu", "--out", out)
    info = json.loads(run("info", out, "--json").output)
    assert info["records"] == 4 and info["data_spec"]["target"] == "trajectory.zoo.data:cifar10"
    assert info["model_spec"]["kwargs"]["in_channels"] == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model-kwargs", "{bad"], "--model-kwargs is not valid JSON"),
        (["--data-kwargs", "[1, 2]"], "--data-kwargs must be a JSON object"),
        (["--record", "sometimes"], "bad schedule"),
        (["--lr", "-1"], "lr must be"),
        (["--codec", "nope"], "unknown codec"),
        (["--model", "nosuchnet"], "unknown model"),
        (["--lr-drop", "10"], "STEP:FACTOR"),
    ],
)
def test_bad_options_print_one_error_line_and_exit_2(tmp_path, args, fragment):
    out = tmp_path / "run.h5"
    line = error_line(run(*train_args(out, "--steps", "2"), *args, code=2))
    assert fragment in line
    assert not out.exists()


def test_info_errors_exit_2(tmp_path):
    assert "no such archive" in error_line(run("info", tmp_path / "missing.h5", code=2))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    assert "error: " in error_line(run("info", junk, code=2))


def test_info_json_fields(tmp_path):
    out = tmp_path / "run.h5"
    run(*train_args(out, "--steps", "4", "--seed", "7", "--lr", "0.05"))
    info = json.loads(run("info", out, "--json").output)
    expected_keys = {
        "path", "format", "format_version", "records", "first_step", "last_step", "schedule", "parameters", "buffers",
        "file_bytes", "raw_bytes", "row_bytes", "compression_ratio", "codec", "lossy", "closed_cleanly", "nonfinite",
        "batches", "scalars", "model_spec", "data_spec", "optimizer", "seed", "versions", "created", "metadata",
    }
    assert expected_keys <= set(info)
    assert info["format"] == "sgdwalk-trajectory" and info["format_version"] == 1
    assert (info["records"], info["first_step"], info["last_step"]) == (5, 0, 4)
    assert info["schedule"] == {"kind": "every", "k": 1, "start": 0}
    assert info["parameters"] == 40 * 8 + 8 + 8 * 10 + 10
    assert info["buffers"] == {"float": 0, "int": 0}
    assert info["raw_bytes"] == 5 * info["parameters"] * 4
    assert info["file_bytes"] == os.path.getsize(out)
    assert info["compression_ratio"] == pytest.approx(info["raw_bytes"] / info["file_bytes"], rel=1e-2)
    assert info["lossy"] is False and info["closed_cleanly"] is True
    assert info["nonfinite"] == {"records": 0, "first_step": None, "values": 0}
    assert info["batches"] == {"records_with_batch": 4, "single_step_pairs": 4, "replayable_pairs": 4}
    assert set(info["scalars"]) == {"loss", "accuracy", "lr"}
    assert info["scalars"]["lr"]["first"] == pytest.approx(0.05) and info["scalars"]["loss"]["count"] == 4
    assert info["model_spec"]["kwargs"] == {"hidden": [8], "in_features": 40, "num_classes": 10}
    assert info["data_spec"] == {"target": "trajectory.zoo.data:mnist1d", "kwargs": {"num_samples": 1000}}
    assert info["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert info["seed"] == 7
    assert info["versions"]["sgdwalk"] == "0.1.0" and "torch" in info["versions"]
    assert info["metadata"]["batch_size"] == 32


def test_info_shows_bn_buffers(tmp_path):
    out = tmp_path / "bn.h5"
    run("train", "--model", "mlp_bn", "--model-kwargs", '{"hidden": [8]}', "--data-kwargs", DATA_KW, "--steps", "2",
        "--batch-size", "32", "--no-progress", "--out", out)
    info = json.loads(run("info", out, "--json").output)
    assert info["buffers"] == {"float": 16, "int": 1}


def test_info_marks_lossy_archives(tmp_path):
    out = tmp_path / "lossy.h5"
    run(*train_args(out, "--steps", "3", "--codec", "bf16-blosc-zstd-bit"))
    text = run("info", out).output
    assert text.splitlines()[0].startswith("!! LOSSY ARCHIVE")
    assert "(LOSSY)" in text
    assert json.loads(run("info", out, "--json").output)["lossy"] is True
    lossless = tmp_path / "lossless.h5"
    run(*train_args(lossless, "--steps", "3"))
    assert "LOSSY" not in run("info", lossless).output


def test_info_flags_records_with_nan(tmp_path):
    out = tmp_path / "nan.h5"
    model = torch.nn.Linear(4, 2)
    with Recorder(out, model) as rec:
        for s in range(5):
            with torch.no_grad():
                model.weight.add_(0.01)
                if s == 2:
                    model.bias[1] = float("nan")
            rec.record(loss=float("nan") if s >= 2 else 1.0)
    info = json.loads(run("info", out, "--json").output)
    assert info["nonfinite"]["records"] == 3 and info["nonfinite"]["first_step"] == 3
    assert info["scalars"]["loss"]["last"] is None and info["scalars"]["loss"]["nonfinite"] == 3
    text = run("info", out).output
    assert "NON-FINITE VALUES: 3 record(s) contain NaN/Inf, the first at step 3" in text
    assert info["records"] == 6


def test_train_flags_a_diverging_run(tmp_path):
    out = tmp_path / "div.h5"
    result = run(*train_args(out, "--steps", "5", "--lr", "1e30"))
    assert "NaN/Inf" in result.stderr
    assert json.loads(run("info", out, "--json").output)["nonfinite"]["records"] >= 1


def test_ctrl_c_during_training_leaves_a_readable_archive(tmp_path, monkeypatch):
    import trajectory.training as training

    calls = {"n": 0}
    real = training.F.cross_entropy

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the 4th update: 3 updates done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training.F, "cross_entropy", interrupting)
    out = tmp_path / "run.h5"
    result = run(*train_args(out, "--steps", "100"), code=130)
    assert "interrupted after 3 steps" in result.stderr and "holds 4 records" in result.stderr
    monkeypatch.undo()
    with Trajectory(out) as traj:
        assert traj.closed_cleanly and traj.steps.tolist() == [0, 1, 2, 3]
        assert len(traj.batch_indices(2)) == 32
    run(*train_args(out, "--steps", "6", "--append"))  # and the run resumes
    with Trajectory(out) as traj:
        assert traj.steps.tolist() == list(range(7))


def _installed() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import trajectory.cli.main"], capture_output=True, cwd=ROOT)
    return probe.returncode == 0


def test_python_dash_m_in_a_real_subprocess(tmp_path):
    if not _installed():
        pytest.skip("trajectory.cli is importable only after `pip install -e .` (pyproject maps cli/ to trajectory.cli)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run.h5"
    cmd = [sys.executable, "-m", "trajectory.cli"]
    done = subprocess.run([*cmd, *train_args(out, "--steps", "3", "--record", "pairs:1")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    info = subprocess.run([*cmd, "info", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["records"] == 2 and data["first_step"] == 1 and data["last_step"] == 2
    assert data["batches"]["replayable_pairs"] == 1
    again = subprocess.run([*cmd, *train_args(out, "--steps", "3")], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and len(again.stderr.strip().splitlines()) == 1
    assert "Traceback" not in again.stderr


def test_shipped_sample_archive_is_what_the_readme_promises():
    sample = ROOT / "sample_data" / "mnist1d_mlp.h5"
    assert sample.stat().st_size <= 8 * 2**20
    info = json.loads(run("info", sample, "--json").output)
    assert info["records"] == 301 and (info["first_step"], info["last_step"]) == (0, 300)
    assert info["lossy"] is False and info["closed_cleanly"] is True
    assert info["nonfinite"]["records"] == 0
    assert info["batches"]["replayable_pairs"] == 300
    assert info["model_spec"] == {"target": "trajectory.zoo.models:mlp",
                                  "kwargs": {"hidden": [32, 32], "in_features": 40, "num_classes": 10}}
    assert info["data_spec"] == {"target": "trajectory.zoo.data:mnist1d", "kwargs": {}}
    assert "301 (steps 0 to 300)" in run("info", sample).output


def test_info_on_an_archive_still_being_written_says_not_closed_cleanly(tmp_path):
    out = tmp_path / "live.h5"
    model = torch.nn.Linear(4, 2)
    rec = Recorder(out, model)
    try:
        for _ in range(3):
            with torch.no_grad():
                model.weight.add_(0.01)
            rec.record(loss=1.0)
        rec.flush()
        info = json.loads(run("info", out, "--json").output)
        assert info["closed_cleanly"] is False and info["records"] == 4
        assert "!! NOT CLOSED CLEANLY" in run("info", out).output
    finally:
        rec.close()
    assert json.loads(run("info", out, "--json").output)["closed_cleanly"] is True
