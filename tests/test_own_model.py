"""Issue 11's five stumbles, replayed: an own BatchNorm CNN and Dataset class, trained in a plain loop with the README's
Recorder + RecordingBatchSampler, then analysed. Each step now works, or fails with one line that says what to do.

1. ``sgdwalk analyze run.h5`` on an archive without a model spec: one line naming --model/--data.
2. ``--model train_own:SmallCNN``: the module is found in the working directory (no PYTHONPATH needed).
3. Importing a training script without a ``__main__`` guard: the Recorder it opens fails with one line (no second
   training run, no "run.h5 already exists").
4. A Dataset class without ``split``/``augment`` parameters is a valid data factory (the training data).
5. No --trust-specs: specs named on the command line are the user's choice. ``./net.py:Net`` paths work too.

Numbers are checked against a float64 loop over the same data (BatchNorm in train mode on batches of bn_batch).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from trajectory import Trajectory
from trajectory.analysis import ResultsFile, analyze

ROOT = Path(__file__).resolve().parents[1]

NET = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset


    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4 * 12, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


    class Digits(Dataset):
        """No split, no augment: just the training data."""

        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.x = torch.randn(96, 1, 12, generator=g)
            self.y = torch.randint(0, 3, (96,), generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])


    def make_data():
        return Digits()
''')

TRAIN = textwrap.dedent('''
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from trajectory import Recorder, RecordingBatchSampler
    {imports}

    {guard}
    {indent}torch.manual_seed(0)
    {indent}dataset = Digits()
    {indent}model = SmallCNN()
    {indent}tracker = RecordingBatchSampler.from_sampler(RandomSampler(dataset), batch_size=16)
    {indent}loader = DataLoader(dataset, batch_sampler=tracker)
    {indent}opt = torch.optim.SGD(model.parameters(), lr=0.1)
    {indent}with Recorder("run.h5", model, optimizer=opt, indices=tracker) as rec:
    {indent}    for x, y in loader:
    {indent}        loss = torch.nn.functional.cross_entropy(model(x), y)
    {indent}        opt.zero_grad()
    {indent}        loss.backward()
    {indent}        opt.step()
    {indent}        rec.record(loss=loss)
''')


def _cli():
    try:
        from trajectory.cli.main import main
    except ImportError:
        from cli.main import main
    return main


def _script(guarded: bool) -> str:
    """train_own.py: the model and data classes defined in the training script itself, as the user had them."""
    body = TRAIN.format(imports="", guard='if __name__ == "__main__":' if guarded else "if True:", indent="    ")
    return NET + body


def _analyze(*args: str):
    return CliRunner().invoke(_cli(), ["analyze", *args, "-q"])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _reference_losses(path: Path, module_globals: dict) -> list[float]:
    """Float64 loop: mean cross-entropy of every record on all 96 samples, BatchNorm in train mode on one batch of all
    96 (the default --bn-batch is 100, more than the data holds: one group)."""
    data = module_globals["Digits"]()
    import copy

    base = module_globals["SmallCNN"]()
    out = []
    with Trajectory(path) as traj:
        for i in range(len(traj)):
            traj.load_into(base, i)
            model = copy.deepcopy(base).double().train()
            total = 0.0
            with torch.no_grad():
                total += float(F.cross_entropy(model(data.x.double()), data.y, reduction="sum"))
            out.append(total / 96)
    return out


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_own.py").write_text(_script(guarded=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "train_own.py"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # the recorder said, once and at start, how to make the archive analysable
    assert done.stderr.count("SmallCNN is defined in the running script") == 1, done.stderr
    assert "model_spec='train_own:SmallCNN'" in done.stderr and "--model ./train_own.py:SmallCNN" in done.stderr
    return tmp_path


def test_five_stumbles_each_work_or_explain_themselves(workdir):
    run = workdir / "run.h5"
    with Trajectory(run) as traj:
        assert len(traj) == 7 and not traj.attrs["model_spec"]
        assert "/" not in traj.attrs["argv"][0]  # no build-machine path in the provenance
    # 1. no model spec: one line that names the flags
    assert "--model" in _one_error_line(_analyze(str(run)))
    # 2 + 3. the module is found in the working directory; importing it would train again: one line, nothing written
    line = _one_error_line(_analyze(str(run), "--model", "train_own:SmallCNN", "--data", "train_own:Digits"))
    assert "if __name__ ==" in line and "train_own" in line
    with Trajectory(run) as traj:
        assert len(traj) == 7  # the archive was not touched by a second training run
    # with the guard the same command works: 4. Digits takes no split/augment, 5. no --trust-specs
    (workdir / "train_own.py").write_text(_script(guarded=True))
    r = _analyze(str(run), "--model", "train_own:SmallCNN", "--data", "train_own:Digits", "--out", "a.results.h5")
    assert r.exit_code == 0, r.output
    ns: dict = {}
    exec(NET, ns)
    want = _reference_losses(run, ns)
    with ResultsFile(workdir / "a.results.h5") as res:
        rows = res.by_metric("interpolation")[0].rows
        assert [rows[(i,)]["loss"][0] for i in range(6)] == pytest.approx(want[:6], rel=1e-5)
        assert [rows[(i,)]["loss"][-1] for i in range(6)] == pytest.approx(want[1:], rel=1e-5)


def test_model_file_path_specs_and_the_python_call(workdir):
    run = workdir / "run.h5"
    (workdir / "net.py").write_text(NET + '\nif __name__ == "__main__":\n    raise SystemExit("ran as a script")\n')
    r = _analyze(str(run), "--model", "./net.py:SmallCNN", "--data", "./net.py:make_data", "--out", "b.results.h5")
    assert r.exit_code == 0, r.output
    ns: dict = {}
    exec(NET, ns)
    want = _reference_losses(run, ns)
    with ResultsFile(workdir / "b.results.h5") as res:
        rows = res.by_metric("interpolation")[0].rows
        assert [rows[(i,)]["loss"][0] for i in range(6)] == pytest.approx(want[:6], rel=1e-5)
    # the Python call on in-memory objects, as the README shows
    report = analyze(str(run), workdir / "c.results.h5", model=ns["SmallCNN"](), data=ns["Digits"](), metrics=["interpolation"])
    with ResultsFile(report.results_path) as res:
        rows = res.by_metric("interpolation")[0].rows
        assert [rows[(i,)]["loss"][0] for i in range(6)] == pytest.approx(want[:6], rel=1e-5)
    # a data factory without split cannot build the test split: one line
    line = _one_error_line(_analyze(str(run), "--model", "./net.py:SmallCNN", "--data", "./net.py:make_data",
                                    "--eval", "test", "--out", "d.results.h5"))
    assert "split" in line and "training data" in line
    # a missing file or module: one line that says where it looked
    assert "does not exist" in _one_error_line(_analyze(str(run), "--model", "./nope.py:Net"))
    assert "a file path works too" in _one_error_line(_analyze(str(run), "--model", "nope_module:Net"))
