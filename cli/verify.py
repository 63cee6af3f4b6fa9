"""``sgdwalk verify ARCHIVE [--json]``: read every chunk of an archive, check every invariant, list bad records.

Exit status: 0 when the archive is intact, 1 when it opens but holds damaged records (listed), 2 when it cannot be
opened at all (one ``error:`` line, as for every command).
"""
from __future__ import annotations

import json
import sys

import click


@click.command("verify")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(archive: str, as_json: bool) -> None:
    """Check every chunk checksum and invariant of an archive; list damaged records (exit 1 if any)."""
    from trajectory.archive.verify import format_verify, verify_archive

    report = verify_archive(archive)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(format_verify(report))
    if not report["ok"]:
        sys.exit(1)
