"""Exceptions that sgdwalk raises for bad input.

Every message is one line that says what is wrong and what to do about it; the CLI prints
``str(err)`` and exits with status 2, so the message must stand on its own.
"""
from __future__ import annotations

__all__ = [
    "SgdwalkError",
    "ArchiveError",
    "ArchiveFormatError",
    "ArchiveVersionError",
    "ArchiveExistsError",
    "LayoutMismatchError",
    "RecorderError",
    "SpecError",
    "UntrustedSpecError",
    "DataNotFoundError",
]


class SgdwalkError(Exception):
    """Base class of every error sgdwalk raises on purpose."""


class ArchiveError(SgdwalkError):
    """An archive cannot be opened or read as asked."""


class ArchiveFormatError(ArchiveError):
    """The file is not an sgdwalk archive, is truncated, or lacks a required dataset."""


class ArchiveVersionError(ArchiveError):
    """The archive was written by a newer format version than this sgdwalk reads."""


class ArchiveExistsError(ArchiveError, FileExistsError):
    """Refusing to overwrite or append to an existing path without being asked to."""


class LayoutMismatchError(ArchiveError, ValueError):
    """A model's state dict does not match an archive's layout table."""


class RecorderError(SgdwalkError, RuntimeError):
    """The recorder was used in a way that would produce a wrong archive."""


class SpecError(SgdwalkError, ValueError):
    """A model or data spec string cannot be parsed, imported or called."""


class UntrustedSpecError(SpecError):
    """A spec read from an archive names code outside sgdwalk's zoo and the user did not opt in."""


class DataNotFoundError(SgdwalkError, FileNotFoundError):
    """A dataset that must be read from local disk is not there (sgdwalk never downloads)."""
