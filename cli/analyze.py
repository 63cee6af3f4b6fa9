"""``sgdwalk analyze`` and ``sgdwalk show``: thin click commands over :mod:`trajectory.analysis`.

Registered in the main group by ``main.add_command(analyze)`` / ``main.add_command(show)``; each
also works on its own (``python -m cli.analyze ARCHIVE`` from a source checkout, or ``CliRunner``).
"""
from __future__ import annotations

import os
import sys

import click

from ._util import MetricListingCommand

__all__ = ["analyze", "show"]


def _fail(err: BaseException) -> None:
    if os.environ.get("SGDWALK_DEBUG"):
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__)
    from trajectory.textsafe import one_line

    click.echo(f"error: {one_line(err)}", err=True)  # escaped and cut: messages quote values read from files
    sys.exit(2)


def _options(pairs):
    import json

    from trajectory.textsafe import MAX_ECHO, MAX_JSON_DEPTH, json_depth, safe

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{safe(item)}: use KEY=VALUE", param_hint="--option")
        if len(value) > 100 * MAX_ECHO or json_depth(value) > MAX_JSON_DEPTH:  # before json.loads recurses
            raise ValueError(f"--option {safe(key.strip(), 60)}: value of {len(value)} characters or nested too deep")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@click.command("analyze", cls=MetricListingCommand)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Results file (default: ARCHIVE with .results.h5 next to it).")
@click.option("--metric", "-m", "metrics", multiple=True, help="Metric to run (repeatable or comma-separated); default: interpolation, floor, geometry, barriers. Plug-ins from the 'sgdwalk.metrics' entry point group work too.")
@click.option("--steps", default=None, help="Pairs: all (default), S, A:B, A:B:K (every K-th), comma-separated list; by the pair's first step.")
@click.option("--alphas", default=None, help="Interpolation grid: start:stop:count (default 0:1:21) or a comma list, e.g. -0.5:1.5:41.")
@click.option("--eval", "eval_", default=None, show_default=False, help="Evaluation data: minibatch | subset:N | train | test (default subset:2000).")
@click.option("--bn", type=click.Choice(["train", "eval", "recompute"]), default="train", show_default=True, help="BatchNorm policy (ignored by models without BatchNorm).")
@click.option("--bn-batch", "bn_batch", type=int, default=None, help="BatchNorm batch: --bn train normalises true batches of N samples of a seeded permutation (remainder dropped), --bn recompute averages batches of N (default 100, the authors' value; --eval minibatch: the minibatch).")
@click.option("--bn-batches", "bn_batches", type=int, default=None, help="--bn recompute: training batches averaged into the running statistics (default 32).")
@click.option("--noise", type=click.Choice(["crn", "resample"]), default="crn", show_default=True, help="crn: the same BatchNorm groups at every point (common random numbers, paired errors); resample: a fresh BatchNorm grouping at every evaluated point (the authors' evaluation noise).")
@click.option("--significance", type=float, default=0.0, show_default=True, metavar="Z", help="floor: interior and convex decisions need a margin of Z standard errors (0: plain comparisons).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--spans", default=None, help="Barrier spans in records, e.g. 1,2,5 (default 1).")
@click.option("--loss", type=click.Choice(["cross_entropy", "mse"]), default="cross_entropy", show_default=True)
@click.option("--model", default=None, help="Model spec overriding the archive's: zoo name or module:factory, optional JSON kwargs.")
@click.option("--data", default=None, help="Data spec overriding the archive's: zoo name or module:factory, optional JSON kwargs.")
@click.option("--trust-specs", is_flag=True, help="Import model/data specs stored in the archive even if they are not sgdwalk's zoo.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE", help="Metric option, e.g. height=max, convex_tol=0.02, barrier_tol=1e-3, xtol=1e-6.")
@click.option("--k", "k", type=int, default=None, help="hessian_top: number of top eigenpairs (same as --option k=N).")
@click.option("--subset-seed", type=int, default=0, show_default=True, help="Seed of the subset:N selection.")
@click.option("--flush-seconds", type=float, default=2.0, show_default=True, help="Write results at least this often (atomic rewrite).")
@click.option("--curvature-split", type=click.Choice(["pairs", "data"]), default="pairs", show_default=True,
              help="Under torchrun: give each rank whole curvature units (pairs) or split every unit's evaluation data across ranks and all-reduce Hessian-vector products (data: one large model on every GPU).")
@click.option("--strategy", default="auto", show_default=True, metavar="NAME",
              help="How states are evaluated: auto measures the strategies on the run's data and keeps the fastest; vmap (batched states), loop (one state at a time over large sample batches), loop_cl (loop in channels-last layout, 2-D convolutions), mlp (bmm route, plain MLPs). Recorded in the results file; never changes which rows are reused.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@click.option("--quiet", "-q", "--no-progress", "quiet", is_flag=True, help="No estimate line and no progress bar (the bar is also off when stderr is not a terminal, unless --progress).")
@click.option("--progress", "force_progress", is_flag=True, help="Show the estimate and the progress bar even when stderr is not a terminal (log files, CI).")
def analyze(archive, out, metrics, steps, alphas, eval_, bn, bn_batch, bn_batches, noise, significance, device, dtype, spans, loss, model, data, trust_specs, extra,
            k, subset_seed, flush_seconds, curvature_split, strategy, as_json, quiet, force_progress):
    """Replay pairs of consecutive records of ARCHIVE and measure the loss landscape along the SGD path.

    Under torchrun (torchrun --nproc-per-node N -m trajectory.cli analyze ARCHIVE ...) the pairs are
    sharded across the N processes (NCCL on GPUs, gloo on CPUs); see docs/scaling.md.
    """
    from trajectory.analysis import DEFAULT_EVAL, analyze as run_analysis, format_summary
    from trajectory.analysis.summary import to_json
    from trajectory.errors import SgdwalkError
    from trajectory.textsafe import escape_lines

    names = [n.strip() for m in metrics for n in m.split(",") if n.strip()] or None
    try:
        from trajectory.analysis.options import parse_flush_seconds

        flush_seconds = parse_flush_seconds(flush_seconds)  # NaN would never flush
        opts = _options(extra)
        if k is not None:
            opts["k"] = k
        if significance:  # only when set: the default adds nothing to any configuration
            opts["significance"] = significance
        bn_kw = {} if bn_batches is None else {"bn_batches": bn_batches}
        report = run_analysis(
            archive, out, metrics=names, steps=steps, alphas=alphas, spans=spans, eval=eval_ or DEFAULT_EVAL, bn=bn,
            device=device, dtype=dtype, loss=loss, model=model, data=data, trust_specs=trust_specs,
            options=opts, subset_seed=subset_seed, flush_seconds=flush_seconds, curvature_split=curvature_split,
            progress=not quiet and (force_progress or sys.stderr.isatty()), strategy=strategy,
            bn_batch=bn_batch, noise=noise, **bn_kw,
        )
    except SgdwalkError as err:
        _fail(err)
    except KeyboardInterrupt:  # interrupted before the pair loop: nothing to save
        click.echo("interrupted", err=True)
        sys.exit(130)
    if report.rank != 0:  # distributed: rank 0 prints the merged summary
        sys.exit(130 if report.interrupted else 0)
    if as_json:
        click.echo(to_json(report.summary or {"results": report.results_path, "interrupted": report.interrupted}))
    else:
        computed = sum(report.computed.values())
        reused = sum(report.reused.values())
        if report.summary:  # empty after an interrupted distributed run (nothing merged yet)
            click.echo(escape_lines(format_summary(report.summary)))
        procs = ""
        if report.world_size > 1:
            shares = " + ".join(str(sum(c.values())) for c in report.rank_computed)
            procs = f" by {report.world_size} processes ({shares})"
        click.echo(f"{computed} rows computed{procs}, {reused} reused, {report.seconds:.1f} s -> {report.results_path}")
    if report.interrupted:
        click.echo(f"interrupted: results so far are saved in {report.results_path}; rerun the same command to resume", err=True)
        sys.exit(130)


@click.command("show")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--metric", "-m", "metrics", multiple=True, help="Only these metrics.")
def show(results, as_json, metrics):
    """Print the summary table of a RESULTS file written by sgdwalk analyze."""
    from trajectory.analysis import format_summary, summarize_file
    from trajectory.analysis.summary import to_json
    from trajectory.errors import SgdwalkError

    try:
        summary = summarize_file(results)
    except SgdwalkError as err:
        _fail(err)
    if metrics:
        keep = {n.strip() for m in metrics for n in m.split(",")}
        summary["tables"] = [t for t in summary["tables"] if t["metric"] in keep]
    from trajectory.textsafe import escape_lines

    # the table quotes strings read from the file (paths, specs): escape control characters before printing
    click.echo(to_json(summary) if as_json else escape_lines(format_summary(summary)))


if __name__ == "__main__":  # pragma: no cover - `python -m cli.analyze ARCHIVE ...` from a checkout
    analyze()
