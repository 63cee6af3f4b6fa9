"""SgdwalkCallback: Lightning's Trainer recorded with one line; needs the `lightning` extra (skipped without it)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import make_mlp, toy_data
from trajectory import Trajectory

LR = 0.1



def test_missing_lightning_gives_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)  # None in sys.modules: "not installed"
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "trajectory.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install sgdwalk\[lightning\]") as err:
        importlib.import_module("trajectory.integrations.lightning")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def pl():
    mod = pytest.importorskip("pytorch_lightning")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return mod


class _Indexed(Dataset):
    def __init__(self, n=48):
        self.x, self.y = toy_data(n=n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _module_class(pl):
    class Module(pl.LightningModule):
        def __init__(self, inf_at=()):
            super().__init__()
            self.net = make_mlp()
            self.inf_at = set(inf_at)
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, i = batch
            self.seen.append(i.numpy().copy())
            loss = torch.nn.functional.cross_entropy(self(x.float()), y)
            if len(self.seen) - 1 in self.inf_at:
                loss = loss * float("inf")  # overflow: the GradScaler skips this optimizer step
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Module


def _fit(pl, module, callback, **trainer_kwargs):
    loader = DataLoader(_Indexed(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback], **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers etc.
        trainer.fit(module, loader)
    return trainer


def test_accumulation_records_each_optimizer_step_with_the_consumed_batches(pl, tmp_path):
    from trajectory.integrations.lightning import SgdwalkCallback

    module = _module_class(pl)()
    trainer = _fit(pl, module, SgdwalkCallback(tmp_path / "pl.h5"), max_steps=4, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and len(module.seen) == 8
    with Trajectory(tmp_path / "pl.h5") as traj:
        assert list(traj.steps) == [0, 1, 2, 3, 4]
        names = [e.name for e in traj.layout.entries]
        assert names == list(module.state_dict()) and names[0] == "net.0.weight"
        steps, gsteps = traj.scalar_history("global_step")
        assert list(steps) == [0, 1, 2, 3] and list(gsteps) == [1, 2, 3, 4]
        x, y = _Indexed().x, _Indexed().y
        replay = _module_class(pl)()
        for t in range(4):
            window = np.concatenate(module.seen[2 * t : 2 * t + 2])
            assert np.array_equal(traj.batch_indices(t), window)
            # Lightning divides each micro-batch loss by 2: the update is the window's mean-loss gradient
            traj.load_into(replay, t)
            idx = torch.from_numpy(window)
            replay.zero_grad()
            loss = torch.nn.functional.cross_entropy(replay(x[idx]), y[idx])
            loss.backward()
            predicted = torch.cat([(p - LR * p.grad).detach().reshape(-1) for p in replay.parameters()])
            torch.testing.assert_close(predicted, traj.params(t + 1), rtol=1e-5, atol=1e-6)
            assert traj.scalars["loss"][t] == pytest.approx(loss.item(), rel=1e-5)
        assert traj.closed_cleanly


def test_a_step_skipped_by_the_grad_scaler_is_not_recorded(pl, tmp_path):
    from pytorch_lightning.plugins.precision import MixedPrecision

    from trajectory.integrations.lightning import SgdwalkCallback

    module = _module_class(pl)(inf_at=[2])
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _fit(pl, module, SgdwalkCallback(tmp_path / "amp.h5"), max_steps=5, plugins=[plugin])
    assert trainer.global_step == 5  # Lightning counts the skipped step
    with Trajectory(tmp_path / "amp.h5") as traj:
        assert list(traj.steps) == [0, 1, 2, 3, 4]  # 4 real updates
        used = [module.seen[k] for k in (0, 1, 3, 4)]
        for t in range(4):
            assert np.array_equal(traj.batch_indices(t), used[t])
        assert list(traj.scalar_history("global_step")[1]) == [1, 2, 4, 5]
        assert int(traj.nonfinite.sum()) == 0
        assert torch.equal(traj.params(4), torch.cat([p.detach().reshape(-1) for p in module.parameters()]))


def _ddp_main(out: str) -> None:
    """Run as a script: Lightning's "ddp" strategy launches rank 1 by re-running this file."""
    import logging
    import pickle

    import pytorch_lightning as pl

    from trajectory.integrations.lightning import SgdwalkCallback

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    class Module(_module_class(pl)):
        def train_dataloader(self):  # Lightning replaces the sampler with a DistributedSampler
            return DataLoader(_Indexed(), batch_size=4, shuffle=True)

    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[SgdwalkCallback(os.path.join(out, "ddp.h5"))],
    )
    trainer.fit(module)
    with open(os.path.join(out, f"seen{trainer.global_rank}.pkl"), "wb") as f:
        pickle.dump(module.seen, f)


@pytest.mark.slow
def test_ddp_strategy_records_the_global_batch_once(pl, tmp_path):
    import pickle

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=tmp_path, timeout=300,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = []
    for r in range(2):
        with open(tmp_path / f"seen{r}.pkl", "rb") as f:
            seen.append(pickle.load(f))
    assert [len(s) for s in seen] == [4, 4]
    with Trajectory(tmp_path / "ddp.h5") as traj:
        assert list(traj.steps) == [0, 1, 2, 3, 4]
        assert traj.attrs["metadata"]["distributed"]["world_size"] == 2
        x, y = _Indexed().x, _Indexed().y
        replay = _module_class(pl)()
        for t in range(4):
            batch = np.concatenate([seen[0][t], seen[1][t]])
            assert np.array_equal(traj.batch_indices(t), batch)
            assert len(set(batch.tolist())) == 8  # disjoint DistributedSampler shards
            traj.load_into(replay, t)
            idx = torch.from_numpy(batch)
            replay.zero_grad()
            torch.nn.functional.cross_entropy(replay(x[idx]), y[idx]).backward()
            predicted = torch.cat([(p - LR * p.grad).detach().reshape(-1) for p in replay.parameters()])
            torch.testing.assert_close(predicted, traj.params(t + 1), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # the script's folder (tests/) is on sys.path, so conftest imports
    _ddp_main(sys.argv[1])
