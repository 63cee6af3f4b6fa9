"""Analysis across processes with torch.distributed (``torchrun``): shard pairs, merge results, resume anywhere.

Why this shape. Pairs are independent except through metric dependencies (``floor`` reads
``interpolation``; ``barriers`` reads the floors of pairs i and i+k, which another rank may own), so the
engine runs the metrics level by level of the dependency graph. Within a level, the missing pairs are cut
into blocks of consecutive pairs (consecutive pairs share records, so each rank reads each record about
once) dealt round-robin to the ranks; after a level, the ranks exchange the rows they computed with one
``all_gather_object`` (results are numbers per pair: kilobytes), so the next level finds every dependency.

Durability and resume. Each rank writes only the rows it computed to its own partial file
``RESULTS.part-<rank>`` (a results file of the same schema, atomically rewritten every flush, exactly
like a single-process run). At the end rank 0 folds every partial file into ``RESULTS`` (one atomic
rewrite) and deletes them. A run that dies (a killed rank makes torchrun stop the others; SIGTERM makes
each rank flush first) leaves ``RESULTS`` and the partial files; the next run, with any number of
processes, reads them all, computes only the missing rows, and merges everything. Partial files are
named by rank only, so a rank of the next run reopens and extends the file of the same rank; partial
files of ranks that no longer exist are read and merged all the same.

Curvature. ``curvature_split="pairs"`` (default) gives each rank whole curvature units like any metric.
``"data"`` computes every curvature unit on all ranks together: the evaluation batches are dealt to the
ranks and each Hessian-vector product, gradient and loss is all-reduced (:meth:`Objective.shard`), so a
single large model's top eigenvalue uses every GPU; rank 0 keeps the rows.

Shape in code: :class:`TorchrunRunner` implements the runner interface of :mod:`.run` (``open`` the store,
``run`` a job, ``close``) like :class:`~trajectory.analysis.run.LocalRunner`, calling
:func:`~trajectory.analysis.run.run_blocks` once per level; partial-file helpers live in :mod:`.partials`.

Backends: NCCL when CUDA is available, gloo otherwise (collectives of Python objects go through the
default group; with NCCL, tensors live on ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as tdist

from .errors import AnalysisError
from .errors import ResultsMismatchError
from .partials import PART_SUFFIX, merge_partials, part_path, partial_files
from .plan import missing_units
from .results import ResultsFile
from .run import AnalysisReport, Job, run_blocks

__all__ = ["DistContext", "part_path", "partial_files", "merge_partials", "open_stores", "TorchrunRunner", "PART_SUFFIX"]


@dataclass
class DistContext:
    """This process's place in the default process group, plus the collectives the engine needs."""

    rank: int
    world: int
    local_rank: int
    backend: str
    owns_group: bool

    @classmethod
    def from_env(cls, mode: bool | str = "auto") -> "DistContext | None":
        """The context of a ``torchrun`` worker, or None for a single process.

        ``mode="auto"``: use an initialised default group if there is one, else initialise one when
        ``WORLD_SIZE`` > 1 (as torchrun sets it). ``True``: the same, but a single process is an error.
        ``False``: always None."""
        if mode is False or mode == "off":
            return None
        if mode not in (True, "auto", "on"):
            raise AnalysisError(f"distributed must be 'auto', True or False, not {mode!r}")
        if not tdist.is_available():
            if mode is True:
                raise AnalysisError("this torch build has no torch.distributed")
            return None
        owns = False
        if not tdist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if world <= 1:
                if mode is True or mode == "on":
                    raise AnalysisError("distributed analysis needs torchrun (WORLD_SIZE > 1); run: torchrun --nproc-per-node N -m trajectory.cli analyze ...")
                return None
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            tdist.init_process_group(backend=backend)
            owns = True
        world = tdist.get_world_size()
        if world <= 1 and mode == "auto":
            return None
        return cls(rank=tdist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", tdist.get_rank())),
                   backend=str(tdist.get_backend()), owns_group=owns)

    def default_device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process), else the CPU."""
        if torch.cuda.is_available():
            dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            if self.backend != "nccl":  # gloo group on a GPU node: still one GPU per process
                torch.cuda.set_device(dev)
            return dev
        return torch.device("cpu")

    # collectives ---------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.backend == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (NCCL needs CUDA tensors: a CPU tensor makes a round trip)."""
        if self.backend == "nccl" and t.device.type != "cuda":
            tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
            tdist.all_reduce(tmp)
            t.copy_(tmp)
        else:
            tdist.all_reduce(t)
        return t

    def agree(self, error: BaseException | None) -> None:
        """Collective error check: if any rank failed, every rank raises that rank's error (no rank hangs)."""
        msgs = self.all_gather(None if error is None else (type(error).__name__, " ".join(str(error).split())))
        for r, m in enumerate(msgs):
            if m is not None:
                if error is not None:
                    raise error
                raise AnalysisError(f"rank {r} failed: {m[1]}")

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


@dataclass
class _DataShard:
    rank: int
    world: int
    all_reduce: Any


def open_stores(dist: DistContext, out_path: str, archive_id: str, info: Mapping[str, Any]) -> tuple[ResultsFile, ResultsFile | None]:
    """Rank 0 opens (and locks) the results file; every rank opens its own partial file.

    Errors (a results file of another archive, a held lock) are raised on every rank."""
    final = part = None
    err: BaseException | None = None
    try:
        if dist.rank == 0:
            final = ResultsFile(out_path, "a", archive_id=archive_id, archive_info=info)
    except Exception as e:  # noqa: BLE001 - re-raised collectively below
        err = e
    dist.agree(err)
    try:
        part = ResultsFile(part_path(out_path, dist.rank), "a", archive_id=archive_id, archive_info=info)
    except Exception as e:  # noqa: BLE001
        err = e
    try:
        dist.agree(err)
    except BaseException:
        if final is not None:
            final.close()
        raise
    return part, final


def _adopt_file(tables: Mapping[str, Any], path: str, archive_id: str) -> int:
    """Adopt the rows of every table in ``path`` whose configuration matches one of ``tables``."""
    if not os.path.exists(path):
        return 0
    other = ResultsFile(path, "r")
    if other.attrs.get("archive_id") != archive_id:
        raise ResultsMismatchError(f"{path} holds results of a different archive ({other.attrs.get('archive_path', '?')}); remove it")
    n = 0
    by_hash = {t.hash: t for t in tables.values()}
    for (_m, h), ot in other.tables.items():
        mine = by_hash.get(h)
        if mine is None:
            continue
        for key in ot.sorted_keys(own=True):
            n += mine.adopt(key, ot.meta[key], ot.rows[key])
    return n


def _is_curvature(inst: Any) -> bool:
    from .metrics.curvature import _Curvature

    return isinstance(inst, _Curvature)


class TorchrunRunner:
    """The distributed runner (see the module docstring): same interface as :class:`~trajectory.analysis.run.LocalRunner`.

    Owns the process group from construction on: :meth:`close` releases the results lock, the partial file
    and the group whether or not :meth:`run` ran (setup errors before the run too)."""

    def __init__(self, dist: DistContext):
        self.dist = dist
        self.world_size = dist.world
        self.rank = dist.rank
        self.part: ResultsFile | None = None
        self.final: ResultsFile | None = None
        self._closed = False

    def open(self, out_path: str, archive_id: str, info: Mapping[str, Any]) -> ResultsFile:
        self.part, self.final = open_stores(self.dist, out_path, archive_id, info)
        return self.part

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.part is not None:
                self.part.close()
            if self.final is not None:
                self.final.close()
        finally:
            self.part = self.final = None
            self.dist.close()

    def run(self, job: Job) -> AnalysisReport:
        from .summary import summarize_tables

        dist, run, tables, part, final = self.dist, job.replay, job.tables, self.part, self.final
        instances, configs, out_path = job.plan.instances, job.plan.configs, job.out_path
        old_term = None
        if dist.world > 1:
            # torchrun stops the other workers with SIGTERM when one dies: flush the partial file first
            def _term(signum, frame):  # noqa: ANN001
                raise KeyboardInterrupt

            try:
                old_term = signal.signal(signal.SIGTERM, _term)
            except ValueError:  # not the main thread
                old_term = None
        reports = []
        interrupted = False
        try:
            # 1. what exists: the results file and every partial file (from runs of any world size)
            err: BaseException | None = None
            try:
                if dist.rank != 0:
                    _adopt_file(tables, out_path, part.attrs["archive_id"])
                else:
                    for name, t in tables.items():
                        ft = final.tables.get((t.metric, t.hash))
                        if ft is not None:
                            for key in ft.sorted_keys():
                                t.adopt(key, ft.meta[key], ft.rows[key])
                for p in partial_files(out_path):
                    if p != part.path:
                        _adopt_file(tables, p, part.attrs["archive_id"])
            except Exception as e:  # noqa: BLE001
                err = e
            dist.agree(err)

            pending, reused = missing_units(instances, tables, run.pairs)
            if dist.rank == 0 and any(pending.values()):
                est = job.progress.estimate(job.ctx, {n: (instances[n], pending[n]) for n in instances}, world=dist.world)
                job.progress.announce(est)
            data_split = {n for n, inst in instances.items() if job.curvature_split == "data" and _is_curvature(inst)}
            # 2. level by level
            for names in job.plan.levels:
                level = {n: instances[n] for n in names}
                sharded = [n for n in names if n not in data_split]
                todo = sorted({u[0] for n in sharded for u in level[n].units(run.pairs) if tuple(u) not in tables[n].rows})
                todo = dist.broadcast(todo)  # rank 0's view decides; every rank read the same files
                block = max(1, min(int(run.block_pairs), -(-len(todo) // dist.world)))  # every rank gets work
                mine = {p for j in range(dist.rank * block, len(todo), dist.world * block) for p in todo[j : j + block]}

                def assign(name: str, unit: tuple[int, ...], mine=mine) -> bool:
                    return name in data_split or unit[0] in mine

                adopt = frozenset(data_split) if dist.rank != 0 else frozenset()
                run.data_shard = _DataShard(dist.rank, dist.world, dist.all_reduce) if data_split & set(names) else None
                try:
                    rep = run_blocks(job, level, assign=assign, adopt=adopt, desc=f"analyze [rank {dist.rank}/{dist.world}]",
                                     summarize=False)
                finally:
                    run.data_shard = None
                reports.append(rep)
                if rep.interrupted:
                    interrupted = True
                    break  # no collectives after an interrupt: the other ranks are being stopped too
                # 3. exchange this level's rows so the next level finds its dependencies on every rank
                mine_rows = {n: [(k, tables[n].meta[k], tables[n].rows[k]) for k in rep.computed_keys.get(n, [])] for n in names}
                for r, rows in enumerate(dist.all_gather(mine_rows)):
                    if r == dist.rank:
                        continue
                    for n, items in rows.items():
                        for k, meta, row in items:
                            tables[n].adopt(k, meta, row)
            if part.dirty:
                part.flush()
            computed = {n: sum(r.computed.get(n, 0) for r in reports) for n in instances}
            if interrupted:
                self.part = None
                part.close()
                return self._report(job, tables, computed, [computed], reused, True, {})
            # 4. fold the partial files into the results file (rank 0), once every rank has flushed
            self.part = None
            part.close()
            totals = dist.all_gather(computed)
            # under --curvature-split data every rank computes the same curvature rows (on its share of the data):
            # count them once, not once per rank
            total = {n: (totals[0].get(n, 0) if n in data_split else sum(t.get(n, 0) for t in totals)) for n in instances}
            dist.barrier()
            summary: dict = {}
            if dist.rank == 0:
                merge_partials(final)
                ftables = [final.table(n, configs[n], instances[n].keys, instances[n].version) for n in instances]
                summary = summarize_tables(final, ftables)
            dist.barrier()
            return self._report(job, tables, total, totals, reused, False, summary)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            self.close()

    def _report(self, job: Job, tables, computed, per_rank, reused, interrupted, summary) -> AnalysisReport:
        return AnalysisReport(
            results_path=job.out_path, tables=dict(tables), computed=dict(computed), reused=reused, interrupted=interrupted,
            seconds=time.perf_counter() - job.t0, points=job.replay.evaluator.points_evaluated, summary=summary,
            world_size=self.dist.world, rank=self.dist.rank, rank_computed=[dict(c) for c in per_rank],
            strategy=dict(job.strategy),
        )
