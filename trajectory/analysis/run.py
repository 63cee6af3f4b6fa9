"""Run: blocks of pairs, readiness of units, progress in model evaluations, flushing rows to the results file.

Why a module of its own: *when* units are computed and *where* their rows go is the same whatever the
metrics and however states are evaluated. Two runners share one interface (:class:`Runner`):
:class:`LocalRunner` here (one process: one pass over blocks, every metric computing the units whose
dependencies are ready) and :class:`~trajectory.analysis.distributed.TorchrunRunner` (level by level across
``torchrun`` ranks), both built on :func:`run_blocks`. This module imports neither the engine nor
torch.distributed.

Progress counts model evaluations: one state evaluated over the whole evaluation set is 1. Work is
reported as sample-forward equivalents through ``evaluator.on_samples(n)`` (wired by
:meth:`~trajectory.analysis.replay.Replay.connect`), so the bar moves within a block, whichever metric is
computing. The total comes from :meth:`Metric.cost <trajectory.analysis.metric.Metric.cost>` and is
corrected as units finish (the samples a metric really spent per unit replace its estimate), which keeps
the ETA honest for metrics whose cost is unknown or data dependent (Brent, Lanczos).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from .errors import MetricError
from .metric import Metric
from .partials import merge_partials, partial_files
from .plan import Plan, missing_units
from .results import ResultsFile, Table

__all__ = ["AnalysisReport", "Progress", "Job", "Runner", "LocalRunner", "run_blocks", "metric_cost", "format_estimate"]


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
    #: how states were evaluated (name, rate in sample-forwards/s, ...): stored per table as ``replay``; {} if nothing was evaluated
    strategy: dict = field(default_factory=dict)
    #: the up-front estimate (see :meth:`Progress.estimate`); {} when nothing was left to compute
    estimate: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- progress
def metric_cost(inst: Metric, ctx: Any, units: Sequence[tuple[int, ...]]) -> float | None:
    """``inst.cost(ctx, units)`` in sample-forward equivalents, or None when unknown (or the plug-in's cost fails:
    an estimate must never stop an analysis)."""
    fn = getattr(inst, "cost", None)
    if not callable(fn) or not units:
        return 0.0 if not units else None
    try:
        c = fn(ctx, units)
    except Exception:  # noqa: BLE001 - see docstring
        return None
    return None if c is None else max(0.0, float(c))


def format_estimate(est: Mapping[str, Any]) -> str:
    """The up-front line, e.g. ``~1,240 model evaluations, about 3.5 min at the calibrated rate (vmap, 2.1e+05 samples/s)``."""
    n = est["evaluations"]
    line = f"~{n:,.0f} model evaluations" if n >= 10 else f"~{n:.2g} model evaluations"
    if est.get("world", 1) > 1:
        line += f" in all ({est['world']} processes)"
    sec = est.get("seconds")
    if sec is not None:
        sec = sec / max(1, est.get("world", 1))
        t = f"{sec / 60:.1f} min" if sec < 600 else f"{sec / 60:.0f} min"
        how = est.get("strategy") or ""
        line += f", about {t} at the calibrated rate ({how + ', ' if how else ''}{est['rate']:.3g} samples/s)"
    else:
        line += " (no calibrated rate: the bar's ETA follows the first evaluations)"
    if est.get("unknown"):
        line += f"; cost of {', '.join(est['unknown'])} unknown until its first units finish"
    return line


class Progress:
    """Model evaluations done and left, fed by ``on_samples`` (thread-safe), shown as a tqdm bar or sent to a callback.

    ``sink``: True (a tqdm bar on stderr), a callable ``sink(done, total)`` (model evaluations, floats), or
    False/None (count only). ``eval_size``: samples in one model evaluation. ``rate``: calibrated
    sample-forwards per second (None: unknown)."""

    def __init__(self, sink: bool | Callable[[float, float], Any] | None, *, eval_size: int, rate: float | None = None,
                 strategy: str = ""):
        self.sink = sink
        self.eval_size = max(1, int(eval_size))
        self.rate = float(rate) if rate else None
        self.strategy = strategy
        self.samples = 0.0
        self._lock = threading.Lock()
        self._per_unit: dict[str, float] = {}  # estimated samples per unit, from cost()
        self._seen: dict[str, list[float]] = {}  # metric -> [units finished, samples they took]
        self._left: dict[str, int] = {}
        self._flight: tuple[str, float, float] | None = None  # (metric, expected samples, samples at its start)
        self.bar = None
        self._total = 0.0

    # estimates ---------------------------------------------------------------------------------------------
    def estimate(self, ctx: Any, pending: Mapping[str, tuple[Metric, Sequence[tuple[int, ...]]]], world: int = 1) -> dict[str, Any]:
        """Cost of the pending units: model evaluations, seconds at the calibrated rate, metrics of unknown cost."""
        samples, unknown = 0.0, []
        for name, (inst, units) in pending.items():
            c = metric_cost(inst, ctx, units)
            if c is None:
                unknown.append(name)
            else:
                samples += c
        return {"evaluations": samples / self.eval_size, "samples": samples, "eval_size": self.eval_size,
                "rate": self.rate, "seconds": samples / self.rate if self.rate else None, "unknown": unknown,
                "world": int(world), "strategy": self.strategy}

    def announce(self, est: Mapping[str, Any]) -> None:
        """Print the up-front line (bar mode only; ``-q`` and callbacks stay silent)."""
        if self.sink is True:
            print(f"analyze: {format_estimate(est)}", file=sys.stderr, flush=True)

    # the bar -----------------------------------------------------------------------------------------------
    def begin(self, ctx: Any, pending: Mapping[str, tuple[Metric, Sequence[tuple[int, ...]]]], desc: str = "analyze") -> None:
        """Start counting the units of one :func:`run_blocks` call (a distributed run calls it once per level)."""
        with self._lock:
            for name, (inst, units) in pending.items():
                self._left[name] = len(units)
                if units:
                    c = metric_cost(inst, ctx, units)
                    if c is not None:
                        self._per_unit[name] = c / len(units)
            self._total = self._estimate_total()
        if self.sink is True and any(self._left.values()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(1, round(self._total / self.eval_size)), unit="eval", desc=desc, dynamic_ncols=True,
                            smoothing=0.1, file=sys.stderr)

    def _unit_samples(self, name: str) -> float:
        seen = self._seen.get(name)
        if seen is not None and seen[0] > 0 and seen[1] > 0:
            return seen[1] / seen[0]
        return self._per_unit.get(name, 0.0)

    def _estimate_total(self) -> float:
        left = sum(n * self._unit_samples(m) for m, n in self._left.items())
        if self._flight is not None:
            _m, expected, start = self._flight
            left += max(0.0, expected - (self.samples - start))
        return self.samples + left

    def add(self, n: float) -> None:
        """Listener of ``evaluator.on_samples``: ``n`` sample-forward equivalents were just computed."""
        with self._lock:
            self.samples += float(n)
            self._show()

    def _show(self) -> None:
        total = max(self._estimate_total(), self.samples)
        self._total = total
        done_e, total_e = self.samples / self.eval_size, total / self.eval_size
        if self.bar is not None:
            t = max(1, round(total_e))
            if t != self.bar.total:
                self.bar.total = t
            d = int(done_e) - self.bar.n
            if d > 0:
                self.bar.update(d)
        elif callable(self.sink):
            self.sink(done_e, total_e)

    def compute_start(self, name: str, units: int) -> None:
        with self._lock:
            self._left[name] = max(0, self._left.get(name, 0) - units)
            self._flight = (name, units * self._unit_samples(name), self.samples)

    def compute_end(self, name: str, units: int) -> None:
        with self._lock:
            if self._flight is not None:
                seen = self._seen.setdefault(name, [0.0, 0.0])
                seen[0] += units
                seen[1] += self.samples - self._flight[2]
                self._flight = None
            self._show()

    def pairs(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"pairs {done}/{total}", refresh=False)

    def end(self) -> None:
        if self.bar is not None:
            with self._lock:
                done = int(self.samples / self.eval_size)
                if done > self.bar.n:
                    self.bar.update(done - self.bar.n)
                self.bar.total = max(self.bar.n, 1)  # 100% at the end, whatever the estimate said
                self.bar.close()
                self.bar = None


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class Job:
    """Everything a runner needs: the plan, the replay (and its context), tables, the store rows go to, options."""

    plan: Plan
    replay: Any
    ctx: Any
    tables: dict[str, Table]
    store: ResultsFile
    out_path: str
    progress: Progress
    flush_seconds: float | None = 2.0
    on_block: Callable[[int], Any] | None = None
    t0: float = field(default_factory=time.perf_counter)
    strategy: dict = field(default_factory=dict)
    curvature_split: str = "pairs"


class Runner(Protocol):
    """One way to execute a :class:`Job`: open the store its rows go to, run, release everything."""

    def open(self, out_path: str, archive_id: str, info: Mapping[str, Any]) -> ResultsFile: ...

    def run(self, job: Job) -> AnalysisReport: ...

    def close(self) -> None: ...


class LocalRunner:
    """A single process: the results file itself is the store (partial files of an interrupted torchrun are folded in first)."""

    world_size = 1
    rank = 0

    def __init__(self) -> None:
        self.store: ResultsFile | None = None

    def open(self, out_path: str, archive_id: str, info: Mapping[str, Any]) -> ResultsFile:
        self.store = ResultsFile(out_path, "a", archive_id=archive_id, archive_info=info)
        if partial_files(out_path):  # rows of an interrupted distributed run: fold them in first
            merge_partials(self.store)
        return self.store

    def run(self, job: Job) -> AnalysisReport:
        instances = job.plan.instances
        pending, _ = missing_units(instances, job.tables, job.replay.pairs)
        est = {}
        if any(pending.values()):
            est = job.progress.estimate(job.ctx, {n: (instances[n], pending[n]) for n in instances})
            job.progress.announce(est)
        report = run_blocks(job, instances)
        report.estimate = est
        return report

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


# ---------------------------------------------------------------------------------------------- blocks
def run_blocks(job: Job, instances: Mapping[str, Metric], *, assign: Callable[[str, tuple[int, ...]], bool] | None = None,
               adopt: frozenset[str] = frozenset(), desc: str = "analyze", summarize: bool = True) -> AnalysisReport:
    """Compute every missing unit of ``instances`` block by block, flushing ``job.store`` as it goes.

    Distributed runs call this once per dependency level with ``assign`` (does this rank compute that unit?)
    and ``adopt`` (metrics whose rows this rank computes only to take part in collectives, e.g. data-parallel
    curvature on ranks > 0: kept as foreign rows)."""
    run, ctx, tables, store = job.replay, job.ctx, job.tables, job.store
    pairs = run.pairs
    pair_pos = {p: j for j, p in enumerate(pairs)}
    pending, reused = missing_units(instances, tables, pairs)
    if assign is not None:
        pending = {n: [u for u in us if assign(n, tuple(u))] for n, us in pending.items()}
    computed = {name: 0 for name in instances}
    computed_keys: dict[str, list[tuple[int, ...]]] = {name: [] for name in instances}
    todo_pairs = sorted({u[0] for us in pending.values() for u in us})
    total = len(todo_pairs)
    progress = job.progress
    progress.begin(ctx, {n: (instances[n], pending[n]) for n in instances}, desc=desc)
    steps = run.traj.steps
    interrupted = False
    done_pairs = 0
    try:
        blocks = [todo_pairs[i : i + run.block_pairs] for i in range(0, len(todo_pairs), run.block_pairs)]
        for b, block in enumerate(blocks):
            nxt = sorted({r for p in blocks[b + 1] for r in (p, p + 1)}) if b + 1 < len(blocks) else []
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
                progress.compute_start(name, len(ready))
                rows = inst.compute(ctx, ready)
                progress.compute_end(name, len(ready))
                if len(rows) != len(ready):
                    raise MetricError(f"metric {name!r} returned {len(rows)} rows for {len(ready)} units")
                record = getattr(tables[name], "replay", None)  # see docs/results.md, "replay"
                if inst.uses_data and name not in adopt and record is not None:
                    entry = record.setdefault(str(store.run), dict(job.strategy or {}))
                    hvp = inst.choice() if callable(getattr(inst, "choice", None)) else None
                    if hvp:  # curvature metrics: the Hessian-vector product mode and chunk this run chose
                        entry["hvp"] = hvp
                    if not entry:
                        del record[str(store.run)]
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
            progress.pairs(done_pairs, total)
            if job.flush_seconds is not None and time.monotonic() - store.last_flush >= job.flush_seconds:
                store.flush()
            if job.on_block is not None:
                job.on_block(done_pairs)
        left = {name: us for name, us in pending.items() if us}
        if left:  # cannot happen with consistent units()/needs(); a plug-in bug must not pass silently
            name, us = next(iter(left.items()))
            raise MetricError(f"metric {name!r}: {len(us)} unit(s) never became ready (e.g. {us[0]}); check its needs()")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.end()
        if store.dirty:
            store.flush()
    from .summary import summarize_tables

    report = AnalysisReport(
        results_path=job.out_path, tables=dict(tables), computed=computed, reused=reused, interrupted=interrupted,
        seconds=time.perf_counter() - job.t0, points=run.evaluator.points_evaluated, computed_keys=computed_keys,
        strategy=dict(job.strategy),
    )
    if summarize:
        report.summary = summarize_tables(store, list(tables.values()))
    return report
