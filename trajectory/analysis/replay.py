"""Replay: the states of records, the evaluation data, the evaluator and the routing of evaluations.

Why a module of its own: this is everything a metric can reach through :class:`ReplayContext` (states of
records, segments, losses on the run's data, rows of required metrics), and nothing about *which* units
to compute (:mod:`.plan`) or *when* and *where to write* them (:mod:`.run`). Built once per analysis by
:func:`build_replay`; the engine (:mod:`.engine`) composes it with a plan and a runner.

Evaluation strategy. ``Evaluator(strategy=...)`` picks how states are evaluated (batched ``vmap``, a
per-point ``loop`` over large sample batches, the ``mlp`` bmm route; ``auto`` measures them). The choice is
recorded in the results file next to the configuration, never inside it (:func:`strategy_record`).

Progress. :meth:`Replay.connect` installs ``evaluator.on_samples(n)``: the evaluator calls it after each
forward chunk (n = points x samples) and curvature metrics after each gradient/HVP (in forward
equivalents); when an evaluator does not report, :meth:`Replay.evaluate` reports for it, so progress
never counts a forward twice. Evaluations happen on the calling thread only (the prefetch thread reads).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..archive.reader import Trajectory
from ..errors import SpecError
from .data import fingerprint, materialize, subset_indices
from .errors import AnalysisError, MetricError
from .evaluator import Evaluator
from .options import DEFAULT_BN_BATCH, EvalSpec

try:  # the evaluator's strategies (``mlp``, ``vmap``, ``loop``, ``loop_cl``, ...): one list, kept by the evaluator
    from .replay_strategies import STRATEGIES as _EVALUATOR_STRATEGIES
except ImportError:  # pragma: no cover - an evaluator without strategy modules
    _EVALUATOR_STRATEGIES = ("vmap", "loop", "mlp")

#: ``--strategy`` values: how the evaluator evaluates states; ``auto`` lets it measure the others on the run's data
STRATEGIES = ("auto", *_EVALUATOR_STRATEGIES)

__all__ = ["STRATEGIES", "ReplayContext", "Replay", "AnalysisRun", "Records", "DataSource", "EvalData", "resolve_model",
           "resolve_eval_data", "build_evaluator", "calibrate", "open_replay", "strategy_record", "auto_device"]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------- model/data
def resolve_model(traj: Trajectory, model: Any, trust_specs: bool) -> tuple[nn.Module, str]:
    """The model to replay (archive spec under the trust rule, or the user's override) and its identity string."""
    from ..specs import Spec, resolve_model_spec

    if isinstance(model, nn.Module):
        m, ident = model, f"python:{type(model).__module__}.{type(model).__qualname__}"
    else:
        if model is None:
            spec = traj.model_spec  # ArchiveFormatError when the archive has none
            trusted = trust_specs
        else:
            spec = _parse_spec_text(model, resolve_model_spec) if isinstance(model, str) else model
            if not isinstance(spec, Spec):
                raise AnalysisError(f"model must be an nn.Module, a Spec or a spec string, not {type(model).__name__}")
            trusted = True  # named by the user
        m = spec.build(trusted=trusted)
        if not isinstance(m, nn.Module):
            raise SpecError(f"model spec {spec} returned {type(m).__name__}, not a torch.nn.Module")
        ident = spec.to_json()
    traj.check_model(m)
    return m, ident


def _parse_spec_text(text: str, resolver: Callable) -> Any:
    """'mlp', 'mlp {"hidden": [50]}' or 'pkg.mod:factory {...}' -> Spec."""
    import json

    text = text.strip()
    name, _, kw = text.partition(" ")
    if "{" in name:
        name, kw = text[: text.index("{")], text[text.index("{") :]
    kwargs = {}
    if kw.strip():
        from ..specs import load_spec_json  # length and nesting limited before parsing
        from ..textsafe import safe

        kwargs = load_spec_json(kw, f"spec {safe(name, 120)} kwargs")
        if not isinstance(kwargs, dict):
            raise SpecError(f"spec {safe(text, 120)}: kwargs must be a JSON object")
    return resolver(name.strip(), **kwargs)


class DataSource:
    """Builds and caches the splits the analysis needs, from a spec or user objects."""

    def __init__(self, traj: Trajectory, data: Any, trust_specs: bool):
        from ..specs import Spec, resolve_data_spec

        self._splits: dict[str, Any] = {}
        self._spec = None
        self._trusted = trust_specs
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if data is None:
            self._spec = traj.data_spec
        elif isinstance(data, (str, Spec)):
            self._spec = _parse_spec_text(data, resolve_data_spec) if isinstance(data, str) else data
            self._trusted = True
        elif isinstance(data, Mapping):
            self._splits = dict(data)
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._splits = {"train": data}
        elif callable(data):
            self._factory = data
        else:
            raise AnalysisError(f"data must be a Dataset, a dict of splits, a Spec or a spec string, not {type(data).__name__}")
        self.ident = self._spec.to_json() if self._spec is not None else f"python:{type(data).__name__}"
        if self._spec is not None:
            self._spec.resolve(trusted=self._trusted)  # trust check and import errors before any work

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self._tensors:
            return self._tensors[split]
        if self._spec is not None:
            ds = self._spec.build(trusted=self._trusted, split=split, augment=False)
        elif split in self._splits:
            ds = self._splits[split]
        elif getattr(self, "_factory", None) is not None:
            ds = self._factory(split=split, augment=False)
        else:
            raise AnalysisError(f"no {split!r} split given; pass data={{'{split}': dataset}} or a data spec")
        self._tensors[split] = materialize(ds, what=f"{split} split")
        return self._tensors[split]


# ---------------------------------------------------------------------------------------------- context
class ReplayContext:
    """What a metric may use: states of records, interpolation, loss evaluation, rows of required metrics.

    Attributes: ``steps`` (step of every record), ``pairs`` (selected record indices i of pairs (i, i+1)),
    ``n_params``, ``n_state``, ``device``, ``dtype``, ``options`` (the shared option namespace),
    ``eval`` (:class:`EvalSpec`), ``bn`` (effective BatchNorm policy, 'none' without BatchNorm).
    """

    def __init__(self, run: "Replay"):
        self._run = run
        self.steps = run.steps
        self.pairs = run.pairs
        self.n_params = run.evaluator.n_params
        self.n_state = run.evaluator.n_state
        self.device = run.evaluator.device
        self.dtype = run.evaluator.dtype
        self.options = run.options
        self.eval = run.eval_spec
        self.bn = run.bn_effective

    # states ------------------------------------------------------------------------------------------
    def state(self, i: int) -> torch.Tensor:
        """State vector (parameters then floating buffers) of record ``i``, on the device, in the run's dtype."""
        return self._run.records.state(i)

    def params(self, i: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Parameters only (no buffers) of record ``i`` on the CPU, in ``dtype`` (float64 by default)."""
        return self._run.records.params(i).to(dtype)

    def line(self, a: torch.Tensor, b: torch.Tensor, alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """States a + t·(b − a) for each t (exact at t = 0 and 1), shape (len(alphas), n_state)."""
        w = torch.as_tensor(alphas, dtype=a.dtype, device=a.device).reshape(-1, 1)
        return torch.lerp(a.unsqueeze(0), b.unsqueeze(0), w)

    def segment(self, i: int, alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """States θ_i + a·(θ_{i+1} − θ_i) of pair i (buffers interpolated too), shape (len(alphas), n_state)."""
        return self.line(self.state(i), self.state(i + 1), alphas)

    def data(self, pair: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Evaluation inputs and labels (on the device) used for ``pair``: the run's evaluation set, or the
        pair's own minibatch under ``--eval minibatch`` (None when that pair has no recorded minibatch)."""
        return self._run.data_for(pair)

    @property
    def evaluator(self):
        """The run's :class:`~trajectory.analysis.evaluator.Evaluator` (template model on the device, layout,
        dtype, BatchNorm policy ``bn_policy`` and ``bn_batch``), for metrics that need more than loss values
        (e.g. gradients or Hessian-vector products) under the same settings. Such metrics report their work
        with ``ctx.evaluator.on_samples(n)`` (n in sample-forward equivalents: a gradient ~3, an HVP ~5 per
        sample), which moves the progress bar."""
        return self._run.evaluator

    @property
    def data_shard(self) -> Any:
        """Set while a distributed run splits a metric's evaluation data across ranks (``curvature_split="data"``):
        an object with ``rank``, ``world`` and ``all_reduce(tensor)`` (in-place sum over ranks); None otherwise.
        :func:`~trajectory.analysis.curvature.objective.objective_for` honours it, so curvature metrics need no code."""
        return getattr(self._run, "data_shard", None)

    @property
    def eval_size(self) -> int:
        """Samples in one model evaluation (the evaluation set; the typical minibatch under ``--eval minibatch``):
        what :meth:`Metric.cost <trajectory.analysis.metric.Metric.cost>` multiplies point counts by."""
        return self._run.eval_size

    def lr(self, i: int) -> float:
        """Recorded learning rate (scalar 'lr') of the update leaving record i; NaN if none."""
        return self._run.lr_at(i)

    @property
    def archive(self) -> Any:
        """The archive being replayed (:class:`~trajectory.archive.reader.Trajectory`, read-only): for metrics that
        read what the recorder stored beside the states (batch indices, scalars, optimizer state). Read from it
        only; the replay owns it and closes it."""
        return self._run.traj

    @property
    def optimizer(self) -> Any:
        """The archive's ``optimizer`` attribute (class and hyperparameters as recorded by
        :func:`trajectory.recorder.optimizer_info`), or ``""`` when the run recorded none."""
        return self._run.traj.attrs.get("optimizer", "")

    def minibatch(self, pair: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recorded minibatch (inputs, labels, on the device) of the single update leaving record ``pair``:
        the pair's own data under ``--eval minibatch``, else drawn from the training split by the recorded
        indices (loaded once, lazily). None when the pair spans several updates or no indices were recorded."""
        return self._run.minibatch(pair)

    # evaluation --------------------------------------------------------------------------------------
    def evaluate(self, states: torch.Tensor, pairs: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy (NaN for regression losses) at each state, as float64 arrays.

        ``pairs`` names, for each state (or one int for all), the pair whose data it is evaluated on;
        it matters only for ``--eval minibatch`` (the pair's own minibatch); otherwise all states share
        the run's evaluation set. States of many pairs are evaluated in as few passes as possible.
        """
        return self._run.evaluate(states, pairs)

    def evaluate_lines(self, lines: Sequence[tuple[Any, Any, Sequence[float], int]], units: bool = False) -> list[tuple[np.ndarray, ...]]:
        """Evaluate many lines at once: each ``(a, b, ts, owner)`` gives loss/acc at a + t·(b − a) for t in ts.

        ``a`` and ``b`` are state vectors or record indices; ``owner`` is the pair whose data is used
        (see :meth:`evaluate`). States are built and evaluated in chunks of bounded memory. ``units=True`` adds a
        third array per line, the per-unit losses (len(ts), U) on the same units at every t (samples, or
        BatchNorm groups under ``--bn train``), from which :mod:`~trajectory.analysis.stderr` forms paired errors.
        """
        return self._run.evaluate_lines(lines, units=units)

    def evaluate_segments(self, requests: Sequence[tuple[int, Sequence[float]]], units: bool = False) -> list[tuple[np.ndarray, ...]]:
        """``[(pair, alphas), ...]`` -> loss/acc (and per-unit losses with ``units``) along each pair's segment
        θ_i + a·(θ_{i+1} − θ_i)."""
        return self._run.evaluate_lines([(p, p + 1, al, p) for p, al in requests], units=units)

    # dependencies ------------------------------------------------------------------------------------
    def rows(self, metric: str, pairs: Sequence[int], span: int | None = None) -> dict[str, np.ndarray]:
        """Rows of a required metric for the given pairs (in that order), column -> array."""
        return self._run.dep_rows(metric, pairs, span)


# ---------------------------------------------------------------------------------------------- records
class Records:
    """Record states read from the archive (thread-safe), cached, with a background prefetch."""

    def __init__(self, traj: Trajectory, device: torch.device, dtype: torch.dtype, capacity: int):
        self.traj = traj
        self.device = device
        self.dtype = dtype
        self.capacity = max(4, capacity)
        self._lock = threading.Lock()
        self._raw: collections.OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self._states: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgdwalk-prefetch")
        self._future: cf.Future | None = None
        self.reads = 0

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            hit = self._raw.get(i)
            if hit is not None:
                self._raw.move_to_end(i)
                return hit
            p = self.traj.params(i)
            b = self.traj.buffers(i)
            self.reads += 1
            self._raw[i] = (p, b)
            while len(self._raw) > self.capacity:
                self._raw.popitem(last=False)
            return p, b

    def prefetch(self, records: Sequence[int]) -> None:
        """Read these records on the background thread (returns at once)."""
        if self._future is not None and not self._future.done():
            return
        todo = [i for i in records if i not in self._raw]
        if todo:
            self._future = self._pool.submit(lambda: [self._read(i) for i in todo])

    def params(self, i: int) -> torch.Tensor:
        return self._read(i)[0]

    def state(self, i: int) -> torch.Tensor:
        s = self._states.get(i)
        if s is not None:
            self._states.move_to_end(i)
            return s
        p, b = self._read(i)
        s = torch.cat([p.to(self.dtype), b.to(self.dtype)]).to(self.device)
        self._states[i] = s
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- replay
class Replay:
    """State of one replay: archive, pairs, evaluator, data, record cache, tables (for dependency rows).

    Built by :func:`~trajectory.analysis.engine.analyze`; metrics reach it only through :class:`ReplayContext`.
    """

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)
        self._mb_cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._lr = None
        self._listener: Callable[[float], Any] | None = None
        self._reports = 0  # calls of evaluator.on_samples (the evaluator's or a metric's own reports)
        self.connect(None)

    # progress ------------------------------------------------------------------------------------------
    def connect(self, listener: Callable[[float], Any] | None) -> None:
        """Send every sample-forward count (``evaluator.on_samples(n)``) to ``listener`` (None: count only).

        The hook chains to an ``on_samples`` the evaluator defines itself, so its own bookkeeping still runs;
        metrics may call ``ctx.evaluator.on_samples(n)`` whatever the evaluator's version."""
        self._listener = listener
        if getattr(self, "_hooked", False):
            return
        own = getattr(self.evaluator, "on_samples", None)

        def on_samples(n: float, _own=own) -> None:
            self._reports += 1
            if callable(_own):
                _own(n)
            if self._listener is not None:
                self._listener(n)

        self.evaluator.on_samples = on_samples
        self._hooked = True

    @property
    def eval_size(self) -> int:
        """Samples in one model evaluation: the evaluation set, or the typical recorded minibatch (``--eval minibatch``)."""
        if self.eval_x is not None:
            return int(self.eval_x.shape[0])
        sizes = [len(v) for v in self.batch_indices.values() if len(v)]
        return int(np.median(sizes)) if sizes else 1

    def _evaluate_on(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        before = self._reports
        out = self.evaluator.evaluate(states, x, y, **kw)
        if self._reports == before and self._listener is not None:  # this evaluator does not report its forwards
            self._listener(float(states.shape[0] * x.shape[0]))
        return out

    def lr_at(self, i: int) -> float:
        if self._lr is None:
            try:
                self._lr = self.traj.scalars.get("lr")
            except Exception:  # pragma: no cover - archives without a scalars table are invalid anyway
                self._lr = None
        if self._lr is None:
            return float("nan")
        return float(self._lr[i])

    def _minibatch(self, pair: int):
        if pair not in self._mb_cache:
            idx = self.batch_indices.get(pair)
            if idx is None or len(idx) == 0:
                self._mb_cache[pair] = None
            else:
                t = torch.as_tensor(idx, device=self.train_x.device)
                self._mb_cache[pair] = (self.train_x[t], self.train_y[t])
                if len(self._mb_cache) > 4 * self.block_pairs + 64:
                    self._mb_cache.pop(next(iter(self._mb_cache)))
        return self._mb_cache[pair]

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The training split on the device in the run's dtype: the replay's own (``--eval minibatch``), else
        loaded once from the run's data source (None without one)."""
        if getattr(self, "train_x", None) is not None:
            return self.train_x, self.train_y
        cached = getattr(self, "_train_loaded", None)
        if cached is not None:
            return cached
        source = getattr(self, "source", None)
        if source is None:
            return None
        x, y = source.tensors("train")
        dev, dt = self.evaluator.device, self.evaluator.dtype
        to = lambda t: t.to(dev, dt) if t.is_floating_point() else t.to(dev)  # noqa: E731
        self._train_loaded = (to(x), to(y))
        return self._train_loaded

    def minibatch(self, pair: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recorded minibatch of the single update leaving record ``pair`` (see :meth:`ReplayContext.minibatch`)."""
        if self.eval_spec.kind == "minibatch":
            return self.data_for(pair)
        steps = self.steps
        if pair + 1 >= len(steps) or steps[pair + 1] - steps[pair] != 1:
            return None
        train = self.train_split()
        if train is None:
            return None
        idx = self.traj.batch_indices(int(pair))
        if idx is None or len(idx) == 0:
            return None
        if int(np.max(idx)) >= len(train[0]):
            raise AnalysisError(f"recorded batch index {int(np.max(idx))} exceeds the training split ({len(train[0])} "
                                "samples); is this the data the run was trained on?")
        t = torch.as_tensor(np.asarray(idx), device=train[0].device)
        return train[0][t], train[1][t]

    def data_for(self, pair: int):
        if self.eval_spec.kind == "minibatch":
            return self._minibatch(int(pair))
        return (self.eval_x, self.eval_y) if self.eval_x is not None else None

    def evaluate(self, states: torch.Tensor, pairs: int | Sequence[int], lines=None, units: bool = False) -> tuple:
        """Loss and accuracy (K,); with ``units`` also a list of K per-unit loss arrays (lengths may differ
        between pairs under ``--eval minibatch``)."""
        k = states.shape[0]
        loss = np.full(k, np.nan)
        acc = np.full(k, np.nan)
        per: list[np.ndarray] = [np.full(0, np.nan)] * k
        if k == 0:
            return (loss, acc, per) if units else (loss, acc)
        if self.eval_spec.kind != "minibatch":
            if not units:
                return self._evaluate_on(states, self.eval_x, self.eval_y, lines=lines)
            l, a, u = self._evaluate_on(states, self.eval_x, self.eval_y, lines=lines, units=True)
            return l, a, list(u)
        owners = np.full(k, int(pairs)) if np.isscalar(pairs) else np.asarray(pairs, dtype=np.int64)
        if len(owners) != k:
            raise MetricError(f"evaluate: {k} states but {len(owners)} pair owners")
        for p in np.unique(owners):
            mask = owners == p
            mb = self._minibatch(int(p))
            if mb is None:
                continue  # no recorded minibatch: NaN rows
            sel = torch.as_tensor(np.nonzero(mask)[0], device=states.device)
            out = self._evaluate_on(states[sel], mb[0], mb[1], bn_batch=len(mb[0]), **({"units": True} if units else {}))
            loss[mask], acc[mask] = out[0], out[1]
            if units:
                for j, row in zip(np.nonzero(mask)[0], out[2]):
                    per[j] = row
        return (loss, acc, per) if units else (loss, acc)

    def evaluate_lines(self, lines, units: bool = False) -> list[tuple[np.ndarray, ...]]:
        items = [(j, float(t)) for j, line in enumerate(lines) for t in line[2]]
        if not items:
            return []
        state_bytes = self.evaluator.n_state * (8 if self.evaluator.dtype == torch.float64 else 4)
        chunk = int(max(1, min(self.max_points, self.state_budget // max(1, state_bytes))))
        ends = {}
        for j, line in enumerate(lines):
            a, b = line[0], line[1]
            ends[j] = (self.records.state(a) if isinstance(a, (int, np.integer)) else a,
                       self.records.state(b) if isinstance(b, (int, np.integer)) else b)
        loss = np.empty(len(items))
        acc = np.empty(len(items))
        per: list[np.ndarray] = []
        for s in range(0, len(items), chunk):
            part = items[s : s + chunk]
            # group consecutive items of the same line into one lerp
            states, owners, la, lb, lidx = [], [], [], [], []
            k = 0
            while k < len(part):
                j = part[k][0]
                e = k
                while e < len(part) and part[e][0] == j:
                    e += 1
                a, b = ends[j]
                w = torch.tensor([t for _, t in part[k:e]], dtype=a.dtype, device=a.device).reshape(-1, 1)
                states.append(torch.lerp(a.unsqueeze(0), b.unsqueeze(0), w))
                owners.extend([int(lines[j][3])] * (e - k))
                lidx.extend([len(la)] * (e - k))
                la.append(a)
                lb.append(b)
                k = e
            info = (torch.stack(la), torch.stack(lb), torch.tensor(lidx), torch.tensor([t for _, t in part], dtype=torch.float64))
            res = self.evaluate(torch.cat(states), owners, lines=info, units=units)
            loss[s : s + len(part)] = res[0]
            acc[s : s + len(part)] = res[1]
            if units:
                per.extend(res[2])
        out = []
        pos = 0
        for line in lines:
            n = len(line[2])
            if units:
                rows = per[pos : pos + n]
                width = max((len(r) for r in rows), default=0)
                u = np.stack([r if len(r) == width else np.full(width, np.nan) for r in rows]) if rows else np.empty((0, 0))
                out.append((loss[pos : pos + n], acc[pos : pos + n], u))
            else:
                out.append((loss[pos : pos + n], acc[pos : pos + n]))
            pos += n
        return out

    def dep_rows(self, metric: str, pairs: Sequence[int], span: int | None) -> dict[str, np.ndarray]:
        table = self.tables.get(metric)
        if table is None:
            raise MetricError(f"metric {metric!r} is not among the requirements of the metric asking for it")
        keys = [(int(p),) if span is None else (int(p), int(span)) for p in pairs]
        missing = [k for k in keys if k not in table.rows]
        if missing:
            raise MetricError(f"rows of {metric!r} for pairs {missing[:3]} are not computed yet")
        cols = list(table.columns)
        return {c: np.stack([table.rows[k][c] for k in keys]) for c in cols}



def auto_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AnalysisError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AnalysisError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


#: Old name of :class:`Replay` (kept for code that imported it from the engine).
AnalysisRun = Replay


def open_replay(traj: Trajectory, pairs: Sequence[int], evaluator: Evaluator, data: "EvalData", eval_spec: EvalSpec,
                bn_eff: str, options: Mapping[str, Any], tables: Mapping[str, Any], *, block_pairs: int | None = None,
                max_span: int = 1) -> Replay:
    """The :class:`Replay` of one analysis, with a record cache sized for two blocks plus the widest barrier span.

    ``block_pairs`` (pairs per block) defaults to what keeps three blocks' states within 256 MiB (at most 32)."""
    state_bytes = evaluator.n_state * (8 if evaluator.dtype == torch.float64 else 4)
    if block_pairs is None:
        block_pairs = int(max(1, min(32, (256 << 20) // max(1, 3 * state_bytes))))
    records = Records(traj, evaluator.device, evaluator.dtype, capacity=2 * block_pairs + max_span + 8)
    return Replay(
        traj=traj, steps=traj.steps, pairs=pairs, evaluator=evaluator, options=options, eval_spec=eval_spec,
        bn_effective=bn_eff, records=records, tables=tables, batch_indices=data.batch_indices,
        train_x=data.train_x, train_y=data.train_y, eval_x=data.eval_x, eval_y=data.eval_y,
        block_pairs=block_pairs, max_points=4096, state_budget=256 << 20,
    )


# ---------------------------------------------------------------------------------------------- evaluation data
@dataclass
class EvalData:
    """Tensors the replay evaluates on (already on the device) and what identifies them in the configuration."""

    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None
    batch_indices: dict[int, np.ndarray] = field(default_factory=dict)
    fingerprint: str = ""
    recompute_batches: list[torch.Tensor] = field(default_factory=list)
    bn_batch: int = 100

    def calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Data to calibrate the evaluation strategy on: the evaluation set, or the first recorded minibatch."""
        if self.eval_x is not None:
            return self.eval_x, self.eval_y
        for idx in self.batch_indices.values():
            if len(idx):
                t = torch.as_tensor(idx, device=self.train_x.device)
                return self.train_x[t], self.train_y[t]
        return None


def resolve_eval_data(traj: Trajectory, source: DataSource | None, pairs: Sequence[int], single: np.ndarray,
                      eval_spec: EvalSpec, bn_eff: str, loss: str, *, bn_batch: int | None, bn_batches: int,
                      subset_seed: int, device: torch.device, dtype: torch.dtype) -> EvalData:
    """Which samples each pair is evaluated on (``--eval``), plus BatchNorm batches; checks labels and indices.

    ``source`` is None when no metric uses data (then only ``bn_batch`` is resolved)."""
    out = EvalData()
    if bn_batch is None:  # a fixed default (the authors' 100), not the recorded batch size: runs compare alike
        bn_batch = DEFAULT_BN_BATCH
    out.bn_batch = int(bn_batch)
    if source is None:
        return out
    train_x = train_y = eval_x = eval_y = None
    need_train = eval_spec.kind in ("minibatch", "subset", "train") or bn_eff == "recompute"
    if need_train:
        train_x, train_y = source.tensors("train")
    if eval_spec.kind == "minibatch":
        for i in pairs:
            # the minibatch stored under record i is that of the single update leaving it; a pair spanning
            # several updates has no minibatch of its own (its rows are NaN, not those of its first update)
            out.batch_indices[i] = traj.batch_indices(i) if single[i] else np.empty(0, dtype=np.int64)
        if not any(len(v) for v in out.batch_indices.values()):
            raise AnalysisError(f"{traj.path} records no minibatch indices for the selected pairs; use --eval subset:N, train or test")
        top = max(int(v.max()) for v in out.batch_indices.values() if len(v))
        if top >= len(train_x):
            raise AnalysisError(f"recorded batch index {top} exceeds the training split ({len(train_x)} samples); is this the data the run was trained on?")
        out.fingerprint = fingerprint(train_x, train_y)
    elif eval_spec.kind == "subset":
        idx = torch.as_tensor(subset_indices(len(train_x), eval_spec.n, eval_spec.seed))
        eval_x, eval_y = train_x[idx], train_y[idx]
    elif eval_spec.kind == "train":
        eval_x, eval_y = train_x, train_y
    else:
        eval_x, eval_y = source.tensors("test")
    if eval_x is not None:
        out.fingerprint = fingerprint(eval_x, eval_y)
    if bn_eff == "recompute":
        g = torch.Generator().manual_seed(int(subset_seed) + 1)
        perm = torch.randperm(len(train_x), generator=g)
        batches = [train_x[perm[j * bn_batch : (j + 1) * bn_batch]] for j in range(max(1, bn_batches))]
        out.recompute_batches = [b for b in batches if len(b) >= 2]
    if loss == "cross_entropy":
        for t in (train_y, eval_y):
            if t is not None and (t.is_floating_point() or t.dim() != 1):
                raise AnalysisError("labels are not integer class indices; use --loss mse for regression data")
    to = lambda t: None if t is None else (t.to(device, dtype) if t.is_floating_point() else t.to(device))  # noqa: E731
    out.train_x, out.train_y, out.eval_x, out.eval_y = map(to, (train_x, train_y, eval_x, eval_y))
    return out


# ---------------------------------------------------------------------------------------------- evaluator
def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def build_evaluator(model: nn.Module, traj: Trajectory, data: EvalData, *, device: torch.device, dtype: torch.dtype,
                    bn_eff: str, loss: str, max_elems: int | None, fast_path: bool, strategy: str = "auto",
                    bn_seed: int = 0, noise: str = "crn") -> Evaluator:
    """The run's :class:`Evaluator`, asked for ``strategy`` (``auto`` lets it measure; see docs/analysis.md)."""
    kw: dict[str, Any] = dict(device=device, dtype=dtype, bn=bn_eff if bn_eff != "none" else "eval", loss=loss,
                              bn_batch=data.bn_batch, recompute_batches=data.recompute_batches, max_elems=max_elems,
                              fast_path=fast_path, bn_seed=bn_seed, noise=noise)
    if _accepts(Evaluator, "strategy"):
        kw["strategy"] = strategy
    elif strategy != "auto":
        raise AnalysisError(f"--strategy {strategy}: this evaluator has a single built-in strategy; use --strategy auto")
    return Evaluator(model, traj.layout, **kw)


def calibrate(evaluator: Evaluator, data: EvalData) -> dict[str, Any]:
    """Let the evaluator measure its strategies on the run's data (once, before the first block).

    Returns the evaluator's calibration record (``rate`` in sample-forwards per second, ...), or {} when the
    evaluator cannot calibrate or the run has no data."""
    fn = getattr(evaluator, "calibrate", None)
    batch = data.calibration_batch()
    if not callable(fn) or batch is None:
        return {}
    info = fn(*batch)
    return dict(info) if isinstance(info, Mapping) else {}


def strategy_record(evaluator: Evaluator, calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able record of how this run evaluated states: stored per table in the results file (``replay``
    attribute), outside the configuration hash, because strategies agree to float rounding."""
    rec = getattr(evaluator, "strategy", None)
    if isinstance(rec, Mapping):
        out = dict(rec)
    elif isinstance(rec, str):
        out = {"name": rec}
    else:  # an evaluator without strategies: its fixed route
        out = {"name": "mlp" if getattr(evaluator, "_plan", None) else "vmap"}
    for k, v in (calibration or {}).items():
        out.setdefault(k, v)
    out.setdefault("device", str(evaluator.device))
    out.setdefault("dtype", str(evaluator.dtype).replace("torch.", ""))
    import json

    return json.loads(json.dumps(out, default=str))  # JSON-able whatever the evaluator put in

