"""The built-in trainer behind ``sgdwalk train``: plain SGD on a zoo (or your own) model and data, recorded.

Everything the command line does is one call of :func:`train`, so a notebook or script gets exactly
the same run::

    from trajectory.training import train
    summary = train("mlp", "mnist1d", lr=0.1, batch_size=64, steps=300, out="run.h5")

What is fixed on purpose, so that every recorded update can be replayed exactly:

* the optimizer is ``torch.optim.SGD`` (learning rate, momentum, weight decay) or, with
  ``optimizer="adam"``, ``torch.optim.Adam`` (``betas``, ``eps``); no scheduler other than the explicit
  ``lr_drop`` steps, and every update's learning rate is stored as scalar ``lr``. With
  ``record_optimizer_state`` the momentum buffer / Adam moments are recorded with the parameters, and a
  resumed run continues from them;
* minibatches come from epochs of :class:`torch.utils.data.RandomSampler` driven by a
  ``torch.Generator`` seeded with ``seed`` (``drop_last=True``, so every batch has ``batch_size``
  samples), repeated until ``steps`` updates are done; their sample indices are recorded through a
  :class:`~trajectory.samplers.RecordingBatchSampler`;
* the model is built right after ``torch.manual_seed(seed)`` from a :class:`~trajectory.specs.Spec`
  whose kwargs include the sizes derived from the data (input shape, number of classes), and that
  exact spec is stored in the archive, so a separate process rebuilds the same network;
* the model stays in ``train()`` mode and the loss is the mean cross-entropy of the minibatch.

The state after ``s`` updates is step ``s``; the loss and accuracy passed to the recorder with the
update leaving step ``s`` are those of the minibatch at the parameters of step ``s`` (before the
update), so the archive's pair ``(s, s + 1)`` comes with its own minibatch, loss and accuracy.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from .errors import ArchiveExistsError, DataNotFoundError, SgdwalkError
from .recorder import Recorder
from .samplers import RecordingBatchSampler
from .schedules import Schedule, parse_schedule
from .specs import Spec, build_dataset, build_model, resolve_data_spec, resolve_model_spec, size_model_spec

__all__ = ["train", "TrainingInterrupted", "parse_lr_drops", "parse_betas", "resolve_device", "StepBatches", "OPTIMIZERS"]

#: Optimizers ``train`` builds (``torch.optim.SGD`` / ``torch.optim.Adam``).
OPTIMIZERS = ("sgd", "adam")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the archive was closed cleanly; ``summary`` says what it holds.

    A subclass of :class:`KeyboardInterrupt`, so a script that does not catch it still stops.
    """

    def __init__(self, summary: dict[str, Any]):
        super().__init__(f"training interrupted after {summary['final_step']} steps; {summary['out']} holds {summary['records']} records")
        self.summary = summary


class StepBatches:
    """Index batches of updates ``start .. stop-1`` of a seeded run, as a DataLoader batch sampler.

    Update ``k`` (0-based) uses the ``k``-th batch of the stream: epochs of a
    ``RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))`` cut into batches of
    ``batch_size`` (the last partial batch of each epoch dropped), epoch after epoch. The stream
    depends only on ``(n, batch_size, seed)``, so starting at ``start > 0`` (resuming an archive)
    skips the first ``start`` batches without touching the data and continues the same sequence.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n} samples)")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start, self.stop = int(start), int(stop)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        epoch = BatchSampler(RandomSampler(range(self.n), generator=generator), self.batch_size, drop_last=True)
        k = 0
        while k < self.stop:
            for batch in epoch:
                if k >= self.stop:
                    return
                if k >= self.start:
                    yield batch
                k += 1


def parse_lr_drops(drops: Any) -> list[tuple[int, float]]:
    """Learning-rate drops as sorted ``(step, factor)`` pairs.

    Accepts ``None``, a mapping ``{step: factor}``, pairs ``[(step, factor), ...]``, or text
    ``"STEP:FACTOR"`` (several joined by commas, or a list of such strings, as the CLI passes
    them). From update ``step`` on (the update leaving the state of step ``step``) the learning
    rate is multiplied by ``factor``; drops compound.
    """
    if drops is None:
        return []
    items: list[tuple[Any, Any]] = []
    if isinstance(drops, Mapping):
        items = list(drops.items())
    else:
        if isinstance(drops, str):
            drops = [drops]
        for d in drops:
            if isinstance(d, str):
                for part in d.split(","):
                    part = part.strip()
                    if not part:
                        continue
                    step, sep, factor = part.partition(":")
                    if not sep:
                        raise ValueError(f"bad lr drop {part!r}: use STEP:FACTOR, e.g. 500:0.1")
                    items.append((step, factor))
            else:
                step, factor = d
                items.append((step, factor))
    out = []
    for step, factor in items:
        try:
            s, f = int(step), float(factor)
        except (TypeError, ValueError):
            raise ValueError(f"bad lr drop {step}:{factor}: use STEP:FACTOR with an integer step and a number") from None
        if s < 0 or not (f > 0 and math.isfinite(f)):
            raise ValueError(f"bad lr drop {s}:{f}: the step must be >= 0 and the factor a positive number")
        out.append((s, f))
    return sorted(out)


def parse_betas(betas: Any) -> tuple[float, float]:
    """Adam's ``(beta1, beta2)`` from a pair or ``"B1,B2"`` text; each must lie in [0, 1)."""
    if isinstance(betas, str):
        parts = [p.strip() for p in betas.split(",")]
    else:
        parts = list(betas) if isinstance(betas, (list, tuple)) else [betas]
    try:
        if len(parts) != 2:
            raise ValueError
        b1, b2 = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"bad betas {betas!r}: give two numbers B1,B2 such as 0.9,0.999") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"bad betas {b1:g},{b2:g}: each must be >= 0 and < 1")
    return b1, b2


def _make_optimizer(name: str, params: Any, *, lr: float, momentum: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_at(lr: float, drops: Sequence[tuple[int, float]], step: int) -> float:
    for s, f in drops:
        if s <= step:
            lr *= f
    return lr


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU; an explicit device must exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {' '.join(str(err).split())}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {minimum:g}, got {value!r}")


def _with_data_dir(spec: Spec, data_dir: str | os.PathLike | None) -> Spec:
    """Put ``data_dir`` (absolute) into the data spec as the factory's ``root`` argument."""
    if data_dir is None:
        return spec
    factory = spec.resolve(trusted=True)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "root" not in params:
        raise ValueError(
            f"--data-dir is for data sets read from disk, but {spec.target} takes no 'root' argument; drop --data-dir"
        )
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data directory {root} does not exist (sgdwalk never downloads data)")
    given = spec.kwargs.get("root")
    if given is not None and os.path.abspath(os.path.expanduser(str(given))) != root:
        raise ValueError(f"data kwargs give root={given!r} but --data-dir is {root}; give only one")
    return Spec(spec.target, {**spec.kwargs, "root": root})


def train(
    model: str | Spec = "mlp",
    data: str | Spec = "mnist1d",
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    lr: float = 0.1,
    batch_size: int = 64,
    steps: int = 1000,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    betas: Any = (0.9, 0.999),
    eps: float = 1e-8,
    record_optimizer_state: bool = False,
    seed: int = 0,
    schedule: Schedule | str = "every",
    out: str | os.PathLike,
    mode: str = "x",
    codec: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    data_dir: str | os.PathLike | None = None,
    augment: bool = False,
    progress: bool = True,
    lr_drop: Any = None,
    record_buffers: bool = True,
    all_indices: bool = False,
    flush_interval: float = 10.0,
    metadata: Mapping[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` with plain SGD for ``steps`` updates and record the run to ``out``.

    Parameters
    ----------
    model, data : str or Spec
        Zoo short names (``"mlp"``, ``"mlp_bn"``, ``"cnn"``, ``"vgg11_bn"``, ``"resnet18"``, ...;
        ``"mnist1d"``, ``"cifar10"``, ``"synthetic"``), ``"package.module:factory"`` targets, or
        :class:`~trajectory.specs.Spec` objects. Sizing kwargs the model factory accepts
        (``in_features``, ``in_channels``, ``input_dim``, ``num_classes``) are filled from the data
        unless ``model_kwargs`` gives them.
    model_kwargs, data_kwargs : dict, optional
        Keyword arguments of the factories; recorded in the archive's specs.
    lr, batch_size, steps, momentum, weight_decay : SGD settings. ``steps`` is the total number of
        updates of the run; with ``mode="a"`` the run resumes from the archive's last record and
        trains up to ``steps``.
    optimizer : {'sgd', 'adam'}
        ``torch.optim.SGD`` (``momentum``) or ``torch.optim.Adam`` (``betas``, ``eps``, torch's defaults;
        ``weight_decay`` is Adam's L2 term). ``momentum`` must stay 0 with Adam.
    betas, eps : Adam settings; ``betas`` as a pair or ``"B1,B2"``.
    record_optimizer_state : bool
        Record the optimizer state with every record (SGD's momentum buffer, Adam's ``exp_avg`` and
        ``exp_avg_sq``; see docs/format.md). Needs momentum > 0 with SGD.
    seed : int
        Seeds the model initialisation (``torch.manual_seed``) and the minibatch order.
    schedule : Schedule or str
        Which steps to record (``"every"``, ``"every:10"``, ``"pairs:0,100"``, ...; see
        :func:`trajectory.schedules.parse_schedule`).
    out : path
        The archive to write.
    mode : {'x', 'w', 'a'}
        'x' refuses an existing ``out``, 'w' overwrites it, 'a' appends: the model is loaded from
        the archive's last record and training continues on the same minibatch sequence (exact for
        plain SGD without augmentation; the momentum buffer / Adam moments continue from the last record
        when the archive holds the optimizer state, and restart at zero otherwise).
    codec : str, optional
        Archive codec; ``None`` uses the lossless default.
    device : str, optional
        ``None`` uses CUDA when available, else the CPU.
    num_workers : int
        DataLoader worker processes.
    data_dir : path, optional
        Local directory of a data set read from disk (CIFAR-10); stored in the data spec as the
        factory's ``root``. Nothing is ever downloaded.
    augment : bool
        Training-time augmentation of the data factory (random crop and flip for CIFAR-10).
    progress : bool
        Show a progress bar (rate, ETA, loss) on a terminal.
    lr_drop : optional
        Learning-rate drops, e.g. ``{500: 0.1}`` or ``"500:0.1,800:0.1"``: see :func:`parse_lr_drops`.
    record_buffers, all_indices, flush_interval : passed to :class:`~trajectory.Recorder`.
    metadata : dict, optional
        Extra user metadata stored with the trainer's own settings.
    callback : callable, optional
        Called after every update with a dict ``step`` (updates done), ``loss`` and ``accuracy``
        (0-d tensors of the minibatch, before the update), ``model``, ``optimizer``, ``recorder``.
        Returning ``True`` stops training (the archive is closed normally).

    Returns
    -------
    dict
        ``out``, ``start_step``, ``final_step``, ``steps_run``, ``records`` (in the archive),
        ``recorded`` (by this call), ``final_loss``, ``final_accuracy``, ``seconds``,
        ``steps_per_second``, ``device``, ``parameters``, ``model_spec``, ``data_spec``,
        ``codec``, ``first_nonfinite_step`` (first step whose loss was NaN/Inf, or ``None``),
        ``interrupted`` and ``stopped_early``.

    Raises
    ------
    TrainingInterrupted
        On Ctrl-C, after the archive was closed; its ``summary`` is the dict above.
    SgdwalkError, ValueError
        Bad arguments, missing data, an existing ``out`` in mode 'x', and similar (one-line messages).
    """
    _check_number("lr", lr, minimum=0.0, strict=True)
    _check_number("batch_size", batch_size, minimum=1, integer=True)
    _check_number("steps", steps, minimum=1, integer=True)
    _check_number("momentum", momentum, minimum=0.0)
    _check_number("weight_decay", weight_decay, minimum=0.0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    betas = parse_betas(betas)
    _check_number("eps", eps, minimum=0.0)
    if optimizer == "adam" and momentum:
        raise ValueError("momentum is an SGD setting; with optimizer adam set betas instead")
    if record_optimizer_state and optimizer == "sgd" and not momentum:
        raise ValueError("SGD without momentum keeps no optimizer state to record; set momentum > 0 or drop --record-optimizer-state")
    _check_number("seed", seed, minimum=0, integer=True)
    _check_number("num_workers", num_workers, minimum=0, integer=True)
    if mode not in ("x", "w", "a"):
        raise ValueError(f"mode must be 'x' (create), 'w' (overwrite) or 'a' (append), not {mode!r}")
    out = os.fspath(out)
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give a file name such as {os.path.join(out, 'run.h5')}")
    if mode == "x" and os.path.exists(out):
        raise ArchiveExistsError(f"{out} already exists; pass --overwrite (mode='w') to replace it or --append (mode='a') to extend it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {out}: directory {parent} does not exist")
    schedule = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    drops = parse_lr_drops(lr_drop)
    if codec is not None:
        from .archive.codecs import get_codec

        get_codec(codec)
    dev = resolve_device(device)

    # ---------------------------------------------------------------- data, then the model sized from it
    data_spec = _with_data_dir(resolve_data_spec(data, **dict(data_kwargs or {})), data_dir)
    try:
        dataset = build_dataset(data_spec, "train", augment=bool(augment), trusted=True)
    except DataNotFoundError as err:
        if data_dir is not None or "--data-dir" in str(err):
            raise
        raise DataNotFoundError(f"{err}; with sgdwalk train, pass --data-dir DIR") from err
    from .zoo.data import dataset_info

    info = dataset_info(dataset)
    if len(dataset) < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({len(dataset)} samples) of {data_spec}")
    model_spec = size_model_spec(resolve_model_spec(model, **dict(model_kwargs or {})), info, trusted=True)
    torch.manual_seed(seed)
    net = build_model(model_spec, trusted=True)

    start = 0
    recorded_state = None
    if mode == "a" and os.path.exists(out):
        start, recorded_state = _resume_from(out, net, model_spec, data_spec, steps, seed, batch_size, optimizer)
    net.to(dev)
    net.train()
    opt = _make_optimizer(optimizer, net.parameters(), lr=_lr_at(lr, drops, start), momentum=momentum,
                          weight_decay=weight_decay, betas=betas, eps=eps)
    if recorded_state is not None:
        from .optimizer_state import restore_optimizer_state

        restore_optimizer_state(opt, net, recorded_state)
    elif start and (momentum or optimizer == "adam"):
        what = "the Adam moments restart" if optimizer == "adam" else "the momentum buffer restarts"
        warnings.warn(f"resuming {out} at step {start} with {optimizer} momentum: {what} at zero (the archive holds no "
                      "optimizer state; record it with --record-optimizer-state)", stacklevel=2)

    batches = StepBatches(len(dataset), batch_size, seed, start, steps)
    tracker = RecordingBatchSampler(batches)
    cuda = dev.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_sampler=tracker,
        num_workers=num_workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(seed),
    )
    n_params = sum(p.numel() for p in net.parameters())
    meta = {
        "trainer": "trajectory.training.train",
        "lr": lr,
        "batch_size": batch_size,
        "steps": steps,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        **({"betas": list(betas), "eps": eps} if optimizer == "adam" else {}),
        "lr_drop": [list(d) for d in drops],
        "augment": bool(augment),
        "device": str(dev),
        "num_workers": num_workers,
        "sampler": "RandomSampler(torch.Generator seeded with seed), drop_last, epochs repeated",
        "dataset_size": len(dataset),
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "parameters": n_params,
        "loss": "cross_entropy (mean over the minibatch), model in train mode",
        **dict(metadata or {}),
    }
    rec_kwargs: dict[str, Any] = dict(
        optimizer=opt,
        optimizer_state=bool(record_optimizer_state),
        schedule=schedule,
        indices=tracker,
        mode=mode,
        model_spec=model_spec,
        data_spec=data_spec,
        seed=seed,
        metadata=meta,
        record_buffers=record_buffers,
        all_indices=all_indices,
        flush_interval=flush_interval,
    )
    if codec is not None:
        rec_kwargs["codec"] = codec

    summary: dict[str, Any] = {
        "out": out,
        "start_step": start,
        "final_step": start,
        "steps_run": 0,
        "records": 0,
        "recorded": 0,
        "final_loss": None,
        "final_accuracy": None,
        "seconds": 0.0,
        "steps_per_second": None,
        "device": str(dev),
        "parameters": n_params,
        "model_spec": {"target": model_spec.target, "kwargs": model_spec.kwargs},
        "data_spec": {"target": data_spec.target, "kwargs": data_spec.kwargs},
        "codec": None,
        "first_nonfinite_step": None,
        "interrupted": False,
        "stopped_early": False,
    }
    step = start
    last_loss = last_acc = None
    interrupted: KeyboardInterrupt | None = None
    t0 = time.perf_counter()
    bar = _progress_bar(progress, total=steps, initial=start)
    try:
        with Recorder(out, net, **rec_kwargs) as rec:
            # first step whose loss was not finite, kept on the device: no host sync per step
            first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
            next_postfix = 0.0
            try:
                for x, y in loader:
                    x = x.to(dev, non_blocking=cuda)
                    y = y.to(dev, non_blocking=cuda)
                    if drops and any(s == step for s, _ in drops):
                        new_lr = _lr_at(lr, drops, step)
                        for group in opt.param_groups:
                            group["lr"] = new_lr
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss = loss.detach()
                    with torch.no_grad():
                        acc = (logits.argmax(1) == y).float().mean()
                        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                    rec.record(loss=loss, accuracy=acc)
                    step += 1
                    last_loss, last_acc = loss, acc
                    if bar is not None:
                        bar.update(1)
                        now = time.monotonic()
                        if now >= next_postfix:
                            bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(acc):.3f}", refresh=False)
                            next_postfix = now + 0.5
                    if callback is not None:
                        state = {"step": step, "loss": loss, "accuracy": acc, "model": net, "optimizer": opt, "recorder": rec}
                        if callback(state) is True:
                            summary["stopped_early"] = step < steps
                            break
            except KeyboardInterrupt as err:
                interrupted = err
            summary["recorded"] = rec.n_recorded
            bad = int(first_bad)
            summary["first_nonfinite_step"] = bad if bad >= 0 else None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary["final_step"] = step
    summary["steps_run"] = step - start
    summary["seconds"] = round(seconds, 3)
    summary["steps_per_second"] = round((step - start) / seconds, 2) if seconds > 0 and step > start else None
    if last_loss is not None:
        summary["final_loss"] = float(last_loss)
        summary["final_accuracy"] = float(last_acc)
    summary["records"], summary["codec"] = _archive_counts(out)
    summary["interrupted"] = interrupted is not None
    if interrupted is not None:
        raise TrainingInterrupted(summary) from interrupted
    return summary


def _progress_bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI, pipes)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr, desc="train")


def _archive_counts(path: str) -> tuple[int, str]:
    from .archive.reader import Trajectory

    with Trajectory(path) as traj:
        return len(traj), traj.codec.name


def _resume_from(
    out: str, net: torch.nn.Module, model_spec: Spec, data_spec: Spec, steps: int, seed: int, batch_size: int, optimizer: str
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Load the last record of an archive we append to (after checking it is the same run).

    Returns its step and, when the archive records the optimizer state, that record's state (to restore).
    """
    from .archive.reader import Trajectory

    with Trajectory(out) as traj:
        if len(traj) == 0:
            return 0, None
        attrs = traj.attrs
        for key, spec in (("model_spec", model_spec), ("data_spec", data_spec)):
            text = attrs.get(key)
            if text:
                stored = Spec.from_json(text if isinstance(text, str) else _dumps(text))
                if stored != spec:
                    what = key.replace("_", " ")
                    raise SgdwalkError(f"cannot append to {out}: its {what} is {stored} but this run's is {spec}")
        meta = attrs.get("metadata") if isinstance(attrs.get("metadata"), dict) else {}
        for name, stored, mine in (("seed", attrs.get("seed"), seed), ("batch size", meta.get("batch_size"), batch_size)):
            if stored is not None and stored != -1 and int(stored) != mine:
                raise SgdwalkError(
                    f"cannot append to {out}: it was recorded with {name} {stored} but this run uses {mine}; "
                    "resuming needs the same minibatch sequence"
                )
        stored_opt = meta.get("optimizer", "sgd")  # archives from before --optimizer were SGD
        if isinstance(stored_opt, str) and stored_opt != optimizer:
            raise SgdwalkError(f"cannot append to {out}: it was trained with optimizer {stored_opt} but this run uses {optimizer}")
        last = int(traj.steps[-1])
        if last >= steps:
            raise ValueError(f"cannot append to {out}: it already reaches step {last} and --steps is {steps}; raise --steps")
        traj.load_into(net, len(traj) - 1)
        state = traj.optimizer_state(len(traj) - 1) if traj.optimizer_state_keys else None
    return last, state


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
