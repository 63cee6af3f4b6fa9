"""Exceptions of the analyzer. All are :class:`trajectory.errors.SgdwalkError` subclasses with one-line messages,
so the CLI prints ``error: <message>`` and exits with status 2."""
from __future__ import annotations

from ..errors import SgdwalkError

__all__ = ["AnalysisError", "ResultsError", "ResultsMismatchError", "ResultsLockedError", "MetricError"]


class AnalysisError(SgdwalkError, ValueError):
    """The analysis cannot run as asked (bad option, too few records, no minibatch indices, ...)."""


class MetricError(AnalysisError):
    """A metric name is unknown, a plug-in cannot be loaded, or a metric misbehaved."""


class ResultsError(SgdwalkError):
    """A results file cannot be read or written."""


class ResultsMismatchError(ResultsError):
    """A results file belongs to a different archive (or is not an sgdwalk results file)."""


class ResultsLockedError(ResultsError):
    """Another ``sgdwalk analyze`` process is writing the same results file."""
