"""Record a ``torch.distributed`` (DistributedDataParallel) run into one archive.

Every rank builds a :class:`DistributedRecorder` with the same arguments and calls ``record()``
after each ``optimizer.step()`` (or uses ``attach``). Only rank 0 creates and writes the archive;
the other ranks never open the file. What each rank contributes is its minibatch indices: they
are gathered (rank order, unequal lengths allowed) so that the archive holds the *global* batch of
every update, the batch whose averaged gradient DDP applied::

    dist.init_process_group("nccl")            # or "gloo"
    ddp = DistributedDataParallel(model.cuda(), device_ids=[local_rank])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loader, tracker = record_indices(DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds)))
    with DistributedRecorder("run.h5", ddp, optimizer=opt, indices=tracker) as rec:
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                loss = F.cross_entropy(ddp(x.cuda()), y.cuda())
                opt.zero_grad(); loss.backward(); opt.step()
                rec.record(loss=loss)          # a collective: every rank calls it, every step

The parameters are those of the unwrapped module (``ddp.module``), so the archive's state-dict
names are the plain model's and ``Trajectory.load_into(model, i)`` works on an unwrapped model.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ..errors import RecorderError
from ..optimizer_state import recorded_state_keys
from ..recorder import Recorder
from ..schedules import Every, Schedule, parse_schedule

__all__ = ["DistributedRecorder", "unwrap_model", "make_recorder"]

_SCALAR_MODES = ("rank0", "mean")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def _distributed(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: Any) -> torch.device:
    """A device the group's backend can run collectives on (CPU for gloo/mpi, the current GPU for NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def _as_index_array(batch: Any) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().to("cpu").numpy()
    arr = np.asarray(batch, dtype=np.int64).reshape(-1)
    return arr


class DistributedRecorder:
    """A :class:`~trajectory.Recorder` for ``torch.distributed`` runs; the same API, called on every rank.

    Parameters
    ----------
    path : str or PathLike
        Archive to create; only rank 0 opens it (the same path may be passed on every rank).
    model : torch.nn.Module
        The model being trained, wrapped in ``DistributedDataParallel`` or not; the unwrapped
        module is recorded, so state-dict names carry no ``module.`` prefix.
    optimizer, schedule, all_indices
        As for :class:`~trajectory.Recorder`.
    indices : RecordingBatchSampler, optional
        This rank's tracker (e.g. around a ``DistributedSampler``'s batch sampler); popped on every
        ``record()`` of every rank when no ``batch_indices`` are passed.
    scalars : {'rank0', 'mean'}
        ``'rank0'`` (default) stores rank 0's scalars as passed, with no communication.
        ``'mean'`` stores the mean over ranks (one all-reduce per ``record()``); every rank must
        then pass the same scalar names.
    process_group : ProcessGroup, optional
        Group to gather over (default: the default process group); its rank 0 writes.
    device : torch.device, optional
        Device for the gather/reduce tensors (default: CPU for gloo, the current CUDA device for NCCL).
    optimizer_state : bool
        Also record the optimizer state (as :class:`~trajectory.Recorder`). Under DDP every rank's optimizer
        holds the same state (gradients are all-reduced), so rank 0 records its own without communication;
        every rank checks the optimizer first, so a refusal is the same one line everywhere. Sharded
        optimizers (``ZeroRedundancyOptimizer``) are refused.
    **kwargs
        Any other :class:`~trajectory.Recorder` argument (``codec``, ``mode``, ``model_spec``,
        ``metadata``, ...), used by rank 0.

    ``record()`` is a collective: all ranks must call it once per optimizer step, in the same
    order. It gathers the batch indices only for updates whose indices the archive keeps (those
    leaving a recorded state, or all with ``all_indices=True``). When not running distributed
    (no process group, or world size 1) it behaves exactly like a :class:`Recorder`.
    """

    def __init__(
        self,
        path: Any,
        model: torch.nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Schedule | str | None = None,
        indices: Any = None,
        all_indices: bool = False,
        scalars: str = "rank0",
        process_group: Any = None,
        device: torch.device | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        optimizer_state: bool = False,
        **kwargs: Any,
    ):
        if optimizer_state:  # on every rank, before rank 0 creates anything: the same error everywhere
            if optimizer is None:
                raise RecorderError(
                    "optimizer_state=True needs the optimizer whose state to record: "
                    "DistributedRecorder(..., optimizer=opt, optimizer_state=True)"
                )
            recorded_state_keys(optimizer)
        if scalars not in _SCALAR_MODES:
            raise ValueError(f"scalars must be one of {_SCALAR_MODES}, not {scalars!r}")
        if "start_step" in kwargs and kwargs["start_step"] is None:
            kwargs.pop("start_step")
        self.path = os.fspath(path)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.schedule = parse_schedule(schedule) if isinstance(schedule, str) else (schedule or Every())
        self.indices = indices
        self.all_indices = bool(all_indices)
        self.scalars_mode = scalars
        self.group = process_group
        self.distributed = _distributed(process_group)
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.world_size = dist.get_world_size(process_group) if self.distributed else 1
        self._src = (dist.get_global_rank(process_group, 0) if process_group is not None else 0) if self.distributed else 0
        self.device = torch.device(device) if device is not None else (_collective_device(process_group) if self.distributed else torch.device("cpu"))
        self._staged: dict[str, Any] = {}
        self._hook = None
        self._closed = False
        self._n_recorded = 0
        self.recorder: Recorder | None = None

        meta = dict(metadata or {})
        if self.distributed:
            meta.setdefault(
                "distributed",
                {
                    "world_size": self.world_size,
                    "backend": str(dist.get_backend(process_group)),
                    "batch_indices": "global batch: the ranks' minibatches concatenated in rank order",
                    "scalars": scalars,
                },
            )
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.recorder = Recorder(
                    path, self.model, optimizer=optimizer, schedule=self.schedule, indices=None,
                    all_indices=all_indices, metadata=meta, optimizer_state=optimizer_state, **kwargs,
                )
            except BaseException as err:  # tell the other ranks before raising, so they do not hang
                error = err
        state = torch.tensor([-1, -1, -1, 0], dtype=torch.int64)
        if self.recorder is not None:
            last = self.recorder.last_recorded_step  # mirrored on every rank
            state = torch.tensor([1, self.recorder.step, -1 if last is None else last, self.recorder.n_recorded], dtype=torch.int64)
        if self.distributed:
            state = state.to(self.device)
            dist.broadcast(state, src=self._src, group=process_group)
            state = state.cpu()
        if error is not None:
            raise error
        if int(state[0]) != 1:
            raise RecorderError(f"rank 0 could not create the archive {self.path}; see rank 0's error")
        self.step = int(state[1])
        self._last_recorded: int | None = None if int(state[2]) < 0 else int(state[2])
        self._n_recorded = int(state[3])

    # ------------------------------------------------------------------ public API (mirrors Recorder)
    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the archive (rank 0 of the group)."""
        return self.recorder is not None

    @property
    def n_recorded(self) -> int:
        """Records written so far (the same number on every rank)."""
        return self.recorder.n_recorded if self.recorder is not None else self._n_recorded

    def record(self, batch_indices: Any = None, **scalars: Any) -> bool:
        """Call on every rank once after each ``optimizer.step()``; returns True if the state was stored.

        ``batch_indices`` are this rank's minibatch (or popped from ``indices``); the archive
        stores the ranks' minibatches concatenated in rank order. Scalars: see ``scalars=``.
        """
        if self._closed:
            raise RecorderError(f"record() after close() of the recorder for {self.path}")
        source = self.step
        self.step += 1
        if self._staged:
            staged, self._staged = self._staged, {}
            staged_batch = staged.pop("__batch__", None)
            if batch_indices is None:
                batch_indices = staged_batch
            scalars = {**staged, **scalars}
        if batch_indices is None and self.indices is not None:
            batch_indices = self.indices.pop()  # every rank, every step: keeps each FIFO aligned
        need = self.all_indices or self._last_recorded == source
        global_batch = None
        if need:
            if self.distributed:
                global_batch, sizes = self._gather(batch_indices)
                if global_batch is not None and len(set(sizes)) > 1:
                    # DDP averages per-rank means: with unequal sizes the replay needs the split
                    scalars.update({f"batch_size/rank{r}": n for r, n in enumerate(sizes)})
            elif batch_indices is not None:
                global_batch = _as_index_array(batch_indices)
        if self.distributed and self.scalars_mode == "mean" and scalars:
            scalars = self._mean(scalars)
        recorded = self.step in self.schedule
        if self.recorder is not None:
            stored = self.recorder.record(batch_indices=global_batch, **scalars)
            if stored != recorded:  # cannot happen unless the inner recorder was used directly
                raise RecorderError(f"rank 0's recorder for {self.path} is out of step with the other ranks")
        elif recorded:
            self._n_recorded += 1
        if recorded:
            self._last_recorded = self.step
        return recorded

    def stage(self, batch_indices: Any = None, **scalars: Any) -> None:
        """Give this rank's batch indices / scalars of the coming step to the hook installed by :meth:`attach`."""
        if batch_indices is not None:
            self._staged["__batch__"] = batch_indices
        self._staged.update(scalars)

    def attach(self, optimizer: torch.optim.Optimizer) -> "DistributedRecorder":
        """Record after every ``optimizer.step()`` (on every rank) through the optimizer's step post-hook."""
        if self._hook is not None:
            raise RecorderError("this recorder is already attached to an optimizer")
        if self.optimizer is None:
            self.optimizer = optimizer
        if self.recorder is not None and self.recorder.optimizer is None:
            # stores the optimizer's provenance (and its lr as a scalar); the hook is ours, not rank 0's alone
            self.recorder.attach(optimizer)
            self.recorder.detach()
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.record())
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def flush(self, timeout: float | None = None) -> None:
        """On rank 0, block until everything recorded is on disk; a no-op on the other ranks."""
        if self.recorder is not None:
            self.recorder.flush(timeout)

    def close(self) -> None:
        """Close the archive on rank 0 (not a collective: call ``dist.barrier()`` before other ranks read it)."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self.recorder is not None:
            self.recorder.close()

    def __enter__(self) -> "DistributedRecorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except RecorderError:
            if exc_type is None:
                raise

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ collectives
    def _gather(self, batch: Any) -> tuple[np.ndarray | None, list[int]]:
        """All ranks' indices, concatenated in rank order; (None, []) when no rank has any."""
        local = None if batch is None else _as_index_array(batch)
        n = torch.tensor([-1 if local is None else len(local)], dtype=torch.int64, device=self.device)
        lengths = [torch.empty_like(n) for _ in range(self.world_size)]
        dist.all_gather(lengths, n, group=self.group)
        sizes = [int(t.item()) for t in lengths]
        if all(s < 0 for s in sizes):
            return None, []
        if any(s < 0 for s in sizes):
            missing = [r for r, s in enumerate(sizes) if s < 0]
            raise RecorderError(
                f"step {self.step - 1}: ranks {missing} passed no batch indices while others did; "
                "give every rank batch_indices (or an indices= tracker) or none"
            )
        width = max(1, max(sizes))
        padded = torch.zeros(width, dtype=torch.int64, device=self.device)
        if len(local):
            padded[: len(local)] = torch.from_numpy(local).to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        out = np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)])
        return out, sizes

    def _mean(self, scalars: dict[str, Any]) -> dict[str, Any]:
        names = sorted(scalars)
        values = []
        for k in names:
            v = scalars[k]
            v = v.detach().reshape(()).to(self.device, torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=self.device)
            values.append(v)
        stacked = torch.stack(values)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
        stacked = stacked / self.world_size
        return {k: stacked[i] for i, k in enumerate(names)}


def make_recorder(path: Any, model: torch.nn.Module, **kwargs: Any) -> Recorder | DistributedRecorder:
    """A :class:`DistributedRecorder` inside a multi-process ``torch.distributed`` run, else a :class:`Recorder`.

    Used by the trainer callbacks, which run on every rank. ``scalars=`` and ``process_group=``
    are only meaningful (and only accepted) in the distributed case.
    """
    if _distributed(kwargs.get("process_group")):
        return DistributedRecorder(path, model, **kwargs)
    for key in ("scalars", "process_group", "device"):
        kwargs.pop(key, None)
    return Recorder(path, unwrap_model(model), **kwargs)

