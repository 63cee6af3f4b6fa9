"""🤗 Transformers: record a ``Trainer.train()`` run with one line::

    from trajectory.integrations.huggingface import SgdwalkTrainerCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SgdwalkTrainerCallback("run.h5")])

What is recorded: ``trainer.model``'s state dict before training (step 0) and after every *real*
optimizer step (``on_step_end``, which the Trainer calls once per optimizer step, also with
``gradient_accumulation_steps > 1``). The stored minibatch of an update is the indices of all
its micro-batches concatenated in order. A step that the AMP ``GradScaler`` skipped (fp16
overflow) changes nothing and is not recorded. Archive step ``s`` counts real updates;
``state.global_step`` is stored with each update as the scalar ``global_step``, and ``lr`` is the
learning rate the update used: it is read in an optimizer step pre-hook, before the Trainer steps its
scheduler (reading it in ``on_step_end`` would give the *next* step's rate). The training loss is not
handed to callbacks, so it is not stored.

Analysis needs no adapter code: the callback records the model spec wrapped in the ``huggingface``
adapter (:mod:`trajectory.adapters`: dict batches with ``labels``, ``output.logits``). A model of a
``transformers`` class is recorded as the built-in ``trajectory.adapters:hf_from_config`` spec (its
config, no weights, no remote code), so ``sgdwalk analyze run.h5 --data ./data.py:make_data`` is the
whole command (or pass ``data_spec=`` here and analyse with ``--trust-specs``). The data factory returns
the training dataset: dict items with ``labels`` (or ``label``) and the model's input fields, padded to
one length.

How the indices are captured: the Trainer builds its own sampler and DataLoader (and
``accelerate`` rebuilds it for distributed runs), and it drops dataset columns that the
model's ``forward`` does not accept, so an index column would not survive. Instead, in
``on_train_begin`` — after the loader is built and before it is first iterated — the callback
wraps the loader's batch sampler (inside accelerate's ``DataLoaderShard``) in a transparent
:class:`~trajectory.RecordingBatchSampler` and pops one entry per micro-batch
(``on_substep_end``/``on_step_end``). Indices are the positions in ``train_dataset`` the
Trainer was given (after its column removal, which keeps rows). Map-style datasets only;
with an ``IterableDataset`` parameters are still recorded, without indices.

Under multi-process training (``torchrun``/``accelerate launch``) the callback runs on every
process and records through a :class:`~trajectory.integrations.ddp.DistributedRecorder`
(process 0 writes; indices of all processes are gathered in rank order).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("trajectory.integrations.huggingface needs 🤗 Transformers: pip install sgdwalk[hf]") from None

from ..adapters import HuggingFace, adapted_spec, hf_model_spec, input_fields
from ._common import BatchWindow, StepWatcher, innermost_optimizer, install_tracker
from .ddp import make_recorder

__all__ = ["SgdwalkTrainerCallback"]


class SgdwalkTrainerCallback(TrainerCallback):
    """Record the trajectory of ``transformers.Trainer.train()`` into an sgdwalk archive.

    Parameters
    ----------
    path : str or PathLike
        Archive to create (by process 0 only).
    schedule : Schedule or str, optional
        Which steps to record (default every step), as for :class:`~trajectory.Recorder`.
    capture_indices : bool
        Record each update's minibatch indices (default True); see the module docs for how.
    scalars : {'rank0', 'mean'}
        Multi-process runs: store process 0's scalars or their mean (``global_step`` and ``lr``
        are the same everywhere).
    **recorder_kwargs
        Any other :class:`~trajectory.Recorder` argument: ``codec``, ``mode``, ``model_spec``,
        ``data_spec``, ``seed``, ``metadata``, ``record_buffers``, ``all_indices``,
        ``optimizer_state`` (record the Trainer's optimizer state: Adam(W) moments, SGD momentum), ...

    Resuming (``train(resume_from_checkpoint=...)``): recording continues at the checkpoint's
    ``global_step`` (pass ``mode="a"`` to append to the earlier archive, or a new path); the
    rest of the resumed epoch is recorded without indices, because the Trainer fast-forwards
    the loader past batches it does not train on.
    """

    def __init__(self, path: str | os.PathLike, schedule: Any = None, *, capture_indices: bool = True, scalars: str = "rank0", **recorder_kwargs: Any):
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
        self._paused = False
        self._epochs = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("SgdwalkTrainerCallback needs the Trainer's model and optimizer in on_train_begin")
        opt = innermost_optimizer(optimizer)
        rec_kwargs = dict(self.recorder_kwargs)
        rec_kwargs.setdefault("optimizer", opt)
        rec_kwargs["scalars"] = self.scalars
        spec = rec_kwargs.get("model_spec") or hf_model_spec(model)
        if spec is not None:
            rec_kwargs["model_spec"] = adapted_spec(spec, HuggingFace(**_input_fields(model, train_dataloader)))
        if state.global_step and "start_step" not in rec_kwargs and rec_kwargs.get("mode", "x") != "a":
            rec_kwargs["start_step"] = state.global_step  # resumed from a checkpoint
        self.recorder = make_recorder(self.path, model, schedule=self.schedule, **rec_kwargs)
        self._watcher = StepWatcher([opt])
        self._seen_steps = self._watcher.count
        self._window.clear()
        self._tracker = install_tracker(train_dataloader) if (self.capture_indices and train_dataloader is not None) else None
        if self.capture_indices and self._tracker is None:
            warnings.warn("sgdwalk: the Trainer's training DataLoader has no batch sampler to track; batch indices are not recorded", stacklevel=2)
        self._paused = bool(state.global_step) and not getattr(args, "ignore_data_skip", False)
        self._epochs = 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epochs += 1
        if self._epochs > 1:
            self._paused = False  # a fresh pass over the loader: the tracker starts a new FIFO

    def _take(self) -> None:
        self._window.take(None if (self._paused or not self.capture_indices) else self._tracker)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self._take()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None or self._watcher is None:
            return
        self._take()
        stepped = self._watcher.count != self._seen_steps
        self._seen_steps = self._watcher.count
        if stepped:  # a real update, not one skipped by the GradScaler
            scalars = {"global_step": state.global_step}
            if self._watcher.lr is not None:
                scalars["lr"] = self._watcher.lr  # in force for this step, read before the scheduler stepped
            self.recorder.record(batch_indices=self._window.indices() if self.capture_indices else None, **scalars)
        self._window.clear()

    def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.remove()
            self._watcher = None
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()


def _input_fields(model: Any, loader: Any) -> dict[str, Any]:
    """The adapter's ``input_keys`` (fields the model's forward takes) and ``fields`` (numeric fields of an item).

    The Trainer feeds ``forward`` only the dataset columns its signature names; the analysis data (the same
    dataset) may still hold the others, so both lists are recorded and the adapter picks the inputs.
    """
    import inspect

    dataset = getattr(loader, "dataset", None)
    try:
        item = dataset[0] if dataset is not None else None
    except Exception:  # iterable datasets, lazy loading errors: fall back to the default field rule
        item = None
    if not isinstance(item, dict):
        return {}
    try:
        accepted = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        accepted = set(item)
    fields = input_fields(item)
    inputs = [k for k in fields if k in accepted]
    return {"input_keys": inputs, "fields": fields} if inputs else {}
