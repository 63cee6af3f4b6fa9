"""The replay engine: which pairs, which data, which BatchNorm policy, which device; batching, prefetch, resume.

:func:`analyze` is the whole analyzer as one call (the CLI is a thin wrapper over it). It opens
the archive read-only, rebuilds model and data under the trust rule, selects pairs, resolves the
requested metrics and their dependencies, and then walks the pairs in blocks: a background thread
reads the next block's records while the current block is evaluated; each metric computes the
rows still missing from the results file; rows are flushed atomically every ``flush_seconds``.
Metrics only see a :class:`ReplayContext`.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..archive.layout import BUFFERS, PARAMS
from ..archive.reader import Trajectory
from ..errors import ArchiveFormatError, SgdwalkError, SpecError
from .data import fingerprint, materialize, subset_indices
from .errors import AnalysisError, MetricError
from .evaluator import Evaluator, has_batchnorm
from .metric import DEFAULT_METRICS, Metric, get_metric
from .options import (
    BN_POLICIES,
    DTYPES,
    LOSSES,
    EvalSpec,
    check_choice,
    parse_alphas,
    parse_eval,
    parse_spans,
    pair_spans,
    parse_steps,
    select_pairs,
)
from .results import ResultsFile, Table, default_results_path

__all__ = ["analyze", "ReplayContext", "AnalysisRun", "archive_identity", "DEFAULT_EVAL"]

#: Default evaluation data: a fixed 2,000-sample subset of the training split (see docs/analysis.md).
DEFAULT_EVAL = "subset:2000"


def archive_identity(traj: Trajectory) -> str:
    """sha256 of the layout table, the first record's parameters, the first step and the 'created' attribute."""
    h = hashlib.sha256()
    h.update(traj.file["layout"][()].tobytes())
    h.update(traj.params(0).numpy().tobytes())
    h.update(str(int(traj.steps[0])).encode())
    created = traj.file.attrs.get("created", "")
    h.update(created.encode() if isinstance(created, str) else bytes(created))
    return h.hexdigest()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------- model/data
def _resolve_model(traj: Trajectory, model: Any, trust_specs: bool) -> tuple[nn.Module, str]:
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
        try:
            kwargs = json.loads(kw)
        except ValueError as err:
            raise SpecError(f"spec {text!r}: kwargs are not valid JSON ({_one_line(err)})") from None
        if not isinstance(kwargs, dict):
            raise SpecError(f"spec {text!r}: kwargs must be a JSON object")
    return resolver(name.strip(), **kwargs)


class _DataSource:
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

    def __init__(self, run: "AnalysisRun"):
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
        (e.g. gradients or Hessian-vector products) under the same settings."""
        return self._run.evaluator

    @property
    def data_shard(self) -> Any:
        """Set while a distributed run splits a metric's evaluation data across ranks (``curvature_split="data"``):
        an object with ``rank``, ``world`` and ``all_reduce(tensor)`` (in-place sum over ranks); None otherwise.
        :func:`~trajectory.analysis.curvature.objective.objective_for` honours it, so curvature metrics need no code."""
        return getattr(self._run, "data_shard", None)

    def lr(self, i: int) -> float:
        """Recorded learning rate (scalar 'lr') of the update leaving record i; NaN if none."""
        return self._run.lr_at(i)

    # evaluation --------------------------------------------------------------------------------------
    def evaluate(self, states: torch.Tensor, pairs: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy (NaN for regression losses) at each state, as float64 arrays.

        ``pairs`` names, for each state (or one int for all), the pair whose data it is evaluated on;
        it matters only for ``--eval minibatch`` (the pair's own minibatch); otherwise all states share
        the run's evaluation set. States of many pairs are evaluated in as few passes as possible.
        """
        return self._run.evaluate(states, pairs)

    def evaluate_lines(self, lines: Sequence[tuple[Any, Any, Sequence[float], int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Evaluate many lines at once: each ``(a, b, ts, owner)`` gives loss/acc at a + t·(b − a) for t in ts.

        ``a`` and ``b`` are state vectors or record indices; ``owner`` is the pair whose data is used
        (see :meth:`evaluate`). States are built and evaluated in chunks of bounded memory.
        """
        return self._run.evaluate_lines(lines)

    def evaluate_segments(self, requests: Sequence[tuple[int, Sequence[float]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(pair, alphas), ...]`` -> loss/acc along each pair's segment θ_i + a·(θ_{i+1} − θ_i)."""
        return self._run.evaluate_lines([(p, p + 1, al, p) for p, al in requests])

    # dependencies ------------------------------------------------------------------------------------
    def rows(self, metric: str, pairs: Sequence[int], span: int | None = None) -> dict[str, np.ndarray]:
        """Rows of a required metric for the given pairs (in that order), column -> array."""
        return self._run.dep_rows(metric, pairs, span)


# ---------------------------------------------------------------------------------------------- records
class _Records:
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


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class AnalysisReport:
    """What :func:`analyze` returns: the results path, the tables of this run and counts."""

    results_path: str
    tables: dict[str, Table]
    computed: dict[str, int]
    reused: dict[str, int]
    interrupted: bool = False
    seconds: float = 0.0
    points: int = 0
    summary: dict = field(default_factory=dict)
    #: keys of the rows this process computed, per metric (what a distributed run exchanges between levels)
    computed_keys: dict = field(default_factory=dict, repr=False)
    #: distributed runs: number of processes, this one's rank, and the rows computed by each rank
    #: (every rank's counts on a completed run; only this rank's own after an interrupt)
    world_size: int = 1
    rank: int = 0
    rank_computed: list = field(default_factory=list)


class AnalysisRun:
    """State of one analysis (built by :func:`analyze`)."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)
        self._mb_cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._lr = None

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

    def data_for(self, pair: int):
        if self.eval_spec.kind == "minibatch":
            return self._minibatch(int(pair))
        return (self.eval_x, self.eval_y) if self.eval_x is not None else None

    def evaluate(self, states: torch.Tensor, pairs: int | Sequence[int], lines=None) -> tuple[np.ndarray, np.ndarray]:
        k = states.shape[0]
        loss = np.full(k, np.nan)
        acc = np.full(k, np.nan)
        if k == 0:
            return loss, acc
        if self.eval_spec.kind != "minibatch":
            l, a = self.evaluator.evaluate(states, self.eval_x, self.eval_y, lines=lines)
            return l, a
        owners = np.full(k, int(pairs)) if np.isscalar(pairs) else np.asarray(pairs, dtype=np.int64)
        if len(owners) != k:
            raise MetricError(f"evaluate: {k} states but {len(owners)} pair owners")
        for p in np.unique(owners):
            mask = owners == p
            mb = self._minibatch(int(p))
            if mb is None:
                continue  # no recorded minibatch: NaN rows
            sel = torch.as_tensor(np.nonzero(mask)[0], device=states.device)
            l, a = self.evaluator.evaluate(states[sel], mb[0], mb[1], bn_batch=len(mb[0]))
            loss[mask], acc[mask] = l, a
        return loss, acc

    def evaluate_lines(self, lines) -> list[tuple[np.ndarray, np.ndarray]]:
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
            l, c = self.evaluate(torch.cat(states), owners, lines=info)
            loss[s : s + len(part)] = l
            acc[s : s + len(part)] = c
        out = []
        pos = 0
        for line in lines:
            n = len(line[2])
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


def _metric_closure(names: Sequence[str]) -> list[type[Metric]]:
    """The metric classes to run, dependencies first (topological order)."""
    order: list[type[Metric]] = []
    seen: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if seen.get(name) == "done":
            return
        if seen.get(name) == "active":
            raise MetricError(f"metric dependency cycle: {' -> '.join(chain + (name,))}")
        seen[name] = "active"
        cls = get_metric(name)
        for dep in cls.requires:
            visit(dep, chain + (name,))
        seen[name] = "done"
        order.append(cls)

    for n in names:
        visit(n, ())
    return order


def _auto_device(device: str | torch.device | None) -> torch.device:
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


def analyze(
    archive: str | os.PathLike | Trajectory,
    out: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    steps: str | Sequence[int] | None = None,
    alphas: str | Sequence[float] | None = None,
    spans: str | Sequence[int] | int | None = None,
    eval: str | EvalSpec | None = DEFAULT_EVAL,
    bn: str = "train",
    device: str | torch.device | None = None,
    dtype: str = "float32",
    loss: str = "cross_entropy",
    model: Any = None,
    data: Any = None,
    trust_specs: bool = False,
    options: Mapping[str, Any] | None = None,
    subset_seed: int = 0,
    bn_batch: int | None = None,
    bn_batches: int = 4,
    block_pairs: int | None = None,
    flush_seconds: float = 2.0,
    max_elems: int | None = None,
    fast_path: bool = True,
    progress: bool | Callable[[int, int], Any] = False,
    on_block: Callable[[int], Any] | None = None,
    distributed: bool | str = "auto",
    curvature_split: str = "pairs",
) -> AnalysisReport:
    """Measure the landscape along the recorded path; rows go to a results file (created or resumed).

    Parameters mirror ``sgdwalk analyze`` (see docs/analysis.md). ``model``/``data`` override the
    archive's specs: an ``nn.Module``/``Dataset`` (or a dict of splits), a :class:`Spec`, or spec text
    such as ``'mlp {"hidden": [50]}'``. Specs stored in the archive are built only when they name
    sgdwalk's zoo or ``trust_specs`` is true. ``options`` sets metric options (``height``,
    ``convex_tol``, ``xtol``, ``barrier_tol``, ``barrier_points``, ...). Returns an :class:`AnalysisReport`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, or an initialised default process group),
    ``distributed="auto"`` shards the pairs across ranks (see :mod:`trajectory.analysis.distributed` and
    docs/scaling.md); ``curvature_split="data"`` instead splits the curvature metrics' evaluation data
    across ranks and all-reduces Hessian-vector products. ``distributed=False`` forces a single process.
    """
    t0 = time.perf_counter()
    check_choice(bn, BN_POLICIES, "--bn")
    check_choice(dtype, DTYPES, "--dtype")
    check_choice(loss, LOSSES, "--loss")
    eval_spec = parse_eval(eval, subset_seed)
    names = list(metrics) if metrics else list(DEFAULT_METRICS)
    opts: dict[str, Any] = dict(options or {})
    opts["alphas"] = parse_alphas(alphas if alphas is not None else opts.get("alphas"))
    opts["spans"] = parse_spans(spans if spans is not None else opts.get("spans"))
    steps_spec = parse_steps(steps)
    check_choice(curvature_split, ("pairs", "data"), "--curvature-split")
    from .distributed import DistContext

    dist = DistContext.from_env(distributed)
    if dist is not None and (device is None or str(device) in ("auto", "cuda")):
        device = dist.default_device()  # one GPU per process: cuda:LOCAL_RANK, not cuda:0 for all
    if dist is not None and progress is True and dist.rank != 0:
        progress = False  # one bar (rank 0's share), not one per process
    dev = _auto_device(device)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    classes = _metric_closure(names)  # unknown metric names fail before any work
    known = {k for c in classes for k in c.defaults} | {"alphas", "spans"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise AnalysisError(f"unknown option {unknown[0]!r} for metrics {', '.join(c.name for c in classes)}; known: {', '.join(sorted(known))}")

    own = not isinstance(archive, Trajectory)
    traj = Trajectory(archive) if own else archive
    records = None
    store = None
    final = None
    handed_over = False  # distributed: run_distributed owns the stores and the process group from then on
    try:
        if len(traj) < 2:
            raise AnalysisError(f"{traj.path} holds {len(traj)} record(s); the analyzer needs at least two consecutive records")
        m, model_id = _resolve_model(traj, model, trust_specs)
        uses_data = any(c.uses_data for c in classes)
        source = _DataSource(traj, data, trust_specs) if uses_data else None
        pairs = select_pairs(traj.steps, steps_spec)
        if not pairs:
            raise AnalysisError(f"--steps {steps!r} selects no pair of {traj.path}")
        single = pair_spans(traj.steps) == 1  # pairs that are one SGD update (not chords across sparse records)
        n_chords = int((~single[pairs]).sum())
        if n_chords and n_chords < len(pairs) and (dist is None or dist.rank == 0):
            import warnings

            warnings.warn(
                f"{n_chords} of the {len(pairs)} selected pairs span more than one optimizer step (sparse records between "
                f"dense ones): their curves are chords across several updates, not single SGD updates, and summaries mix "
                f"both; --steps updates keeps the single updates" + ("; under --eval minibatch those pairs have no minibatch "
                f"of their own and get NaN rows" if eval_spec.kind == "minibatch" else ""), stacklevel=2)

        bn_eff = bn if has_batchnorm(m) else "none"
        train_x = train_y = eval_x = eval_y = None
        batch_indices: dict[int, np.ndarray] = {}
        fp = ""
        recompute_batches: list[torch.Tensor] = []
        if bn_batch is None:
            bs = [len(traj.batch_indices(i)) for i in pairs[:4]]
            bs = [b for b in bs if b > 0]
            bn_batch = bs[0] if bs else 100
        if uses_data:
            need_train = eval_spec.kind in ("minibatch", "subset", "train") or bn_eff == "recompute"
            if need_train:
                train_x, train_y = source.tensors("train")
            if eval_spec.kind == "minibatch":
                for i in pairs:
                    # the minibatch stored under record i is that of the single update leaving it; a pair spanning
                    # several updates has no minibatch of its own (its rows are NaN, not those of its first update)
                    batch_indices[i] = traj.batch_indices(i) if single[i] else np.empty(0, dtype=np.int64)
                if not any(len(v) for v in batch_indices.values()):
                    raise AnalysisError(f"{traj.path} records no minibatch indices for the selected pairs; use --eval subset:N, train or test")
                top = max(int(v.max()) for v in batch_indices.values() if len(v))
                if top >= len(train_x):
                    raise AnalysisError(f"recorded batch index {top} exceeds the training split ({len(train_x)} samples); is this the data the run was trained on?")
                fp = fingerprint(train_x, train_y)
                eval_x, eval_y = None, None
            elif eval_spec.kind == "subset":
                idx = torch.as_tensor(subset_indices(len(train_x), eval_spec.n, eval_spec.seed))
                eval_x, eval_y = train_x[idx], train_y[idx]
            elif eval_spec.kind == "train":
                eval_x, eval_y = train_x, train_y
            else:
                eval_x, eval_y = source.tensors("test")
            if eval_x is not None:
                fp = fingerprint(eval_x, eval_y)
            if bn_eff == "recompute":
                g = torch.Generator().manual_seed(int(subset_seed) + 1)
                perm = torch.randperm(len(train_x), generator=g)
                recompute_batches = [train_x[perm[j * bn_batch : (j + 1) * bn_batch]] for j in range(max(1, bn_batches))]
                recompute_batches = [b for b in recompute_batches if len(b) >= 2]
            if loss == "cross_entropy":
                for t in (train_y, eval_y):
                    if t is not None and (t.is_floating_point() or t.dim() != 1):
                        raise AnalysisError("labels are not integer class indices; use --loss mse for regression data")
            to = lambda t: None if t is None else (t.to(dev, tdtype) if t.is_floating_point() else t.to(dev))  # noqa: E731
            train_x, train_y, eval_x, eval_y = map(to, (train_x, train_y, eval_x, eval_y))

        evaluator = Evaluator(
            m, traj.layout, device=dev, dtype=tdtype, bn=bn_eff if bn_eff != "none" else "eval", loss=loss,
            bn_batch=bn_batch, recompute_batches=recompute_batches, max_elems=max_elems, fast_path=fast_path,
        )

        shared = {
            "eval": eval_spec.to_dict(),
            "bn": bn_eff,
            "dtype": dtype,
            "loss": loss,
            "model": model_id,
            "data": source.ident if source is not None else "",
            "data_fingerprint": fp,
        }
        if eval_spec.kind == "minibatch":
            shared["minibatch"] = "single-update pairs only"  # rows of multi-step pairs are NaN (changed in 0.1)
        if bn_eff == "train" and eval_spec.kind != "minibatch":
            shared["bn_batch"] = int(bn_batch)
        if bn_eff == "recompute":
            shared.update(bn_batch=int(bn_batch), bn_batches=int(bn_batches), bn_seed=int(subset_seed) + 1)

        # metric instances and their configurations (dependencies first)
        instances: dict[str, Metric] = {}
        configs: dict[str, dict] = {}
        for cls in classes:
            inst = cls(**opts)
            cfg: dict[str, Any] = {
                "metric": cls.name,
                "version": cls.version,
                "options": {k: v for k, v in inst.options.items() if k not in cls.unit_options},
            }
            if cls.uses_data:
                cfg["shared"] = shared
            if cls.requires:
                cfg["requires"] = {d: _cfg_hash(configs[d]) for d in cls.requires}
            instances[cls.name], configs[cls.name] = inst, cfg

        out_path = os.fspath(out) if out is not None else default_results_path(traj.path)
        if os.path.abspath(out_path) == os.path.abspath(traj.path):
            raise AnalysisError("--out is the archive itself; the archive is read-only, choose another results path")
        info = {
            "archive_path": os.path.abspath(traj.path),
            "archive_created": str(traj.attrs.get("created", "")),
            "archive_records": len(traj),
            "archive_provenance": _provenance_json(traj),
        }
        archive_id = archive_identity(traj)
        if dist is None:
            from .distributed import merge_partials, partial_files

            store = ResultsFile(out_path, "a", archive_id=archive_id, archive_info=info)
            if partial_files(out_path):  # rows of an interrupted distributed run: fold them in first
                merge_partials(store)
        else:
            from .distributed import open_stores

            store, final = open_stores(dist, out_path, archive_id, info)
        tables = {name: store.table(name, configs[name], instances[name].keys, instances[name].version) for name in instances}

        n_state_bytes = (evaluator.n_state) * (8 if tdtype == torch.float64 else 4)
        if block_pairs is None:
            block_pairs = int(max(1, min(32, (256 << 20) // max(1, 3 * n_state_bytes))))
        max_span = max(opts["spans"]) if "barriers" in instances else 1
        records = _Records(traj, dev, tdtype, capacity=2 * block_pairs + max_span + 8)
        run = AnalysisRun(
            traj=traj, steps=traj.steps, pairs=pairs, evaluator=evaluator, options=opts, eval_spec=eval_spec,
            bn_effective=bn_eff, records=records, tables=tables, batch_indices=batch_indices,
            train_x=train_x, train_y=train_y, eval_x=eval_x, eval_y=eval_y, block_pairs=block_pairs,
            max_points=4096, state_budget=256 << 20,
        )
        ctx = ReplayContext(run)
        if dist is None:
            return _run_blocks(run, ctx, instances, tables, store, traj, out_path, flush_seconds, progress, on_block, t0)
        from .distributed import run_distributed

        part, store = store, None  # run_distributed closes the partial file (and the final one on rank 0)
        handed_over = True
        return run_distributed(dist, run, ctx, instances, configs, tables, part, final, out_path,
                               flush_seconds=flush_seconds, progress=progress, on_block=on_block, t0=t0,
                               curvature_split=curvature_split)
    finally:
        if records is not None:
            records.close()
        if store is not None:
            store.close()
        if dist is not None and not handed_over:  # failed before the distributed body: release lock and group
            if final is not None:
                final.close()
            dist.close()
        if own:
            traj.close()


#: archive root attributes copied into the results file, so reports can label runs by their
#: hyperparameters without the archive at hand (results stay readable after archives move or go)
PROVENANCE_ATTRS = (
    "created", "model_spec", "data_spec", "model_class", "metadata", "optimizer", "seed", "schedule",
    "argv", "codec", "lossy", "sgdwalk_version", "torch_version",
)


def _provenance_json(traj: Trajectory) -> str:
    """Canonical JSON of the archive's provenance attributes (the reader already decodes JSON-valued ones)."""
    from .results import canonical_json

    attrs = traj.attrs
    return canonical_json({k: attrs[k] for k in PROVENANCE_ATTRS if k in attrs})


def _cfg_hash(cfg: Mapping[str, Any]) -> str:
    from .results import config_hash

    return config_hash(cfg)


def _run_blocks(run, ctx, instances, tables, store, traj, out_path, flush_seconds, progress, on_block, t0, *,
                assign: Callable[[str, tuple[int, ...]], bool] | None = None, adopt: frozenset[str] = frozenset(),
                desc: str = "analyze", summarize: bool = True) -> AnalysisReport:
    """Compute every missing unit of ``instances`` block by block, flushing ``store`` as it goes.

    Distributed runs (:mod:`trajectory.analysis.distributed`) call this once per dependency level with
    ``assign`` (does this rank compute that unit?) and ``adopt`` (metrics whose rows this rank computes
    only to take part in collectives, e.g. data-parallel curvature on ranks > 0: kept as foreign rows).
    """
    pairs = run.pairs
    pair_pos = {p: j for j, p in enumerate(pairs)}
    pending: dict[str, list[tuple[int, ...]]] = {}
    reused: dict[str, int] = {}
    for name, inst in instances.items():
        units = inst.units(pairs)
        pending[name] = [u for u in units if tuple(u) not in tables[name].rows]
        reused[name] = len(units) - len(pending[name])
        if assign is not None:
            pending[name] = [u for u in pending[name] if assign(name, tuple(u))]
    computed = {name: 0 for name in instances}
    computed_keys: dict[str, list[tuple[int, ...]]] = {name: [] for name in instances}
    todo_pairs = sorted({u[0] for us in pending.values() for u in us})
    total = len(todo_pairs)
    bar = None
    if progress is True and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="pair", desc=desc, dynamic_ncols=True, smoothing=0.1)
    steps = traj.steps
    interrupted = False
    done_pairs = 0
    try:
        blocks = [todo_pairs[i : i + run.block_pairs] for i in range(0, len(todo_pairs), run.block_pairs)]
        for b, block in enumerate(blocks):
            if b + 1 < len(blocks):
                nxt = sorted({r for p in blocks[b + 1] for r in (p, p + 1)})
            else:
                nxt = []
            frontier = pair_pos[block[-1]]
            for name, inst in instances.items():
                ready, wait = [], []
                for u in pending[name]:
                    if pair_pos.get(u[0], 1 << 60) > frontier:
                        wait.append(u)
                        continue
                    ok = all(all((p,) in tables[d].rows for p in inst.needs(u)) for d in inst.requires)
                    (ready if ok else wait).append(u)
                pending[name] = wait
                if not ready:
                    continue
                if nxt:
                    run.records.prefetch(nxt)  # next block's records load while this one computes
                rows = inst.compute(ctx, ready)
                if len(rows) != len(ready):
                    raise MetricError(f"metric {name!r} returned {len(rows)} rows for {len(ready)} units")
                for u, row in zip(ready, rows):
                    far = u[0] + (u[1] if len(u) > 1 else 1)
                    meta = (int(steps[u[0]]), int(steps[min(far, len(steps) - 1)]))
                    if name in adopt:
                        tables[name].adopt(u, (*meta, store.run), row)
                    else:
                        tables[name].add(u, *meta, row, store.run)
                        computed_keys[name].append(tuple(int(k) for k in u))
                computed[name] += len(ready)
            done_pairs += len(block)
            if bar is not None:
                bar.update(len(block))
            elif callable(progress):
                progress(done_pairs, total)
            if flush_seconds is not None and time.monotonic() - store.last_flush >= flush_seconds:
                store.flush()
            if on_block is not None:
                on_block(done_pairs)
        left = {name: us for name, us in pending.items() if us}
        if left:  # cannot happen with consistent units()/needs(); a plug-in bug must not pass silently
            name, us = next(iter(left.items()))
            raise MetricError(f"metric {name!r}: {len(us)} unit(s) never became ready (e.g. {us[0]}); check its needs()")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if store.dirty:
            store.flush()
    from .summary import summarize_tables

    report = AnalysisReport(
        results_path=out_path, tables=dict(tables), computed=computed, reused=reused, interrupted=interrupted,
        seconds=time.perf_counter() - t0, points=run.evaluator.points_evaluated, computed_keys=computed_keys,
    )
    if summarize:
        report.summary = summarize_tables(store, list(tables.values()))
    return report
