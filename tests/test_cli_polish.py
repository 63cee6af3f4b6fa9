"""Issue 11's CLI polish: lazy help without torch, the workflow in the top-level help, every metric (plug-ins too) in
`analyze --help`, -q for train, info on a results file, subset:N beyond the split, own-loop report labels, provenance
without machine paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import make_mlp, sgd_run, toy_data
from torch.utils.data import RandomSampler, TensorDataset

from test_analysis_plugin import PLUGIN
from test_analysis_support import install_metric_plugin
from trajectory import Recorder, RecordingBatchSampler, Trajectory
from trajectory.analysis import analyze
from trajectory.errors import SgdwalkError
from trajectory.report.labels import format_hyperparameters, hyperparameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the console script's module in a source checkout (cli/) or an installed one (trajectory.cli)
CLI = "import sys; sys.argv[0] = 'sgdwalk'\ntry:\n    from trajectory.cli.main import main\nexcept ImportError:\n    from cli.main import main\n"


def _cli():
    try:
        from trajectory.cli.main import main
    except ImportError:
        from cli.main import main
    return main


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(flag):
    code = CLI + f"try:\n    main(['{flag}'], prog_name='sgdwalk')\nexcept SystemExit:\n    pass\n" \
                 "heavy = [m for m in ('torch', 'h5py', 'numpy', 'matplotlib') if m in sys.modules]\nprint('HEAVY', heavy)"
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    if flag == "--help":
        text = done.stdout
        assert "record -> analyze -> report" in text
        for cmd in ("train", "info", "analyze", "show", "report"):
            assert f"\n  {cmd} " in text


def test_analyze_help_lists_every_builtin_metric_without_importing_torch():
    code = CLI + "try:\n    main(['analyze', '--help'], prog_name='sgdwalk')\nexcept SystemExit:\n    pass\n" \
                 "print('TORCH', 'torch' in sys.modules)"
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stdout, done.stdout[-500:]
    from trajectory.analysis.metric import _BUILTIN, get_metric

    text = "".join(done.stdout.split())  # click wraps lines, also after hyphens
    for name in _BUILTIN:  # each with the description its class carries (read from source, not imported)
        assert name in text and "".join(get_metric(name).description.split()) in text, name


def test_analyze_help_lists_every_metric_including_plugins(tmp_path):
    site = install_metric_plugin(tmp_path / "site", "sgdwalk_midloss", PLUGIN, "midloss", "MidLoss")
    code = CLI + "main(['analyze', '--help'], prog_name='sgdwalk')"
    done = _python(code, env={"PYTHONPATH": os.pathsep.join([str(site), ROOT])})
    assert done.returncode == 0, done.stderr
    for name in ("interpolation", "floor", "geometry", "barriers", "hessian_top", "hessian_trace", "hessian_esd",
                 "sharpness", "midloss"):
        assert f"  {name} " in done.stdout, name
    assert "plug-in sgdwalk_midloss:MidLoss" in done.stdout


def test_train_quiet_prints_nothing_but_json_still_works(tmp_path):
    args = ["train", "--data", "synthetic", "--data-kwargs", '{"num_samples": 64, "input_shape": [8], "num_classes": 3}',
            "--model-kwargs", '{"hidden": [8]}', "--steps", "2", "--batch-size", "16", "--device", "cpu"]
    r = CliRunner().invoke(_cli(), [*args, "--out", str(tmp_path / "a.h5"), "-q"])
    assert r.exit_code == 0 and r.output == "", r.output
    r = CliRunner().invoke(_cli(), [*args, "--out", str(tmp_path / "b.h5"), "-q", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["records"] == 3


@pytest.fixture()
def own_loop(tmp_path):
    """An own training loop recorded as the README shows: no seed, no specs, a RecordingBatchSampler."""
    model = make_mlp()
    x, y = toy_data()
    ds = TensorDataset(x, y)
    tracker = RecordingBatchSampler.from_sampler(RandomSampler(ds), batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    path = tmp_path / "run.h5"
    with Recorder(path, model, optimizer=opt, indices=tracker) as rec:
        for step, (xb, yb) in enumerate(torch.utils.data.DataLoader(ds, batch_sampler=tracker)):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(loss=loss)
            if step == 3:
                break
    return path, ds


def test_own_loop_labels_show_what_was_recorded(own_loop):
    path, ds = own_loop
    with Trajectory(path) as traj:
        attrs = traj.attrs
        assert attrs["metadata"]["batch_size"] == 16  # from the sampler
        assert not os.path.isabs(attrs["argv"][0]) and "/" not in attrs["argv"][0]
    label = format_hyperparameters(hyperparameters(dict(attrs)))
    assert label == "lr=0.05 b=16 mom=0 wd=0 model=Sequential", label
    assert "seed=-1" not in label and "data=" not in label


def test_info_on_a_results_file_says_what_it_is(own_loop, tmp_path):
    path, ds = own_loop
    out = tmp_path / "run.results.h5"
    analyze(path, out, model=make_mlp(), data=ds, metrics=["interpolation"], eval="subset:100")
    r = CliRunner().invoke(_cli(), ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{out} is an sgdwalk results file") and "interpolation" in r.output
    r = CliRunner().invoke(_cli(), ["info", str(out), "--json"])
    assert json.loads(r.output)["kind"] == "results"


def test_subset_larger_than_the_split_is_refused(own_loop, tmp_path):
    path, ds = own_loop
    with pytest.raises(SgdwalkError, match=r"subset:500 asks for more samples than the training split holds \(128\)"):
        analyze(path, tmp_path / "r.h5", model=make_mlp(), data=ds, metrics=["interpolation"], eval="subset:500")
    assert not (tmp_path / "r.h5").exists()
