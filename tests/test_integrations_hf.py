"""SgdwalkTrainerCallback: 🤗 Trainer recorded with one line; needs the `hf` extra (skipped without it).

A tiny randomly initialised BERT built from a config: nothing is downloaded (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from trajectory import Trajectory

LR = 0.05
N = 36  # 9 batches of 4: with 2-batch accumulation an epoch ends with a 1-batch window
SEQ = 6



def test_missing_transformers_gives_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "trajectory.integrations.huggingface", raising=False)
    with pytest.raises(ImportError, match=r"pip install sgdwalk\[hf\]") as err:
        importlib.import_module("trajectory.integrations.huggingface")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def hf():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a config-built model: nothing may be fetched
        mp.setenv("TRANSFORMERS_VERBOSITY", "error")
        mod = pytest.importorskip("transformers")
        pytest.importorskip("accelerate")  # transformers' Trainer needs it
        yield mod


class _Tokens(Dataset):
    """Sequence i starts with token i + 1, so the inputs a training step saw name their own indices."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(N + 1, 100, (N, SEQ), generator=g)
        self.ids[:, 0] = torch.arange(1, N + 1)
        self.labels = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def _model(hf):
    torch.manual_seed(0)
    config = hf.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=100,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return hf.BertForSequenceClassification(config)


def _train(hf, tmp_path, callback, accumulate, max_steps=4):
    class SeeingTrainer(hf.Trainer):
        """Logs the sample indices each micro-batch really contained (test only)."""

        seen: list = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.seen.append((inputs["input_ids"][:, 0] - 1).cpu().numpy())
            return super().training_step(model, inputs, *args, **kwargs)

    SeeingTrainer.seen = []
    args = hf.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
        max_steps=max_steps, learning_rate=LR, lr_scheduler_type="constant", optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    model = _model(hf)
    trainer = SeeingTrainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, model


def test_records_each_optimizer_step_with_the_batches_the_trainer_consumed(hf, tmp_path):
    from trajectory.integrations.huggingface import SgdwalkTrainerCallback

    trainer, model = _train(hf, tmp_path, SgdwalkTrainerCallback(tmp_path / "hf.h5"), accumulate=2, max_steps=6)
    seen = trainer.seen
    assert trainer.state.global_step == 6 and len(seen) == 11
    windows = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 11)]  # the epoch's last update has one micro-batch
    with Trajectory(tmp_path / "hf.h5") as traj:
        assert list(traj.steps) == list(range(7))
        assert [e.name for e in traj.layout.entries] == list(model.state_dict())
        for t, (a, b) in enumerate(windows):
            assert np.array_equal(traj.batch_indices(t), np.concatenate(seen[a:b]))
        assert len(set(np.concatenate([traj.batch_indices(t) for t in range(5)]).tolist())) == N  # one epoch
        assert list(traj.scalar_history("global_step")[1]) == [1, 2, 3, 4, 5, 6]
        assert np.allclose(traj.scalars["lr"][:6], LR)
        assert traj.attrs["optimizer"]["class"].endswith("SGD")
        assert torch.equal(traj.params(6), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert traj.closed_cleanly


def test_replay_of_a_recorded_hf_step(hf, tmp_path):
    from trajectory.integrations.huggingface import SgdwalkTrainerCallback

    trainer, _ = _train(hf, tmp_path, SgdwalkTrainerCallback(tmp_path / "one.h5"), accumulate=1)
    ds = _Tokens()
    replay = _model(hf)
    with Trajectory(tmp_path / "one.h5") as traj:
        assert len(traj) == 5
        for t in range(4):
            idx = torch.from_numpy(traj.batch_indices(t))
            assert np.array_equal(idx.numpy(), trainer.seen[t])
            traj.load_into(replay, t)
            replay.train()
            replay.zero_grad()
            out = replay(input_ids=ds.ids[idx], attention_mask=torch.ones(len(idx), SEQ, dtype=torch.long), labels=ds.labels[idx])
            out.loss.backward()
            predicted = torch.cat([(p - LR * p.grad).detach().reshape(-1) if p.grad is not None else p.detach().reshape(-1) for p in replay.parameters()])
            torch.testing.assert_close(predicted, traj.params(t + 1), rtol=1e-5, atol=1e-6)
