"""Sampler wrappers that remember which sample indices went into each minibatch.

The replay test of the analyzer needs the exact minibatch of every recorded update. A
DataLoader draws batches of indices from its batch sampler *in the main process*, also with
``num_workers > 0`` (workers only receive the index lists), and returns batches in that order
(``in_order=True``, the default). So wrapping the batch sampler and keeping a FIFO of the lists
it yielded gives, for each training step, the indices of the batch the loop is consuming, even
while workers prefetch several batches ahead.
"""
from __future__ import annotations

import collections
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["RecordingBatchSampler", "record_indices"]


class RecordingBatchSampler(Sampler[list[int]]):
    """Wrap any batch sampler (or sampler + batch size); :meth:`pop` returns consumed batches in order.

    Use it as the DataLoader's ``batch_sampler``::

        tracker = RecordingBatchSampler.from_sampler(RandomSampler(ds), batch_size=64)
        loader = DataLoader(ds, batch_sampler=tracker, num_workers=4)
        with Recorder("run.h5", model, indices=tracker) as rec:
            for x, y in loader:
                ...; opt.step(); rec.record()   # pops the batch just trained on

    Starting a new iteration (a new epoch, or a loop that broke early) forgets batches the
    previous iteration prefetched but never delivered.
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]]):
        self.batch_sampler = batch_sampler
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._generation = 0

    @classmethod
    def from_sampler(cls, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False) -> "RecordingBatchSampler":
        return cls(BatchSampler(sampler, batch_size, drop_last))

    def __iter__(self) -> Iterator[list[int]]:
        with self._lock:
            self._queue.clear()
            self._generation += 1
            generation = self._generation
        for batch in self.batch_sampler:
            batch = [int(i) for i in batch]
            with self._lock:
                if generation == self._generation:
                    self._queue.append(np.asarray(batch, dtype=np.int64))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def pop(self) -> np.ndarray:
        """Indices of the oldest batch not yet popped: the one the training step just used."""
        with self._lock:
            if not self._queue:
                raise IndexError(
                    "no sampled batch is waiting: call pop() once per batch taken from the DataLoader that uses this sampler"
                )
            return self._queue.popleft()

    def pending(self) -> int:
        """Batches sampled (possibly prefetched by workers) but not yet popped."""
        with self._lock:
            return len(self._queue)


def record_indices(loader: DataLoader) -> tuple[DataLoader, RecordingBatchSampler]:
    """Rebuild ``loader`` with a :class:`RecordingBatchSampler` around its batch sampler.

    Returns the new loader and the tracker to hand to :class:`trajectory.Recorder`. Keeps the
    dataset, workers, collate function, pinning, prefetching and worker init of the original.
    """
    if loader.batch_sampler is None:
        raise ValueError("record_indices needs a DataLoader with batching (batch_size is None here)")
    tracker = RecordingBatchSampler(loader.batch_sampler)
    kwargs = dict(
        batch_sampler=tracker,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs), tracker
