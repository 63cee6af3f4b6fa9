"""Issue 11: Lightning and 🤗 runs recorded by the callbacks analyse with the default command plus at most one
documented flag; the recorded lr is the one each update used (per-step schedulers); adapters keep state-dict names.

lr exactness: with plain SGD (no momentum, no weight decay, no clipping) an update is Δθ = −lr·g, g the gradient of
the minibatch loss at θ_t. The test replays each recorded minibatch, computes g, and checks that the recorded lr
reproduces Δθ (the callbacks used to record the *next* step's lr: 3 % off for the HF linear schedule, 50 % for the
halving LambdaLR below, far outside the tolerance).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trajectory import Trajectory
from trajectory.adapters import HuggingFace, Lightning, adapt
from trajectory.analysis import ResultsFile

N, D, C = 40, 6, 3
SEQ, VOCAB = 6, 50


def _cli():
    try:
        from trajectory.cli.main import main
    except ImportError:  # source checkout without pip install -e
        from cli.main import main
    return main



def make_data(split: str = "train", augment: bool = False) -> TensorDataset:
    """The Lightning run's training data (a data factory named by the recorded data spec)."""
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g))


class Tokens(Dataset):
    """Hugging Face style items: dicts with input_ids, attention_mask, labels, and a field forward does not take."""

    def __init__(self, split: str = "train", augment: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i],
                "idx": i}


def _naive_loss(model_out, y) -> float:
    return float(F.cross_entropy(model_out.double(), y))


def _assert_lr_exact(traj: Trajectory, model: nn.Module, grads_of, lrs_expected) -> None:
    """Δθ = −lr·g for every update: the recorded lr reproduces the step taken (and equals the schedule's)."""
    lr = traj.scalars["lr"]
    for t in range(len(traj) - 1):
        traj.load_into(model, t)
        g = grads_of(model, torch.from_numpy(traj.batch_indices(t)))
        delta = (traj.params(t + 1).double() - traj.params(t).double())
        used = -float(delta @ g) / float(g @ g)  # the lr the update actually took
        assert used == pytest.approx(lr[t], rel=2e-4), (t, used, lr[t])
        torch.testing.assert_close(delta, -lr[t] * g, rtol=2e-3, atol=1e-6)
        assert lr[t] == pytest.approx(lrs_expected[t], rel=1e-9)


# ---------------------------------------------------------------------------------------------- Lightning
pl = pytest.importorskip("pytorch_lightning")


class NoForward(pl.LightningModule):
    """A LightningModule without forward: the logits exist only inside training_step."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, C))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)  # per-step: halves after every update
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    from trajectory.integrations.lightning import SgdwalkCallback

    tmp = tmp_path_factory.mktemp("pl")
    torch.manual_seed(0)
    module = NoForward()
    path = tmp / "pl.h5"
    cb = SgdwalkCallback(path, data_spec=f"{__name__}:make_data")
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(make_data(), batch_size=8, shuffle=True))
    return path, module


def test_lightning_lr_is_the_one_each_update_used(lightning_run):
    path, _ = lightning_run
    x, y = make_data().tensors

    def grads(model, idx):
        model.zero_grad()
        F.cross_entropy(model.net(x[idx]), y[idx]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()

    with Trajectory(path) as traj:
        assert len(traj) == 5
        _assert_lr_exact(traj, NoForward(), grads, [0.1 * 0.5 ** t for t in range(4)])


def test_lightning_archive_analyses_with_one_flag(lightning_run, tmp_path):
    path, _ = lightning_run
    out = tmp_path / "pl.results.h5"
    r = CliRunner().invoke(_cli(), ["analyze", str(path), "--trust-specs", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    x, y = make_data().tensors
    ref = NoForward()
    with Trajectory(path) as traj, ResultsFile(out, "r") as res:
        assert traj.model_spec.target == "trajectory.adapters:adapted"
        rows = res.by_metric("interpolation")[0].rows
        for i in range(4):
            traj.load_into(ref, i)
            with torch.no_grad():
                want = _naive_loss(ref.net.double()(x.double()), y)
            ref.float()
            assert rows[(i,)]["loss"][0] == pytest.approx(want, rel=1e-5)


def test_without_flag_the_lightning_archive_explains_itself(lightning_run, tmp_path):
    path, _ = lightning_run
    r = CliRunner().invoke(_cli(), ["analyze", str(path), "--out", str(tmp_path / "x.h5"), "-q"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--trust-specs" in lines[0]


def test_lightning_adapter_uses_training_step_logits_and_keeps_names():
    torch.manual_seed(0)
    m = NoForward()
    wrapped = Lightning().wrap(m)
    assert list(wrapped.state_dict()) == list(m.state_dict())  # no prefix: the archive layout lines up
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in m.named_parameters()]
    x = torch.randn(5, D)
    torch.testing.assert_close(wrapped(x), m.net(x))
    assert isinstance(wrapped, NoForward)
    # a functional call on the wrapper swaps the parameters the step logic uses
    params = {k: torch.zeros_like(v) for k, v in wrapped.named_parameters()}
    out = torch.func.functional_call(wrapped, params, (x,))
    assert torch.count_nonzero(out) == 0


class AliasLoss(NoForward):
    """The loss reached through an alias and a loss module: a patch of torch.nn.functional would miss both."""

    def training_step(self, batch, batch_idx):
        from torch.nn.functional import cross_entropy as ce

        x, y = batch
        return ce(self.net(x), y) + nn.CrossEntropyLoss()(self.net(x), y)


def test_lightning_capture_is_thread_local_and_sees_aliased_losses():
    import threading

    torch.manual_seed(0)
    m = AliasLoss()
    wrapped = Lightning().wrap(m)
    x = torch.randn(5, D)
    torch.testing.assert_close(wrapped(x), m.net(x))
    original = F.cross_entropy
    seen = []

    def other_thread():  # runs while the capture is active in the main thread: its losses must be real losses
        seen.append(float(F.cross_entropy(torch.zeros(2, C), torch.zeros(2, dtype=torch.long))))

    class Slow(AliasLoss):
        def training_step(self, batch, batch_idx):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            return super().training_step(batch, batch_idx)

    assert Lightning().wrap(Slow())(x).shape == (5, C)
    assert F.cross_entropy is original
    assert seen and abs(seen[0] - torch.log(torch.tensor(float(C)))) < 1e-6


# ---------------------------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_VERBOSITY", "error")
        mod = pytest.importorskip("transformers")
        pytest.importorskip("accelerate")
        yield mod


def _bert(hf):
    torch.manual_seed(0)
    config = hf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                           vocab_size=VOCAB, max_position_embeddings=16, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=2)
    return hf.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def hf_run(hf, tmp_path_factory):
    from trajectory.integrations.huggingface import SgdwalkTrainerCallback

    tmp = tmp_path_factory.mktemp("hf")
    path = tmp / "hf.h5"
    args = hf.TrainingArguments(
        output_dir=str(tmp / "out"), per_device_train_batch_size=8, max_steps=4, learning_rate=0.1,
        lr_scheduler_type="linear", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    model = _bert(hf)
    trainer = hf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[SgdwalkTrainerCallback(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return path


def test_hf_lr_is_the_one_each_update_used(hf, hf_run):
    ds = Tokens()

    def grads(model, idx):
        model.train()
        model.zero_grad()
        model(input_ids=ds.ids[idx], attention_mask=torch.ones(len(idx), SEQ, dtype=torch.long), labels=ds.labels[idx]).loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()]).double()

    with Trajectory(hf_run) as traj:
        assert len(traj) == 5
        _assert_lr_exact(traj, _bert(hf), grads, [0.1 * (1 - t / 4) for t in range(4)])


def test_hf_archive_analyses_with_one_flag(hf, hf_run, tmp_path):
    out = tmp_path / "hf.results.h5"
    r = CliRunner().invoke(_cli(), ["analyze", str(hf_run), "--data", f"{__name__}:Tokens", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    ds = Tokens()
    ref = _bert(hf).eval()
    with Trajectory(hf_run) as traj, ResultsFile(out, "r") as res:
        spec = traj.model_spec
        assert spec.is_builtin and spec.kwargs["model"]["target"] == "trajectory.adapters:hf_from_config"
        assert spec.kwargs["adapter"]["kwargs"]["input_keys"] == ["attention_mask", "input_ids"]
        rows = res.by_metric("interpolation")[0].rows
        for i in (0, 3):
            traj.load_into(ref, i)
            with torch.no_grad():
                logits = ref(input_ids=ds.ids, attention_mask=torch.ones(N, SEQ, dtype=torch.long)).logits
            assert rows[(i,)]["loss"][0] == pytest.approx(_naive_loss(logits, ds.labels), rel=1e-5)


def test_hf_adapter_keeps_names_and_maps_dict_batches(hf):
    from trajectory.analysis.data import materialize

    m = _bert(hf).eval()
    ad = HuggingFace(input_keys=["input_ids", "attention_mask"], fields=["attention_mask", "input_ids"])
    wrapped = ad.wrap(m)
    assert list(wrapped.state_dict()) == list(m.state_dict())
    x, y = materialize(Tokens())
    assert x.shape == (N, 2, SEQ) and torch.equal(y, Tokens().labels)  # fields stacked in sorted key order
    with torch.no_grad():
        want = m(input_ids=Tokens().ids, attention_mask=torch.ones(N, SEQ, dtype=torch.long)).logits
        torch.testing.assert_close(wrapped(x), want)
    assert adapt(m, "hf", input_keys=["input_ids"]).__class__.__name__ == type(m).__name__


def test_hf_adapter_picks_its_inputs_from_the_stacked_fields(hf):
    m = _bert(hf).eval()
    x = torch.stack([torch.ones(N, SEQ, dtype=torch.long), Tokens().ids], dim=1)  # attention_mask, input_ids
    picked = HuggingFace(input_keys=["input_ids"], fields=["attention_mask", "input_ids"]).wrap(m)
    with torch.no_grad():
        torch.testing.assert_close(picked(x), m(input_ids=Tokens().ids).logits)
    wrong = HuggingFace(input_keys=["input_ids"], fields=["a", "b", "input_ids"]).wrap(m)
    with pytest.raises(Exception) as err:
        wrong(x)
    assert "drop the others" in str(err.value) and "\n" not in str(err.value)
