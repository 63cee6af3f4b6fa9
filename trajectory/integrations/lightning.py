"""PyTorch Lightning: record a ``Trainer.fit`` run with one line::

    from trajectory.integrations.lightning import SgdwalkCallback
    trainer = Trainer(callbacks=[SgdwalkCallback("run.h5")])

What is recorded: the LightningModule's state dict (names as in ``model.state_dict()``) before
training (step 0) and after every *real* optimizer step. With ``accumulate_grad_batches=k`` that
is once per k batches, and the stored minibatch of the update is the k micro-batches' indices
concatenated in order. A step that a ``GradScaler`` skipped (overflowing fp16 gradients) updates
nothing and is not recorded; its batches are dropped. Archive step ``s`` therefore counts real
updates; ``trainer.global_step`` (which also counts skipped steps) is stored with each update as
the scalar ``global_step``.

How the indices are captured: Lightning builds the training DataLoader itself (and rebuilds it
to inject a ``DistributedSampler`` under DDP). The callback wraps the final loader's batch
sampler in a :class:`~trajectory.RecordingBatchSampler` as the strategy hands the loader over
(``Strategy.process_dataloader``), before the loader is first iterated, and pops one entry per
training batch in ``on_train_batch_start``. Works with any map-style dataset, shuffling, worker
processes and ``reload_dataloaders_every_n_epochs``; a single training DataLoader is supported
(iterable datasets yield no indices: parameters are still recorded).

Learning rate: the scalar ``lr`` is the rate the update used, read in an optimizer step pre-hook
(before Lightning steps a per-step scheduler; reading the optimizer after the batch would give the
*next* step's rate).

Analysis: the callback records the model spec wrapped in the ``lightning`` adapter
(:mod:`trajectory.adapters`), so a LightningModule without ``forward`` is evaluated through its
``training_step`` logic. Without ``model_spec=`` the spec is the module's class with its
``hparams`` (``self.save_hyperparameters()``) as keyword arguments, when the class is importable (not
defined in ``__main__``). Pass ``data_spec=`` (a factory of the training dataset) and analyse with
``sgdwalk analyze run.h5 --trust-specs``, or give ``--data`` at analysis time.

Under DDP (``strategy="ddp"``) the callback runs on every rank and records through a
:class:`~trajectory.integrations.ddp.DistributedRecorder`: rank 0 writes, indices of all ranks
are gathered in rank order.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified "lightning" package ships the same API as lightning.pytorch
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("trajectory.integrations.lightning needs PyTorch Lightning: pip install sgdwalk[lightning]") from None

import torch

from ..adapters import Lightning, adapted_spec
from ._common import BatchWindow, StepWatcher, install_tracker
from .ddp import make_recorder

__all__ = ["SgdwalkCallback"]


def _loss_of(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs.get("loss")
    return None


class SgdwalkCallback(pl.Callback):
    """Record the trajectory of ``Trainer.fit`` into an sgdwalk archive.

    Parameters
    ----------
    path : str or PathLike
        Archive to create (on global rank 0 only).
    schedule : Schedule or str, optional
        Which steps to record (default every step), as for :class:`~trajectory.Recorder`.
    capture_indices : bool
        Record each update's minibatch indices (default True); see the module docs for how.
    scalars : {'rank0', 'mean'}
        Under DDP, store rank 0's loss or the mean over ranks.
    **recorder_kwargs
        Any other :class:`~trajectory.Recorder` argument: ``codec``, ``mode``, ``model_spec``,
        ``data_spec``, ``seed``, ``metadata``, ``record_buffers``, ``all_indices``,
        ``optimizer_state`` (record the first optimizer's momentum buffer / Adam moments), ...

    Scalars stored with each update: ``loss`` (the sum of the micro-batch losses Lightning
    backpropagated, i.e. the window's mean loss under accumulation; only when ``training_step``
    returns a loss), ``lr`` (first parameter group of the first optimizer) and ``global_step``.
    """

    def __init__(self, path: str | os.PathLike, schedule: Any = None, *, capture_indices: bool = True, scalars: str = "rank0", **recorder_kwargs: Any):
        super().__init__()
        self.path = os.fspath(path)
        self.schedule = schedule
        self.capture_indices = capture_indices
        self.scalars = scalars
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Any = None
        self._tracker = None
        self._window = BatchWindow()
        self._watcher: StepWatcher | None = None
        self._seen_steps = 0
        self._last_global_step = 0
        self._patched: Any = None

    # ------------------------------------------------------------------ index capture
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or not self.capture_indices or self._patched is not None:
            return
        strategy = trainer.strategy
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            if trainer.training and not trainer.sanity_checking:  # the training loader, not val/test
                tracker = install_tracker(dataloader)
                if tracker is not None:
                    self._tracker = tracker
            return dataloader

        strategy.process_dataloader = process_dataloader  # instance attribute shadows the method
        self._patched = strategy

    def _unpatch(self) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("process_dataloader", None)
            self._patched = None

    # ------------------------------------------------------------------ recording
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        optimizers = list(trainer.optimizers)
        kwargs = dict(self.recorder_kwargs)
        kwargs.setdefault("optimizer", optimizers[0] if optimizers else None)
        spec = kwargs.get("model_spec") or _module_spec(pl_module)
        if spec is not None:
            kwargs["model_spec"] = adapted_spec(spec, Lightning())
        if trainer.world_size > 1:
            kwargs["scalars"] = self.scalars
        if trainer.global_step and "start_step" not in kwargs and kwargs.get("mode", "x") != "a":
            kwargs["start_step"] = trainer.global_step  # resumed from a checkpoint
        self.recorder = make_recorder(self.path, pl_module, schedule=self.schedule, **kwargs)
        self._watcher = StepWatcher(optimizers)
        self._seen_steps = self._watcher.count
        self._last_global_step = trainer.global_step
        self._window.clear()
        if self.capture_indices and self._tracker is None:
            warnings.warn("sgdwalk: the training DataLoader has no batch sampler to track; batch indices are not recorded", stacklevel=2)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.recorder is not None:
            self._window.take(self._tracker if self.capture_indices else None)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.recorder is None or self._watcher is None:
            return
        self._window.add_loss(_loss_of(outputs))
        stepped = self._watcher.count != self._seen_steps
        if trainer.global_step == self._last_global_step and not stepped:
            return  # inside a gradient-accumulation window
        self._last_global_step = trainer.global_step
        self._seen_steps = self._watcher.count
        if stepped:  # a real update (not one skipped by the GradScaler)
            scalars: dict[str, Any] = {"global_step": trainer.global_step}
            if self._watcher.lr is not None:
                scalars["lr"] = self._watcher.lr  # in force for this update, read before the scheduler stepped
            if self._window.losses:
                scalars["loss"] = torch.stack(self._window.losses).sum()
            self.recorder.record(batch_indices=self._window.indices() if self.capture_indices else None, **scalars)
        self._window.clear()

    # ------------------------------------------------------------------ closing
    def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.remove()
            self._watcher = None
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close()
        self._unpatch()
        self._tracker = None


def _module_spec(pl_module: Any) -> Any:
    """``module:Class`` with the module's JSON-able ``hparams`` as kwargs; None for classes in ``__main__``."""
    import json

    from ..specs import Spec

    cls = type(getattr(pl_module, "module", pl_module))
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    try:
        kwargs = json.loads(json.dumps(dict(getattr(pl_module, "hparams", {}) or {})))
    except (TypeError, ValueError):
        warnings.warn(f"sgdwalk: the hparams of {cls.__qualname__} are not JSON-serialisable; the recorded model spec "
                      "has no kwargs (pass model_spec= to the callback)", stacklevel=3)
        kwargs = {}
    try:
        return Spec(f"{cls.__module__}:{cls.__qualname__}", kwargs)
    except Exception:  # a module path that is not an importable name
        return None
