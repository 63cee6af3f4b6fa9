"""The ``sgdwalk`` command line: thin click commands over the library.

Each command parses its options and calls one library function (:func:`trajectory.training.train`,
:func:`trajectory.archive.info.archive_info`, :func:`trajectory.analysis.analyze`, ...); a Python user gets
the same result from that call.

Commands are loaded lazily: the group knows each command's module and one-line help, and imports the module
only when the command runs (or its own ``--help`` is asked for). So ``sgdwalk --help`` and ``sgdwalk
--version`` never import torch and answer in a fraction of a second. Adding a command is one line at the
bottom of this module: ``main.add_lazy_command("name", ".module:command", "one-line help")`` (or
``main.add_command(command)`` for a command object already imported).

Errors sgdwalk raises on purpose (:class:`~trajectory.errors.SgdwalkError`) and ``ValueError`` from
bad option values print ``error: <one line>`` on stderr and exit with status 2, without a
traceback (set ``SGDWALK_DEBUG=1`` to see it). Ctrl-C during ``train`` exits with status 130 after
closing the archive.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import click

from trajectory import __version__
from trajectory.errors import SgdwalkError

from ._util import EXIT_ERROR, EXIT_INTERRUPTED, json_object as _json_object, one_line as _one_line  # noqa: F401

__all__ = ["main", "EXIT_ERROR", "EXIT_INTERRUPTED", "SgdwalkGroup"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    click.echo(f"warning: {_one_line(Exception(message))}", err=True)


class _LazyCommands(dict):
    """``group.commands`` that imports a lazily registered command on first lookup.

    Membership, iteration and ``len`` include registered-but-not-imported commands, so code that reads
    ``main.commands`` (tests, plug-ins) sees every command without importing any.
    """

    def __init__(self, loaded: dict):
        super().__init__(loaded)
        self.lazy: dict[str, tuple[str, str]] = {}  # name -> (".module:attribute", short help)

    def loaded(self, name: str) -> bool:
        return dict.__contains__(self, name)

    def _load(self, name: str) -> click.Command:
        module, _, attr = self.lazy[name][0].partition(":")
        cmd = getattr(importlib.import_module(module, __package__), attr)
        dict.__setitem__(self, name, cmd)
        return cmd

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self.lazy

    def __getitem__(self, name: str) -> click.Command:
        if not dict.__contains__(self, name) and name in self.lazy:
            return self._load(name)
        return dict.__getitem__(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __iter__(self):  # registration order: the workflow first
        return iter(dict.fromkeys([*self.lazy, *dict.keys(self)]))

    def keys(self):  # type: ignore[override]
        return list(iter(self))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self.lazy, *dict.keys(self)]))


class SgdwalkGroup(click.Group):
    """A click group that loads commands on first use and turns sgdwalk's errors into ``error: ...`` + status 2."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self.commands)

    def add_lazy_command(self, name: str, target: str, short_help: str) -> None:
        """Register ``name`` as ``target`` (``".module:command"`` relative to this package), imported when used."""
        self.commands.lazy[name] = (target, short_help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # registration order: record -> analyze -> report

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the registered one-line helps: listing commands imports none of them."""
        rows = []
        for name in self.list_commands(ctx):
            if not self.commands.loaded(name):
                rows.append((name, self.commands.lazy[name][1]))
            else:
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        old_show = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a subcommand's bad option value: one line, not click's usage block
            if os.environ.get("SGDWALK_DEBUG"):
                raise
            hint = f" (sgdwalk {err.ctx.info_name} -h for help)" if err.ctx is not None and err.ctx.parent is not None else ""
            click.echo(f"error: {_one_line(err.format_message())}{hint}", err=True)
            ctx.exit(EXIT_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (SgdwalkError, ValueError, OSError, KeyError, IndexError, RecursionError, MemoryError, OverflowError) as err:
            # OSError covers FileNotFoundError, PermissionError, IsADirectoryError and h5py's read errors; the
            # rest are what a damaged file or an absurd value can still raise from deep inside a library
            if os.environ.get("SGDWALK_DEBUG"):
                raise
            name = "" if isinstance(err, (SgdwalkError, ValueError, OSError)) else f"{type(err).__name__}: "
            click.echo(f"error: {name}{_one_line(err)}", err=True)
            ctx.exit(EXIT_ERROR)
        finally:
            warnings.showwarning = old_show


@click.group(cls=SgdwalkGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="sgdwalk", message="%(prog)s %(version)s")
def main() -> None:
    """Record SGD trajectories, replay them offline, and report the loss landscape along the path.

    \b
    The workflow: record -> analyze -> report
      1. record   sgdwalk train --out run.h5          (or Recorder / the Lightning
                                                      and Hugging Face callbacks
                                                      in your own training loop)
      2. analyze  sgdwalk analyze run.h5              -> run.results.h5
                  (own model: --model ./net.py:Net --data ./net.py:make_data)
      3. report   sgdwalk report run.results.h5       -> run.report/report.html
    \b
    Look inside: sgdwalk info run.h5, sgdwalk show run.results.h5.
    Every command takes -h/--help and -q/--quiet (where it prints progress).
    """


# The commands, in workflow order; each module is imported only when its command is used.
main.add_lazy_command("train", ".train:train_command", "Record: train a model with plain SGD into an archive.")
main.add_lazy_command("info", ".info:info_command", "What an archive (or a results file) holds.")
main.add_lazy_command("verify", ".verify:verify", "Check every chunk checksum and invariant of an archive.")
main.add_lazy_command("analyze", ".analyze:analyze", "Analyze: replay the recorded updates, measure the landscape.")
main.add_lazy_command("show", ".analyze:show", "The summary table of a results file.")
main.add_lazy_command("report", ".report:report", "Report: figures and one self-contained report.html.")
main.add_lazy_command("line", ".line:line_command", "Loss on the straight line between two records (one or two archives).")
