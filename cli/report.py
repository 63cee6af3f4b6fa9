"""``sgdwalk report``: a thin click command over :func:`trajectory.report.build_report`.

Registered in the main group by ``main.add_command(report)``; also works on its own (``python -m cli.report
RESULTS`` from a source checkout, or click's ``CliRunner``).
"""
from __future__ import annotations

import sys

import click

from .analyze import _fail

__all__ = ["report"]


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for report.html and the figures (default: RUN.report/ next to the first RESULTS file, e.g. run.results.h5 -> run.report/).")
@click.option("--window", default=None, metavar="START:END",
              help="Optimizer steps of the interpolation figure, e.g. 0:50 or 1000: (default: the last 50 pairs of each run).")
@click.option("--format", "formats", default="png,pdf", show_default=True, metavar="FMT[,FMT]", help="Figure files to write: png, pdf, svg (comma-separated). The page always embeds PNG.")
@click.option("--title", default=None, help="Page title (default: 'sgdwalk report: <run labels>').")
@click.option("--eval", "eval_", default=None, metavar="SPEC",
              help="Use the tables evaluated on this data (subset:2000, train, test, minibatch) when a file holds several.")
@click.option("--config", "configs", multiple=True, metavar="HASH",
              help="Use the table whose config hash starts with HASH for its metric (repeatable; `sgdwalk show` lists hashes).")
@click.option("--no-progress", "-q", "--quiet", "quiet", is_flag=True, help="No progress bar (it is also off when stderr is not a terminal).")
def report(results, out, window, formats, title, eval_, configs, quiet):
    """Figures (PNG/PDF) and one self-contained report.html from one or more RESULTS files of sgdwalk analyze.

    \b
    Examples:
      sgdwalk report run.results.h5
      sgdwalk report a.results.h5 b.results.h5 -o compare/ --window 200:260
    """
    from trajectory.errors import SgdwalkError
    from trajectory.report import build_report

    try:
        res = build_report(list(results), out, window=window, formats=formats, title=title, eval=eval_,
                           configs=configs, progress=not quiet and sys.stderr.isatty())
    except (SgdwalkError, ValueError, OSError) as err:
        _fail(err)
    from trajectory.textsafe import one_line

    for note in res.omitted.values():  # notes quote metric names and paths read from the files: escaped, cut
        click.echo(f"note: {one_line(note)}", err=True)
    n = sum(len(v) for v in res.figures.values())
    click.echo(f"wrote {res.html} and {n} figure files ({', '.join(res.figures) or 'none'}) in {res.seconds:.1f} s")


if __name__ == "__main__":  # pragma: no cover - `python -m cli.report RESULTS ...` from a checkout
    report()
