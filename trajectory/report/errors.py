"""The report's exception: bad report options (window, formats, config prefixes) and unusable inputs.

A subclass of :class:`trajectory.errors.SgdwalkError` (and ``ValueError``), so the command line prints it as one
``error: ...`` line with exit status 2, like every other error sgdwalk raises on purpose.
"""
from __future__ import annotations

from ..errors import SgdwalkError

__all__ = ["ReportError"]


class ReportError(SgdwalkError, ValueError):
    """A report option or input the report cannot use (one-line message)."""
