"""The analyzer as one call: :func:`analyze` composes a plan, a replay and a runner.

Why three rooms (docs/analysis.md, "Engine structure"): *plan* (:mod:`.plan`) decides which metrics and units,
under which configuration (what the results file already has is reused by hash); *replay* (:mod:`.replay`)
rebuilds model and data under the trust rule, holds the states of records and routes every evaluation
through the run's :class:`~trajectory.analysis.evaluator.Evaluator` and its strategy; *run* (:mod:`.run`)
walks the blocks, reports progress and flushes rows, in one process (:class:`~trajectory.analysis.run.LocalRunner`)
or across torchrun ranks (:class:`~trajectory.analysis.distributed.TorchrunRunner`). None of them imports
this module. Metrics only see a :class:`ReplayContext`.
"""
from __future__ import annotations

import dataclasses

import os
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ..archive.reader import Trajectory
from .errors import AnalysisError
from .evaluator import has_batchnorm
from .metric import DEFAULT_METRICS
from .options import (BN_POLICIES, DEFAULT_BN_BATCHES, DTYPES, LOSSES, EvalSpec, bn_seed, check_bn_sizes, check_choice, parse_alphas,
                      parse_eval, parse_spans, parse_steps)
from .plan import check_options, make_plan, metric_closure, missing_units, results_info, select, shared_config
from .replay import (STRATEGIES, AnalysisRun, DataSource, ReplayContext, auto_device, build_evaluator, calibrate, open_replay,
                     resolve_eval_data, resolve_model, strategy_record)
from .results import default_results_path
from .run import AnalysisReport, Job, LocalRunner, Progress

__all__ = ["analyze", "ReplayContext", "AnalysisRun", "AnalysisReport", "archive_identity", "DEFAULT_EVAL"]

#: Default evaluation data: a fixed 2,000-sample subset of the training split (see docs/analysis.md).
DEFAULT_EVAL = "subset:2000"


def archive_identity(traj: Trajectory) -> str:
    """The archive's run identity (its UUID, or a hash of every step and the first and last records); see
    :mod:`trajectory.analysis.identity`."""
    from .identity import archive_identity as _identity

    return _identity(traj)


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
    bn_batches: int = DEFAULT_BN_BATCHES,
    noise: str = "crn",
    block_pairs: int | None = None,
    flush_seconds: float = 2.0,
    max_elems: int | None = None,
    fast_path: bool = True,
    progress: bool | Callable[[int, int], Any] = False,
    on_block: Callable[[int], Any] | None = None,
    distributed: bool | str = "auto",
    curvature_split: str = "pairs",
    strategy: str = "auto",
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

    ``strategy`` (``auto``, ``vmap``, ``loop``, ``loop_cl``, ``mlp``) is how the evaluator evaluates states; ``auto`` calibrates
    on the run's data. The choice is recorded per table (``replay``) and never enters the configuration hash.
    ``progress``: True for a bar on stderr counted in model evaluations (one state over the evaluation set)
    after an up-front estimate; a callable gets ``(done, total)`` model evaluations as they happen.
    """
    t0 = time.perf_counter()
    check_choice(bn, BN_POLICIES, "--bn")
    check_choice(noise, ("crn", "resample"), "--noise")
    check_bn_sizes(bn_batch, bn_batches)
    check_choice(dtype, DTYPES, "--dtype")
    check_choice(loss, LOSSES, "--loss")
    check_choice(strategy, STRATEGIES, "--strategy")
    check_choice(curvature_split, ("pairs", "data"), "--curvature-split")
    eval_spec = parse_eval(eval, subset_seed)
    opts: dict[str, Any] = dict(options or {})
    opts["alphas"] = parse_alphas(alphas if alphas is not None else opts.get("alphas"))
    opts["spans"] = parse_spans(spans if spans is not None else opts.get("spans"))
    steps_spec = parse_steps(steps)
    from .distributed import DistContext, TorchrunRunner

    dist = DistContext.from_env(distributed)
    if dist is not None and (device is None or str(device) in ("auto", "cuda")):
        device = dist.default_device()  # one GPU per process: cuda:LOCAL_RANK, not cuda:0 for all
    if dist is not None and progress is True and dist.rank != 0:
        progress = False  # one bar (rank 0's share), not one per process
    runner = LocalRunner() if dist is None else TorchrunRunner(dist)  # owns the process group from here on
    own = not isinstance(archive, Trajectory)
    traj = None
    records = None
    try:
        dev = auto_device(device)
        tdtype = torch.float64 if dtype == "float64" else torch.float32
        classes = metric_closure(list(metrics) if metrics else list(DEFAULT_METRICS))  # unknown names fail before any work
        check_options(classes, opts)
        traj = Trajectory(archive) if own else archive
        if len(traj) < 2:
            raise AnalysisError(f"{traj.path} holds {len(traj)} record(s); the analyzer needs at least two consecutive records")

        # replay: model, pairs, data, evaluator
        m, model_id = resolve_model(traj, model, trust_specs)
        uses_data = any(c.uses_data for c in classes)
        source = DataSource(traj, data, trust_specs) if uses_data else None
        pairs, single = select(traj.steps, steps_spec, steps, eval_spec.kind, traj.path, warn=dist is None or dist.rank == 0)
        bn_eff = bn if has_batchnorm(m) else "none"
        evdata = resolve_eval_data(traj, source, pairs, single, eval_spec, bn_eff, loss, bn_batch=bn_batch,
                                   bn_batches=bn_batches, subset_seed=subset_seed, device=dev, dtype=tdtype)
        if eval_spec.kind == "subset" and evdata.eval_x is not None and len(evdata.eval_x) < eval_spec.n:
            # the default subset:2000 on a smaller split takes every sample: record the N actually used
            eval_spec = dataclasses.replace(eval_spec, n=len(evdata.eval_x))
        evaluator = build_evaluator(m, traj, evdata, device=dev, dtype=tdtype, bn_eff=bn_eff, loss=loss,
                                    max_elems=max_elems, fast_path=fast_path, strategy=strategy,
                                    bn_seed=bn_seed(subset_seed), noise=noise)

        # plan: configurations (hashes) and the tables they select in the results file
        shared = shared_config(eval_spec, bn_eff, dtype, loss, model_id, source.ident if source is not None else "",
                               evdata.fingerprint, bn_batch=evdata.bn_batch, bn_batches=bn_batches, subset_seed=subset_seed,
                               noise=noise)
        plan = make_plan(classes, opts, shared)
        out_path = os.fspath(out) if out is not None else default_results_path(traj.path)
        if os.path.abspath(out_path) == os.path.abspath(traj.path):
            raise AnalysisError("--out is the archive itself; the archive is read-only, choose another results path")
        store = runner.open(out_path, archive_identity(traj), results_info(traj))
        tables = plan.tables(store)

        # run
        max_span = max(opts["spans"]) if "barriers" in plan.instances else 1
        replay = open_replay(traj, pairs, evaluator, evdata, eval_spec, bn_eff, opts, tables, block_pairs=block_pairs,
                             max_span=max_span)
        records = replay.records
        replay.source = source  # metrics that need the training split under any --eval (gradients' g_B) load it lazily
        pending, _ = missing_units(plan.instances, tables, pairs)
        evaluates = any(pending[n] and inst.uses_data for n, inst in plan.instances.items())
        calib = calibrate(evaluator, evdata) if evaluates else {}
        chosen = strategy_record(evaluator, calib) if evaluates else {}
        bar = Progress(progress, eval_size=replay.eval_size, rate=calib.get("rate") or chosen.get("rate"),
                       strategy=str(chosen.get("name", "")))
        replay.connect(bar.add)
        job = Job(plan=plan, replay=replay, ctx=ReplayContext(replay), tables=tables, store=store, out_path=out_path,
                  progress=bar, flush_seconds=flush_seconds, on_block=on_block, t0=t0, strategy=chosen,
                  curvature_split=curvature_split)
        return runner.run(job)
    finally:
        if records is not None:
            records.close()
        runner.close()
        if own and traj is not None:
            traj.close()
