"""Pieces the trainer callbacks share: index capture on a trainer-built DataLoader, real-step detection.

Index capture: trainers build (and rebuild, e.g. to inject a ``DistributedSampler``) their own
DataLoaders, so a user-supplied batch sampler does not survive. What does survive is the final
``DataLoader`` object the trainer iterates. Before its first iteration we put a
:class:`RecordingBatchSampler` around its batch sampler. It is transparent (attribute reads and
writes go to the wrapped batch sampler, so ``set_epoch``, ``batch_size``, ``.sampler`` and
friends keep working). Index lists are drawn in the main process, also with worker processes,
so the FIFO order is the order in which the trainer consumes batches.

Real-step detection: an optimizer step post-hook fires only when ``optimizer.step()`` really
ran. ``GradScaler.step`` does not call it when the gradients overflowed, so a skipped AMP step
never looks like an update.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..samplers import RecordingBatchSampler

_OWN = frozenset({"batch_sampler", "_queue", "_lock", "_generation"})


class TransparentRecordingBatchSampler(RecordingBatchSampler):
    """A :class:`RecordingBatchSampler` that forwards every other attribute to the batch sampler it wraps."""

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or "batch_sampler" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.batch_sampler, name, value)


def install_tracker(loader: Any) -> RecordingBatchSampler | None:
    """Wrap the batch sampler of an already built DataLoader in place; None if it has none.

    Handles accelerate's ``DataLoaderShard`` (it iterates a wrapped ``base_dataloader``). Must run
    before the loader's next ``iter()``; an existing persistent-workers iterator is dropped so the
    next epoch starts one that draws from the tracker.
    """
    base = loader
    for _ in range(4):  # DataLoaderShard -> DataLoader (accelerate), possibly nested adapters
        inner = getattr(base, "base_dataloader", None)
        if inner is None or inner is base:
            break
        base = inner
    if not isinstance(base, DataLoader) or base.batch_sampler is None:
        return None
    current = base.batch_sampler
    if isinstance(current, RecordingBatchSampler):
        return current
    tracker = TransparentRecordingBatchSampler(current)
    object.__setattr__(base, "batch_sampler", tracker)  # DataLoader forbids plain assignment after init
    if getattr(base, "_iterator", None) is not None:
        object.__setattr__(base, "_iterator", None)
    return tracker


class StepWatcher:
    """Counts real ``optimizer.step()`` calls through step post-hooks (skipped GradScaler steps do not count).

    It also reads the learning rate in force for each step (first parameter group of the first optimizer)
    in a step *pre*-hook, i.e. before the step runs and before any scheduler steps: trainers call
    ``scheduler.step()`` right after ``optimizer.step()`` and before the callbacks, so reading the optimizer
    in the callback would give the *next* step's rate. :attr:`lr` is that value for the last real step.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.count = 0
        self.lr: float | None = None
        self._pending_lr: float | None = None
        self._handles = []
        for k, opt in enumerate(optimizers):
            opt = innermost_optimizer(opt)
            if k == 0:
                self._handles.append(opt.register_step_pre_hook(self._pre_hook))
            self._handles.append(opt.register_step_post_hook(self._hook))

    def _pre_hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        lr = opt.param_groups[0].get("lr") if opt.param_groups else None
        self._pending_lr = float(lr) if lr is not None else None

    def _hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        self.count += 1
        if self._pending_lr is not None:
            self.lr = self._pending_lr

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers (Lightning's LightningOptimizer, accelerate's AcceleratedOptimizer)."""
    for _ in range(4):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            break
        opt = inner
    return opt


class BatchWindow:
    """Minibatch indices (and losses) consumed since the last optimizer step."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray | None] = []
        self.losses: list[torch.Tensor] = []
        self._warned = False

    def take(self, tracker: RecordingBatchSampler | None) -> None:
        """Pop the batch the trainer is about to use (or just used) from ``tracker``."""
        if tracker is None:
            self.batches.append(None)
            return
        try:
            self.batches.append(tracker.pop())
        except IndexError:
            self.batches.append(None)
            if not self._warned:
                self._warned = True
                warnings.warn("sgdwalk: a training batch did not come from the tracked DataLoader; its indices are not recorded", stacklevel=3)

    def add_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach().reshape(()))

    def indices(self) -> np.ndarray | None:
        """The window's indices concatenated in consumption order; None if any batch is unknown."""
        if not self.batches or any(b is None for b in self.batches):
            return None
        return np.concatenate(self.batches)

    def clear(self) -> None:
        self.batches.clear()
        self.losses.clear()
