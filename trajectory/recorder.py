"""The recorder: one or two added lines record any PyTorch training loop into an archive.

Two ways to use it::

    with Recorder("run.h5", model, optimizer=opt, indices=tracker) as rec:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            rec.record(loss=loss)           # after the step; batch indices come from `tracker`

    rec = Recorder("run.h5", model).attach(opt)   # records from the optimizer's step post-hook
    ...
    rec.close()

Why it stays cheap: ``record()`` only flattens the model into a preallocated host slot (on CUDA a
device-side concatenation and one non-blocking copy into pinned memory, waited for by the
writer thread, never by the training loop) and enqueues it. Compression and HDF5 writes happen
on a background thread fed through a fixed pool of slots, so memory is bounded and a slow disk
slows training (back-pressure) instead of filling RAM.

Step bookkeeping: ``rec.step`` counts optimizer updates. The state after ``s`` updates is
recorded as step ``s`` (the initial state is step 0). The batch indices and scalars passed to
``record()`` after the update that took step ``s`` to ``s + 1`` describe that update, so they are
stored under step ``s``: the archive's pair (s, s+1) then comes with exactly the minibatch that
produced it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import sys
import threading
import time
import warnings
from typing import Any, Mapping

import h5py
import numpy as np
import torch

from . import __version__
from .archive.codecs import DEFAULT_CODEC, get_codec
from .archive.layout import BUFFERS, BUFFERS_INT, PARAMS, ROW_DATASETS, Layout
from .archive.writer import ArchiveWriter
from .errors import LayoutMismatchError, RecorderError
from .optimizer_state import gather_state, recorded_state_keys, state_step_tensor
from .schedules import Every, Schedule, parse_schedule

__all__ = ["Recorder"]

_CLOSE = object()

# Batch indices and scalars of steps that store no record travel to the writer thread in bundles
# of up to this many queue items or this age (seconds), so that sparse schedules do not wake the
# writer on every step; a step that stores a record hands everything over at once.
_BUNDLE_ITEMS = 256
_BUNDLE_SECONDS = 0.05


def _spec_json(spec: Any) -> str:
    """A model/data spec (Spec, "module:factory" text, or (target, kwargs)) as canonical JSON."""
    if spec is None:
        return ""
    if hasattr(spec, "to_json"):
        return spec.to_json()
    if isinstance(spec, tuple):
        target, kwargs = spec
        return json.dumps({"target": target, "kwargs": dict(kwargs)}, sort_keys=True)
    if isinstance(spec, str):
        if spec.lstrip().startswith("{"):
            return json.dumps(json.loads(spec), sort_keys=True)
        return json.dumps({"target": spec, "kwargs": {}}, sort_keys=True)
    raise TypeError(f"a spec must be a Spec, a 'module:factory' string or (target, kwargs), not {type(spec).__name__}")


def _scrubbed_argv(argv: list[str]) -> list[str]:
    """The command line as provenance, without this machine's paths.

    ``argv[0]`` (the script or console-script path, e.g. ``/home/me/venv/bin/sgdwalk``) keeps only
    its file name; other absolute paths inside the working directory become relative to it, and
    absolute paths outside it keep only their file name. Archives are shared; where they were built is
    not part of the run.
    """
    cwd = os.getcwd()
    out = []
    for k, arg in enumerate(argv):
        arg = str(arg)
        if k == 0:
            arg = os.path.basename(arg)
        elif os.path.isabs(arg):
            arg = os.path.relpath(arg, cwd) if arg.startswith(cwd + os.sep) else os.path.basename(arg)
        out.append(arg)
    return out


def _main_module_warning(model: torch.nn.Module) -> None:
    """Say once, at start, how to make an archive of a model defined in the training script analysable."""
    cls = type(model)
    if cls.__module__ != "__main__":
        return
    script = os.path.basename(getattr(sys.modules.get("__main__"), "__file__", "") or "") or "your_script.py"
    warnings.warn(
        f"sgdwalk: the model class {cls.__qualname__} is defined in the running script (__main__), so the archive "
        f"cannot name it; to analyse it later pass model_spec='{os.path.splitext(script)[0]}:{cls.__qualname__}' "
        f"(and data_spec=...) here, or analyse with `sgdwalk analyze RUN --model ./{script}:{cls.__qualname__} "
        f"--data ./{script}:make_data` or analyze(RUN, model={cls.__qualname__}(), data=dataset); "
        f"keep the training under `if __name__ == \"__main__\":` so importing {script} does not train",
        stacklevel=3,
    )


def _with_sampler_batch_size(metadata: Mapping[str, Any] | None, indices: Any) -> dict[str, Any]:
    """The user's metadata plus ``batch_size`` read from the RecordingBatchSampler, unless the user set it.

    Reports label runs by their hyperparameters; an own training loop records no ``sgdwalk train`` metadata,
    but its batch sampler knows the batch size.
    """
    out = dict(metadata or {})
    if "batch_size" not in out and indices is not None:
        bs = getattr(getattr(indices, "batch_sampler", None), "batch_size", None)
        if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0:
            out["batch_size"] = bs
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def optimizer_info(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class and hyperparameters of an optimizer, JSON-ready (per parameter group, no tensors' data)."""
    cls = type(optimizer)
    groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "defaults": _jsonable(optimizer.defaults), "param_groups": groups}


class _Slot:
    """Host rows for one record in flight (pinned when the model lives on CUDA)."""

    def __init__(self, layout: Layout, pin: bool, optimizer_keys: tuple[str, ...] = ()):
        self.rows = {}
        for d in ROW_DATASETS:
            dtype = getattr(torch, str(layout.storage_dtype(d)))
            self.rows[d] = torch.empty(layout.sizes[d], dtype=dtype, pin_memory=pin)
        # optimizer state rows, in params layout and dtype, plus the optimizer's step count
        pdtype = getattr(torch, str(layout.storage_dtype(PARAMS)))
        self.opt = {k: torch.empty(layout.sizes[PARAMS], dtype=pdtype, pin_memory=pin) for k in optimizer_keys}
        self.opt_step = torch.empty((), dtype=torch.float64, pin_memory=pin) if optimizer_keys else None
        self.event: torch.cuda.Event | None = None
        self.step = -1
        self.time = 0.0


class Recorder:
    """Record a model's parameters (and buffers) plus each step's minibatch indices to an archive.

    Parameters
    ----------
    path : str or PathLike
        Archive to create.
    model : torch.nn.Module
        The model being trained; its state at construction is recorded as step ``start_step``.
    optimizer : Optimizer, optional
        Stored as provenance (class, hyperparameters); its learning rate is logged as scalar ``lr``.
    optimizer_state : bool
        Also record the optimizer's per-parameter state with every record (``optimizer/<key>`` rows in params
        order: SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``/``exp_avg_sq``; see docs/format.md), snapshot
        like the parameters. Off by default: it adds one or two params-sized rows per record.
    schedule : Schedule or str
        Which steps to record (default every step); see :mod:`trajectory.schedules`.
    indices : RecordingBatchSampler, optional
        Where ``record()`` takes batch indices from when none are passed.
    mode : {'x', 'w', 'a'}
        'x' (default) refuses an existing path, 'w' overwrites, 'a' appends (same model layout).
    codec : str
        Row codec; the default is lossless. Lossy 'bf16-*'/'fp16-*' codecs are marked in the file.
    model_spec, data_spec : Spec or str, optional
        Importable "module:factory" specs so a separate process can rebuild model and data.
    seed : int, optional
        Seed of the run, stored as provenance.
    metadata : dict, optional
        Free-form JSON-serialisable user metadata.
    record_buffers : bool
        Also record buffers (BatchNorm running statistics), needed for eval-mode analysis.
    all_indices : bool
        Store every step's minibatch indices, not only those leaving a recorded state.
    flush_interval : float
        Seconds between flushes of partial chunks: at most this much is lost if the process dies.
    slots : int, optional
        Records in flight between the training loop and the writer thread (memory bound). The
        default sizes the pool to absorb the writer's pause while it compresses a whole chunk
        (twice the chunk's rows) within 16 MiB of host memory, and never below 4 (so models of
        more than ~1 M parameters keep 4 slots; small, fast models get up to 128).
    start_step : int, optional
        Step count of the model's current state (default 0, or the archive's last step when appending).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: torch.nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Schedule | str | None = None,
        indices: Any = None,
        mode: str = "x",
        codec: str = DEFAULT_CODEC,
        model_spec: Any = None,
        data_spec: Any = None,
        seed: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        record_buffers: bool = True,
        all_indices: bool = False,
        flush_interval: float = 10.0,
        slots: int | None = None,
        chunk_rows: int | None = None,
        locking: bool | None = None,
        start_step: int | None = None,
        optimizer_state: bool = False,
    ):
        from .specs import importing_spec

        spec_module = importing_spec()
        if spec_module is not None:
            raise RecorderError(
                f"a Recorder for {os.fspath(path)} was opened while sgdwalk imported {spec_module!r} for a model/data "
                "spec: that module trains when imported; put its training code under `if __name__ == \"__main__\":`"
            )
        self.path = os.fspath(path)
        self.model = model
        if model_spec is None:
            _main_module_warning(model)
        self.schedule = parse_schedule(schedule) if isinstance(schedule, str) else (schedule or Every())
        self.indices = indices
        self.optimizer = optimizer
        self.all_indices = all_indices
        self.flush_interval = float(flush_interval)
        get_codec(codec)
        self.layout = Layout.from_module(model)
        if not record_buffers:
            self.layout = Layout(e for e in self.layout.entries if e.dataset == PARAMS)
        self._record_buffers = record_buffers
        self._refs = self._tensor_refs()
        self._opt_keys: tuple[str, ...] = ()
        self._opt_has_step = False
        if optimizer_state:
            if optimizer is None:
                raise RecorderError(
                    "optimizer_state=True needs the optimizer whose state to record: Recorder(..., optimizer=opt, optimizer_state=True)"
                )
            self._opt_keys, self._opt_has_step = recorded_state_keys(optimizer)
        attrs = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sgdwalk_version": __version__,
            "torch_version": torch.__version__,
            "h5py_version": h5py.version.version,
            "hdf5_version": h5py.version.hdf5_version,
            "python_version": sys.version.split()[0],
            "argv": _scrubbed_argv(list(sys.argv)),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_spec": _spec_json(model_spec),
            "data_spec": _spec_json(data_spec),
            "seed": -1 if seed is None else int(seed),
            "schedule": self.schedule.to_dict(),
            "metadata": _jsonable(_with_sampler_batch_size(metadata, indices)),
            "optimizer": optimizer_info(optimizer) if optimizer is not None else "",
        }
        self._writer = ArchiveWriter(
            self.path, self.layout, mode=mode, codec=codec, attrs=attrs, chunk_rows=chunk_rows, locking=locking,
            optimizer_keys=self._opt_keys,
        )
        last = self._writer.last_step
        self.step = int(start_step if start_step is not None else (last if last is not None else 0))
        self._last_recorded: int | None = last
        self.n_recorded = 0

        devices = {t.device for ts in self._refs.values() for t in ts}
        self._device = devices.pop() if len(devices) == 1 else None
        self._cuda = self._device is not None and self._device.type == "cuda"
        self._staging: dict[str, torch.Tensor] = {}
        self._free: queue.Queue[_Slot] = queue.Queue()
        if slots is None:
            slots = self._default_slots()
        for _ in range(max(1, slots)):
            self._free.put(_Slot(self.layout, pin=self._cuda, optimizer_keys=self._opt_keys))
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4096)
        self._pending: list[tuple] = []  # this thread's items not yet handed to the writer
        self._pending_since = 0.0
        self._error: BaseException | None = None
        self._staged: dict[str, Any] = {}
        self._hook = None
        self._closed = False
        self._started = False
        self._thread = threading.Thread(target=self._run_writer, name=f"sgdwalk-writer:{os.path.basename(self.path)}", daemon=True)
        self._thread.start()
        if self.step in self.schedule and self._last_recorded != self.step:
            self._snapshot()

    # ------------------------------------------------------------------ public API
    def record(self, batch_indices: Any = None, **scalars: Any) -> bool:
        """Call once after each ``optimizer.step()``; returns True if this step's state was stored.

        ``batch_indices`` (sequence, array or tensor of sample indices) is the minibatch that
        produced this update; when omitted it is popped from ``indices`` (a
        :class:`RecordingBatchSampler`) if one was given. Scalars (numbers or 0-d tensors, e.g.
        ``loss=loss``) are stored with the update; tensors are read on the writer thread so the
        training loop does not synchronize with the GPU.
        """
        self._raise_if_failed()
        if self._closed:
            raise RecorderError(f"record() after close() of the recorder for {self.path}")
        source = self.step
        self.step += 1
        if not self._started:  # training has begun: make the file visible to SWMR readers now
            self._started = True
            self._put(("flush", None))
        if self._staged:
            staged, self._staged = self._staged, {}
            if batch_indices is None:
                batch_indices = staged.pop("__batch__", None)
            staged.pop("__batch__", None)
            scalars = {**staged, **scalars}
        if batch_indices is None and self.indices is not None:
            batch_indices = self.indices.pop()
        if self.optimizer is not None and "lr" not in scalars:
            lr = self.optimizer.param_groups[0].get("lr")
            if lr is not None:
                scalars["lr"] = lr
        # One hand-over to the writer per recorded step (bundled for steps without a record).
        items: list[tuple] = []
        if batch_indices is not None and (self.all_indices or self._last_recorded == source):
            if isinstance(batch_indices, torch.Tensor):
                batch_indices = batch_indices.detach().to("cpu", non_blocking=False).numpy()
            items.append(("batch", source, np.asarray(batch_indices, dtype=np.int64).copy()))
        if scalars:
            items.append(("scalars", source, {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in scalars.items()}))
        if self.step not in self.schedule:
            self._put_items(items)
            return False
        try:
            items.append(self._snapshot(put=False))
        finally:  # batch and scalars are queued even if the snapshot raises
            self._put_items(items, now=True)
        return True

    @property
    def last_recorded_step(self) -> int | None:
        """Step of the most recent stored state (None before the first); decides which updates keep indices."""
        return self._last_recorded

    def stage(self, batch_indices: Any = None, **scalars: Any) -> None:
        """Give the batch indices / scalars of the coming step to the hook installed by :meth:`attach`."""
        if batch_indices is not None:
            self._staged["__batch__"] = batch_indices
        self._staged.update(scalars)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Recorder":
        """Record after every ``optimizer.step()`` through the optimizer's step post-hook."""
        if self._hook is not None:
            raise RecorderError("this recorder is already attached to an optimizer")
        if self.optimizer is None:
            self.optimizer = optimizer
            self._put(("attrs", {"optimizer": json.dumps(optimizer_info(optimizer), sort_keys=True)}))
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.record())
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything recorded so far is on disk and visible to readers."""
        done = threading.Event()
        self._put(("flush", done))
        while not done.wait(0.1 if timeout is None else timeout):
            self._raise_if_failed()
            if timeout is not None:
                raise RecorderError(f"flush of {self.path} did not finish within {timeout} s")
        self._raise_if_failed()

    def close(self) -> None:
        """Flush everything, close the file and mark it cleanly closed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self._thread.is_alive():
            try:
                self._send_pending()
            except RecorderError:
                pass  # the writer failed; its error is raised below
            self._queue.put(_CLOSE)
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RecorderError(f"writing {self.path} failed: {err}") from err

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except RecorderError:
            if exc_type is None:
                raise  # do not mask the user's own exception with ours

    def __del__(self) -> None:  # a forgotten close() still leaves a complete archive
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ internals
    def _tensor_refs(self) -> dict[str, list[torch.Tensor]]:
        state = self.model.state_dict(keep_vars=True)
        refs: dict[str, list[torch.Tensor]] = {d: [] for d in ROW_DATASETS}
        for e in self.layout.entries:
            refs[e.dataset].append(state[e.name])
        return refs

    def _check_structure(self) -> None:
        """Cheap identity check of the model's tensors; a full layout comparison only if it fails."""
        params = self._refs[PARAMS]
        current = list(self.model.parameters())
        if len(current) == len(params) and all(a is b for a, b in zip(current, params)):
            return
        try:
            layout = Layout.from_module(self.model)
            if not self._record_buffers:
                layout = Layout(e for e in layout.entries if e.dataset == PARAMS)
            if layout != self.layout:
                raise LayoutMismatchError("layout differs")
        except LayoutMismatchError:
            raise RecorderError(
                f"the model's parameters changed at step {self.step} (names, shapes or dtypes differ from the "
                f"first record of {self.path}); start a new archive for a new model"
            ) from None
        self._refs = self._tensor_refs()

    def _snapshot(self, put: bool = True) -> tuple:
        self._check_structure()
        slot = self._take_slot()
        with torch.no_grad():
            for d in ROW_DATASETS:
                parts = self._refs[d]
                if not parts:
                    continue
                flat = slot.rows[d]
                if self._cuda:
                    staging = self._staging.get(d)
                    if staging is None:
                        staging = self._staging[d] = torch.empty(flat.shape, dtype=flat.dtype, device=self._device)
                    torch.cat([p.detach().reshape(-1).to(flat.dtype) for p in parts], out=staging)
                    flat.copy_(staging, non_blocking=True)
                elif self._device is not None:  # no_grad: reshape needs no detach; cast only if needed
                    dt = flat.dtype
                    torch.cat([p.reshape(-1) if p.dtype == dt else p.reshape(-1).to(dt) for p in parts], out=flat)
                else:  # tensors on several devices (model parallel): gather piece by piece
                    torch.cat([p.detach().reshape(-1).to("cpu", flat.dtype) for p in parts], out=flat)
            if self._opt_keys:
                self._snapshot_optimizer(slot)
            if self._cuda:
                slot.event = torch.cuda.Event()
                slot.event.record()
        slot.step, slot.time = self.step, time.time()
        self._last_recorded = self.step
        self.n_recorded += 1
        item = ("record", slot)
        if put:
            self._put(item)
        return item

    def _snapshot_optimizer(self, slot: _Slot) -> None:
        """Copy the optimizer state into the slot exactly as the parameters are copied (same device rules).

        Parameters without state (before the first step, frozen ones, ones outside the optimizer) give zeros.
        The step count is copied as a tensor (non-blocking on CUDA), so the loop never waits for the device.
        """
        params = self._refs[PARAMS]
        for key in self._opt_keys:
            flat = slot.opt[key]
            parts = gather_state(self.optimizer, params, key)
            if self._cuda:
                staging = self._staging.get("optimizer/" + key)
                if staging is None:
                    staging = self._staging["optimizer/" + key] = torch.empty(flat.shape, dtype=flat.dtype, device=self._device)
                self._fill(staging, parts, params)
                flat.copy_(staging, non_blocking=True)
            elif self._device is not None:
                self._fill(flat, parts, params)
            else:  # model parallel: gather piece by piece onto the host
                self._fill(flat, [None if t is None else t.to("cpu") for t in parts], params)
        step = state_step_tensor(self.optimizer, params)
        if step is None:
            slot.opt_step.fill_(0.0 if self._opt_has_step else float("nan"))
        elif isinstance(step, torch.Tensor):
            slot.opt_step.copy_(step.detach().reshape(()), non_blocking=self._cuda)
        else:
            slot.opt_step.fill_(float(step))

    @staticmethod
    def _fill(out: torch.Tensor, parts: list[torch.Tensor | None], params: list[torch.Tensor]) -> None:
        """Concatenate state tensors into ``out`` in params order; zeros where a parameter has none."""
        dt = out.dtype
        if all(t is not None for t in parts):
            torch.cat([t.detach().reshape(-1) if t.dtype == dt else t.detach().reshape(-1).to(dt) for t in parts], out=out)
            return
        out.zero_()
        off = 0
        for t, p in zip(parts, params):
            n = p.numel()
            if t is not None:
                out[off : off + n].copy_(t.detach().reshape(-1))
            off += n

    def _default_slots(self) -> int:
        """Twice a chunk's rows (the writer pauses to compress a whole chunk), capped at 16 MiB, >= 4."""
        row_bytes = sum(self.layout.sizes[d] * self.layout.storage_dtype(d).itemsize for d in ROW_DATASETS)
        row_bytes += len(self._opt_keys) * self.layout.sizes[PARAMS] * self.layout.storage_dtype(PARAMS).itemsize
        store = self._writer.rows.get(PARAMS)
        chunk_rows = store.chunk_rows if store is not None else 4
        return max(4, min(2 * chunk_rows, (16 << 20) // max(1, row_bytes)))

    def _put_items(self, items: list, now: bool = False) -> None:
        """Queue one step's items; those of steps without a record may wait to travel in a bundle."""
        if items and not self._pending:
            self._pending_since = time.monotonic()
        self._pending.extend(items)
        if now or len(self._pending) >= _BUNDLE_ITEMS or time.monotonic() - self._pending_since >= _BUNDLE_SECONDS:
            self._send_pending()

    def _send_pending(self) -> None:
        items, self._pending = self._pending, []
        if len(items) == 1:
            self._put_raw(items[0])
        elif items:
            self._put_raw(("many", items))

    def _take_slot(self) -> _Slot:
        while True:  # back-pressure: wait for the writer, but notice if it died
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RecorderError(f"the writer thread of {self.path} stopped; the archive holds the records flushed so far")

    def _put(self, item: Any) -> None:
        if self._pending:  # keep the order in which items were produced
            self._send_pending()
        self._put_raw(item)

    def _put_raw(self, item: Any) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise RecorderError(f"writing {self.path} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err

    def _run_writer(self) -> None:
        w = self._writer
        pending_attrs: dict[str, Any] = {}
        next_flush = time.monotonic() + self.flush_interval
        try:
            while True:
                timeout = max(0.0, next_flush - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _CLOSE:
                    break
                if item is not None:
                    kind = item[0]
                    if kind == "many":
                        for sub in item[1]:
                            self._write_item(w, sub)
                    elif kind in ("record", "batch", "scalars"):
                        self._write_item(w, item)
                    elif kind == "attrs":
                        pending_attrs.update(item[1])
                    elif kind == "flush":
                        self._write_attrs(pending_attrs)
                        w.flush()
                        next_flush = time.monotonic() + self.flush_interval
                        if item[1] is not None:
                            item[1].set()
                if pending_attrs and not w._swmr:
                    self._write_attrs(pending_attrs)
                if time.monotonic() >= next_flush:
                    w.flush()
                    next_flush = time.monotonic() + self.flush_interval
            self._write_attrs(pending_attrs)
            w.close()
        except BaseException as err:  # surface in the training thread; keep what was flushed
            self._error = err
            try:
                w.abort()
            except BaseException:
                pass
            while True:  # unblock a training loop waiting for a slot
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _write_item(self, w: ArchiveWriter, item: tuple) -> None:
        kind = item[0]
        if kind == "record":
            slot = item[1]
            if slot.event is not None:
                slot.event.synchronize()
            rows = {d: slot.rows[d].numpy() for d in w.rows}
            if slot.opt:
                opt_rows = {k: v.numpy() for k, v in slot.opt.items()}
                w.add_record(slot.step, rows, slot.time, optimizer_rows=opt_rows, state_step=float(slot.opt_step))
            else:
                w.add_record(slot.step, rows, slot.time)
            self._free.put(slot)
        elif kind == "batch":
            w.add_batch(item[1], item[2])
        else:  # scalars
            w.add_scalars(item[1], {k: float(v) for k, v in item[2].items()})

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        if not attrs:
            return
        if self._writer._swmr:
            warnings.warn(f"could not store {sorted(attrs)} in {self.path}: attach() came after the first flush", stacklevel=2)
        else:
            for k, v in attrs.items():
                self._writer.file.attrs[k] = v
        attrs.clear()
