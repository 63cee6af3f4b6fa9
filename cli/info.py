"""``sgdwalk info``: what a file holds. Archives get the full table; a results file is named as one.

A thin layer over :func:`trajectory.archive.info.archive_info` (archives) and
:func:`trajectory.analysis.summarize_file` (results files); loaded by the ``sgdwalk`` group only when invoked.
"""
from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["info_command", "file_kind"]

RESULTS_FORMAT = "sgdwalk-results"  # the root "format" attribute of results files (docs/results.md)


def file_kind(path: str) -> str:
    """'results' for an sgdwalk results file, 'archive' for anything else (the archive reader explains)."""
    import os

    if not os.path.isfile(path):  # a FIFO would block h5py's open forever; the archive reader refuses it
        return "archive"
    try:
        import h5py

        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format", "")
    except (OSError, ValueError):
        return "archive"  # not HDF5 or unreadable: archive_info says what is wrong in one line
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    return "results" if fmt == RESULTS_FORMAT else "archive"


def _results_info(path: str) -> dict[str, Any]:
    from trajectory.analysis import summarize_file

    summary = summarize_file(path)
    return {"kind": "results", "path": path, "summary": summary}


@click.command("info")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of the table.")
def info_command(archive: str, as_json: bool) -> None:
    """Show what an archive holds: records, steps, sizes, codec, NaNs, batches, specs, provenance.

    Given a results file (written by sgdwalk analyze), says so and prints its summary table.
    """
    if file_kind(archive) == "results":
        from trajectory.analysis import format_summary
        from trajectory.textsafe import escape_lines
        from trajectory.analysis.summary import to_json

        info = _results_info(archive)
        if as_json:
            click.echo(to_json(info))
            return
        click.echo(f"{archive} is an sgdwalk results file (written by sgdwalk analyze), not a trajectory archive; "
                   f"its summary (same as `sgdwalk show {archive}`):")
        click.echo(escape_lines(format_summary(info["summary"])))
        return
    from trajectory.archive.info import archive_info, format_info
    from trajectory.textsafe import escape_lines

    info = archive_info(archive)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, allow_nan=False))
    else:
        click.echo(escape_lines(format_info(info)))  # attribute text from the file: no terminal escapes
