"""Recording the optimizer state (issue 14 item 5): the archive holds exactly ``optimizer.state`` at each record.

References are independent of the recorder: the loop itself copies ``optimizer.state[p][key]`` (and
``state['step']``) at the recorded steps, and the update identities of SGD heavy ball and Adam/AdamW are
recomputed in float64 from the stored rows alone.
"""
from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from trajectory import Recorder, Trajectory
from trajectory.archive import format as fmt
from trajectory.errors import ArchiveError, ArchiveFormatError, RecorderError


def _model(frozen: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    if frozen:
        m[1].weight.requires_grad_(False)  # in the optimizer, but never gets state
    return m


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def _flat_state(opt: torch.optim.Optimizer, model: torch.nn.Module, key: str) -> torch.Tensor:
    """The loop's own copy of one state key, params in model.parameters() order, zeros where absent."""
    parts = []
    for p in model.parameters():
        v = opt.state.get(p, {}).get(key)
        parts.append(torch.zeros(p.numel()) if v is None else v.detach().reshape(-1).clone())
    return torch.cat(parts)


def _first_step(opt: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    for p in model.parameters():
        st = opt.state.get(p)
        if st and "step" in st:
            return float(st["step"])
    return 0.0


def _train(path, make_opt, keys, *, steps: int = 10, schedule: str | None = None, frozen: bool = False, **rec_kw):
    """Train with recording; return {step: {key: flat state, 'step': float}} captured by the loop itself."""
    model = _model(frozen)
    opt = make_opt(model.parameters())
    x, y = _data()
    captured = {}
    with Recorder(path, model, optimizer=opt, optimizer_state=True, schedule=schedule, chunk_rows=8, **rec_kw) as rec:
        captured[0] = {k: _flat_state(opt, model, k) for k in keys} | {"step": _first_step(opt, model)}
        for s in range(1, steps + 1):
            i = torch.arange(s % 3 * 8, s % 3 * 8 + 8)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[i]), y[i]).backward()
            opt.step()
            captured[s] = {k: _flat_state(opt, model, k) for k in keys} | {"step": _first_step(opt, model)}
            rec.record(batch_indices=i)
    return model, opt, captured


OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), ("momentum_buffer",)),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6), ("exp_avg", "exp_avg_sq")),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
    "amsgrad": (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", [None, "every:3"])
def test_recorded_rows_equal_the_optimizer_state(tmp_path, name, schedule):
    make, keys = OPTIMIZERS[name]
    _, _, captured = _train(tmp_path / "run.h5", make, keys, schedule=schedule, frozen=True)
    with Trajectory(tmp_path / "run.h5") as traj:
        assert traj.optimizer_state_keys == keys
        assert json.loads(traj.file.attrs[fmt.OPTIMIZER_STATE_ATTR]) == list(keys)
        expected_steps = list(range(0, 11)) if schedule is None else [0, 3, 6, 9]
        assert list(traj.steps) == expected_steps
        for i, s in enumerate(traj.steps):
            st = traj.optimizer_state(i)
            assert set(st) == set(keys) | {"step"}
            for k in keys:
                assert st[k].dtype == torch.float32 and st[k].shape == (traj.n_params,)
                assert torch.equal(st[k], captured[int(s)][k]), (k, int(s))
            if s == 0:
                assert all(not st[k].any() for k in keys)  # before the first update: all zeros
            assert st["step"].dtype == torch.float64 and st["step"].ndim == 0
            if name == "sgd":
                assert torch.isnan(st["step"])
            else:
                assert float(st["step"]) == captured[int(s)]["step"] == float(s)
        # the frozen BatchNorm weight (columns 42-48 of params) never has state: its columns are zero
        frozen = traj.layout["1.weight"]
        for k in keys:
            block = traj.optimizer_state_block(k, 0, len(traj))
            assert block.shape == (len(traj), traj.n_params)
            assert not block[:, frozen.offset : frozen.stop].any()
            assert torch.equal(block[-1], traj.optimizer_state(len(traj) - 1)[k])


def test_sgd_heavy_ball_identity_from_the_records_alone(tmp_path):
    make, keys = OPTIMIZERS["sgd"]
    _train(tmp_path / "run.h5", make, keys, steps=12)
    lr = 0.05
    with Trajectory(tmp_path / "run.h5") as traj:
        for i in range(len(traj) - 1):
            theta, theta_next = traj.params(i).double(), traj.params(i + 1).double()
            m_next = traj.optimizer_state(i + 1)["momentum_buffer"].double()
            predicted = theta - lr * m_next  # dampening 0, no weight decay: theta_{t+1} = theta_t - lr m_{t+1}
            assert torch.allclose(theta_next, predicted, rtol=0, atol=1e-6 * (1 + theta.abs().max()))
            # tight enough to tell the buffer after the update from the one before it
            m_before = traj.optimizer_state(i)["momentum_buffer"].double()
            assert not torch.allclose(theta_next, theta - lr * m_before, rtol=0, atol=1e-6 * (1 + theta.abs().max()))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_update_identity_from_the_records_alone(tmp_path, name):
    make, keys = OPTIMIZERS[name]
    _, opt, _ = _train(tmp_path / "run.h5", make, keys, steps=12)
    g = opt.param_groups[0]
    lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
    decoupled = name == "adamw"
    with Trajectory(tmp_path / "run.h5") as traj:
        for i in range(len(traj) - 1):
            theta, theta_next = traj.params(i).double(), traj.params(i + 1).double()
            st = traj.optimizer_state(i + 1)
            s = float(st["step"])
            m_hat = st["exp_avg"].double() / (1 - b1**s)
            v_hat = st["exp_avg_sq"].double() / (1 - b2**s)
            base = theta * (1 - lr * wd) if decoupled else theta
            predicted = base - lr * m_hat / (v_hat.sqrt() + eps)
            trained = traj.optimizer_state(i + 1)["exp_avg_sq"] > 0  # frozen-free model: every parameter moves
            assert trained.all()
            # float32 rounding of theta (~6e-8 relative) and of the update (~1e-6 relative of lr-sized steps)
            assert torch.allclose(theta_next, predicted, rtol=0, atol=2e-7 * (1 + theta.abs().max()) + 1e-5 * lr)
            assert not torch.allclose(theta_next, base - lr * m_hat / (v_hat.sqrt() + eps) * 0.9, rtol=0, atol=1e-5 * lr)


def test_archive_without_optimizer_state_says_so_in_one_line(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Recorder(tmp_path / "plain.h5", model, optimizer=opt) as rec:
        rec.record(batch_indices=[0])
    with Trajectory(tmp_path / "plain.h5") as traj:
        assert traj.optimizer_state_keys == ()
        assert fmt.OPTIMIZER_STATE_ATTR not in traj.file.attrs and fmt.OPTIMIZER_GROUP not in traj.file
        for call in (lambda: traj.optimizer_state(0), lambda: traj.optimizer_state_block("exp_avg", 0, 1)):
            with pytest.raises(ArchiveError) as err:
                call()
            assert "records no optimizer state" in str(err.value) and "\n" not in str(err.value)


def test_recorder_refuses_optimizer_state_it_cannot_record(tmp_path):
    model = _model()
    cases = [
        (None, "needs the optimizer"),
        (torch.optim.SGD(model.parameters(), lr=0.1), "SGD without momentum"),
        (torch.optim.Adagrad(model.parameters(), lr=0.1), "'sum'"),  # Adagrad creates its state ('step', 'sum') at once
        (torch.optim.RMSprop(model.parameters(), lr=0.1), "RMSprop has no state yet"),
        (type("ZeroRedundancyOptimizer", (torch.optim.SGD,), {})(model.parameters(), lr=0.1, momentum=0.9), "shards"),
    ]
    for k, (opt, words) in enumerate(cases):
        with pytest.raises(RecorderError) as err:
            Recorder(tmp_path / f"r{k}.h5", model, optimizer=opt, optimizer_state=True)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / f"r{k}.h5").exists()


def test_appending_refuses_a_different_optimizer_state(tmp_path):
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "plain.h5", model, optimizer=sgd):
        pass
    with Recorder(tmp_path / "sgd.h5", model, optimizer=sgd, optimizer_state=True):
        pass
    for path, opt, flag, words in (
        ("plain.h5", sgd, True, "records no optimizer state but this run records optimizer state ['momentum_buffer']"),
        ("sgd.h5", sgd, False, "records optimizer state ['momentum_buffer'] but this run records no optimizer state"),
        ("sgd.h5", adam, True, "but this run records optimizer state ['exp_avg', 'exp_avg_sq']"),
    ):
        with pytest.raises(ArchiveFormatError) as err:
            Recorder(tmp_path / path, model, optimizer=opt, optimizer_state=flag, mode="a")
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    for path in ("plain.h5", "sgd.h5"):  # a refused append leaves the archive as it was
        with Trajectory(tmp_path / path) as traj:
            assert traj.closed_cleanly and len(traj) == 1
    # the same state appends, continuing the rows
    x, y = _data()
    with Recorder(tmp_path / "sgd.h5", model, optimizer=sgd, optimizer_state=True, mode="a") as rec:
        sgd.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        sgd.step()
        rec.record()
    with Trajectory(tmp_path / "sgd.h5") as traj:
        assert list(traj.steps) == [0, 1]
        assert torch.equal(traj.optimizer_state(1)["momentum_buffer"], _flat_state(sgd, model, "momentum_buffer"))


# ------------------------------------------------------------------------------------------ damaged archives
def _recorded(tmp_path) -> str:
    path = tmp_path / "good.h5"
    _train(path, *OPTIMIZERS["adam"], steps=20)
    return str(path)


def _damage(src: str, dst: str, how) -> str:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        how(f)
    return dst


def _replace(name: str, *, width_delta: int = 0, rows_delta: int = 0, dtype=None):
    def how(f):
        old = f[name]
        data, attrs = old[()], dict(old.attrs)
        del f[name]
        if data.ndim == 2:
            data = np.concatenate([data, np.zeros((data.shape[0], width_delta), data.dtype)], 1) if width_delta > 0 else data
        data = data[: len(data) + rows_delta] if rows_delta < 0 else data
        if dtype is not None:
            data = data.astype(dtype)
        ds = f.create_dataset(name, data=data, chunks=True, maxshape=(None,) * data.ndim)
        for k, v in attrs.items():
            ds.attrs[k] = v
    return how


DAMAGES = {
    "missing dataset": (lambda f: f.__delitem__("optimizer/exp_avg_sq"), "dataset 'optimizer/exp_avg_sq' is missing"),
    "missing step": (lambda f: f.__delitem__(fmt.OPTIMIZER_STEP), "dataset 'optimizer/state_step' is missing"),
    "wide rows": (_replace("optimizer/exp_avg", width_delta=3), "rows hold"),
    "short rows": (_replace("optimizer/exp_avg", rows_delta=-2), "entries for 21 records"),
    "short step": (_replace(fmt.OPTIMIZER_STEP, rows_delta=-1), "'optimizer/state_step' has 20 entries"),
    "wrong dtype": (_replace("optimizer/exp_avg", dtype=np.float64), "is stored as float64"),
    "step dtype": (_replace(fmt.OPTIMIZER_STEP, dtype=np.float32), "expected float64"),
    "attr not a list": (lambda f: f.attrs.__setitem__(fmt.OPTIMIZER_STATE_ATTR, '{"a": 1}'), "is not a JSON list"),
    "attr unknown key": (lambda f: f.attrs.__setitem__(fmt.OPTIMIZER_STATE_ATTR, '["exp_avg", "nope"]'), "unknown key"),
    "attr names absent": (lambda f: f.attrs.__setitem__(fmt.OPTIMIZER_STATE_ATTR, '["momentum_buffer"]'), "is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_optimizer_datasets_fail_in_one_line(tmp_path, case):
    good = _recorded(tmp_path)
    with Trajectory(good) as traj:
        assert len(traj) == 21
    how, words = DAMAGES[case]
    bad = _damage(good, str(tmp_path / "bad.h5"), how)
    with pytest.raises(ArchiveFormatError) as err:
        Trajectory(bad)
    msg = str(err.value)
    assert words in msg and "\n" not in msg, msg


def test_verify_checks_the_optimizer_checksums(tmp_path):
    from trajectory.archive.verify import verify_archive

    good = _recorded(tmp_path)
    assert verify_archive(good)["ok"]
    bad = str(tmp_path / "bad.h5")
    shutil.copy(good, bad)
    with h5py.File(bad, "r") as f:
        info = f["optimizer/exp_avg_sq"].id.get_chunk_info(1)  # records 8-15
    with open(bad, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    report = verify_archive(bad)
    assert not report["ok"]
    assert [(p["dataset"], p["first"], p["last"]) for p in report["problems"]] == [("optimizer/exp_avg_sq", 8, 15)]
    with Trajectory(bad) as traj:  # params are intact; reading the state of those records is one line
        traj.params(9)
        traj.optimizer_state(3)
        with pytest.raises(ArchiveFormatError, match="dataset 'optimizer/exp_avg_sq' records 8-15"):
            traj.optimizer_state(9)


# ------------------------------------------------------------------------------------------ sgdwalk train
_TRAIN = dict(model="mlp", data="synthetic", model_kwargs={"hidden": [16]}, lr=0.01, batch_size=20, seed=3, progress=False,
              data_kwargs={"num_samples": 200, "input_shape": [12], "num_classes": 4})


@pytest.mark.parametrize("opt_kw", [{"momentum": 0.9}, {"optimizer": "adam", "betas": "0.8,0.95", "eps": 1e-7}])
def test_resume_restores_the_optimizer_state(tmp_path, opt_kw):
    from trajectory.training import train

    whole, split = tmp_path / "whole.h5", tmp_path / "split.h5"
    train(**_TRAIN, **opt_kw, steps=14, record_optimizer_state=True, out=whole)
    train(**_TRAIN, **opt_kw, steps=6, record_optimizer_state=True, out=split)
    train(**_TRAIN, **opt_kw, steps=14, record_optimizer_state=True, out=split, mode="a")
    with Trajectory(whole) as a, Trajectory(split) as b:
        assert list(a.steps) == list(b.steps) == list(range(15))
        for i in (6, 7, 14):  # the restored state at 6, the first update after it, and the end
            assert torch.equal(a.params(i), b.params(i)), i
            sa, sb = a.optimizer_state(i), b.optimizer_state(i)
            assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) or (k == "step" and torch.isnan(sa[k])) for k in sa)
        assert a.optimizer_state(6)[a.optimizer_state_keys[0]].abs().sum() > 0


def test_resume_without_recorded_state_warns_and_restarts_the_momentum(tmp_path):
    from trajectory.training import train

    whole, split = tmp_path / "whole.h5", tmp_path / "split.h5"
    train(**_TRAIN, momentum=0.9, steps=10, out=whole)
    train(**_TRAIN, momentum=0.9, steps=5, out=split)
    with pytest.warns(UserWarning, match="momentum buffer restarts at zero"):
        train(**_TRAIN, momentum=0.9, steps=10, out=split, mode="a")
    with Trajectory(whole) as a, Trajectory(split) as b:
        assert torch.equal(a.params(5), b.params(5)) and not torch.equal(a.params(6), b.params(6))


def test_train_refuses_mixed_optimizer_settings_in_one_line(tmp_path):
    from trajectory.training import train

    for kw, words in (
        (dict(record_optimizer_state=True), "SGD without momentum keeps no optimizer state"),
        (dict(optimizer="adam", momentum=0.9), "momentum is an SGD setting"),
        (dict(optimizer="rmsprop"), "optimizer must be one of sgd, adam"),
        (dict(optimizer="adam", betas="0.9"), "bad betas"),
    ):
        with pytest.raises(ValueError) as err:
            train(**_TRAIN, steps=3, out=tmp_path / "x.h5", **kw)
        assert words in str(err.value) and "\n" not in str(err.value)
    train(**_TRAIN, optimizer="adam", steps=3, out=tmp_path / "adam.h5")
    with pytest.raises(Exception, match="trained with optimizer adam but this run uses sgd"):
        train(**_TRAIN, momentum=0.9, steps=5, out=tmp_path / "adam.h5", mode="a")


def test_cli_train_adam_with_optimizer_state_then_info(tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path / "adam.h5"
    args = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": [16]}', "--data", "synthetic", "--data-kwargs",
            '{"num_samples": 200, "input_shape": [12], "num_classes": 4}', "--batch-size", "20", "--steps", "8",
            "--optimizer", "adam", "--lr", "0.001", "--betas", "0.8,0.95", "--eps", "1e-6", "--record-optimizer-state",
            "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Trajectory(out) as traj:
        assert traj.optimizer_state_keys == ("exp_avg", "exp_avg_sq")
        assert traj.attrs["optimizer"]["param_groups"][0]["betas"] == [0.8, 0.95]
        assert traj.attrs["optimizer"]["param_groups"][0]["eps"] == 1e-6
        assert [float(traj.optimizer_state(i)["step"]) for i in range(len(traj))] == list(map(float, range(9)))
    info = CliRunner().invoke(main, ["info", str(out)], catch_exceptions=False)
    assert info.exit_code == 0 and re.search(r"^optimizer state +exp_avg, exp_avg_sq$", info.output, re.M), info.output
    plain = tmp_path / "plain.h5"
    CliRunner().invoke(main, args[:-7] + ["--no-progress", "--out", str(plain)], catch_exceptions=False)
    assert "optimizer state" not in CliRunner().invoke(main, ["info", str(plain)], catch_exceptions=False).output
    bad = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "b.h5")] + ["--optimizer", "sgd"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: SGD without momentum")


# ------------------------------------------------------------------------------------------ a killed writer
# As in test_crash_and_live_reading: the child sets every parameter to its step s and every momentum buffer to
# 10 s (Adam-free, so the value is known exactly), flushes once, keeps writing unflushed records, and is SIGKILLed.
_KILLED_WRITER = """
import sys, time, torch
from trajectory import Recorder
path, flush_at = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 5))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
def set_to(step):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
            if step:
                opt.state[p]["momentum_buffer"] = torch.full_like(p, 10.0 * step)
set_to(0)
rec = Recorder(path, model, optimizer=opt, optimizer_state=True, chunk_rows=8, flush_interval=3600)
for s in range(1, 10_000):
    set_to(s)
    rec.record(batch_indices=[s])
    if s == flush_at:
        rec.flush()
        print("FLUSHED", s, flush=True)
    if s > flush_at:
        time.sleep(0.002)
"""


def test_sigkill_leaves_the_optimizer_rows_readable_up_to_the_last_flush(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), "21"], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("FLUSHED"), line
    time.sleep(0.3)  # unflushed records and whole chunks after the flush
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Trajectory(path) as traj:
        assert not traj.closed_cleanly and len(traj) >= 22
        assert list(traj.steps) == list(range(len(traj)))
        for i in range(len(traj)):
            assert torch.all(traj.params(i) == float(i))
            st = traj.optimizer_state(i)
            assert torch.all(st["momentum_buffer"] == 10.0 * i) and torch.isnan(st["step"]), i
        n = len(traj)
    # appending after the crash continues the optimizer rows from the last complete record
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Recorder(path, model, optimizer=opt, optimizer_state=True, mode="a", chunk_rows=8) as rec:
        assert rec.step == n - 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(n))
                opt.state[p]["momentum_buffer"] = torch.full_like(p, 10.0 * n)
        rec.record(batch_indices=[n])
    with Trajectory(path) as traj:
        assert traj.closed_cleanly and len(traj) == n + 1
        assert torch.all(traj.optimizer_state(n)["momentum_buffer"] == 10.0 * n)
        assert torch.all(traj.optimizer_state(n - 1)["momentum_buffer"] == 10.0 * (n - 1))


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, out: str) -> None:
    import datetime
    import os
    import pickle

    import torch.distributed as dist

    from conftest import make_mlp, toy_data
    from trajectory.integrations import DistributedRecorder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = toy_data(n=64)
        ddp = torch.nn.parallel.DistributedDataParallel(make_mlp(seed=0))
        model = ddp.module
        opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
        captured = []
        with DistributedRecorder(os.path.join(out, "ddp.h5"), ddp, optimizer=opt, optimizer_state=True) as rec:
            for s in range(5):
                idx = torch.arange(rank * 32 + s * 4, rank * 32 + s * 4 + 4)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
                opt.step()
                rec.record(batch_indices=idx)
                captured.append({k: _flat_state(opt, model, k) for k in ("exp_avg", "exp_avg_sq")})
        errors = []
        try:
            DistributedRecorder(os.path.join(out, "no.h5"), ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
                                optimizer_state=True)
        except RecorderError as err:
            errors.append(str(err))
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump({"captured": captured, "errors": errors}, fh)
    finally:
        dist.destroy_process_group()


def test_ddp_rank0_records_the_optimizer_state_every_rank_holds(tmp_path):
    import multiprocessing
    import os
    import pickle

    import torch.multiprocessing as mp

    out = str(tmp_path)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "h5py", "trajectory"])
    mp.start_processes(_ddp_worker, args=(out,), nprocs=2, join=True, start_method="forkserver")
    ranks = [pickle.load(open(os.path.join(out, f"rank{r}.pkl"), "rb")) for r in range(2)]
    with Trajectory(os.path.join(out, "ddp.h5")) as traj:
        assert traj.optimizer_state_keys == ("exp_avg", "exp_avg_sq") and len(traj) == 6
        for s in range(1, 6):
            st = traj.optimizer_state(s)
            assert float(st["step"]) == s
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], ranks[0]["captured"][s - 1][k]) and torch.equal(st[k], ranks[1]["captured"][s - 1][k])
    assert ranks[0]["errors"] == ranks[1]["errors"] and "SGD without momentum" in ranks[0]["errors"][0]
    assert not os.path.exists(os.path.join(out, "no.h5"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_state_of_other_dtypes_is_stored_in_the_params_row_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = (t.to(dtype) for t in _data())
    with Recorder(tmp_path / "run.h5", model, optimizer=opt, optimizer_state=True) as rec:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y[:, :2]).backward()
            opt.step()
            rec.record()
    want = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    with Trajectory(tmp_path / "run.h5") as traj:
        got = traj.optimizer_state(3)["momentum_buffer"]
        assert got.dtype == traj.params(3).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(got, want.to(got.dtype))  # bfloat16 -> float32 is exact
